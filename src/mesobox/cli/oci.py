"""``mesobox-oci`` (and its alias ``mesobox oci``): an OCI runtime with runc's command line.

``mesobox-oci [GLOBAL OPTIONS] VERB [OPTIONS] ID [ARGS]``, as runc(8) and podman's
and conmon's calls spell it: options take ``--name VALUE``, ``--name=VALUE`` or Go's
single dash (``-name``); a flag takes ``=true``/``=false``.  Global options: ``--root``
(the state directory: oci/state.py ``default_root``), ``--log`` and ``--log-format``
(oci/log.py), ``--debug``, ``--systemd-cgroup`` (cgroupsPath read as systemd's
"slice:prefix:name", made on the cgroup filesystem: docs/oci.md), ``--rootless``
(accepted: mesobox is rootless by construction), ``--criu`` (accepted; CRIU is found on PATH),
``--version``, ``--help``.

The lifecycle itself is oci/runtime.py; this module only parses and prints.  Every
failure is one ``mesobox-oci: error:`` line on stderr and in ``--log``, and a non-zero
exit status (the error's own exit code).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from mesobox.errors import LaunchError, MesoboxError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config
    from mesobox.oci.runtime import Runtime

FLAG, VALUE, LIST = "flag", "value", "list"
# option name -> (kind, aliases); the verb's positional arguments are in _USAGE.
_GLOBAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "root": (VALUE, ()), "log": (VALUE, ()), "log-format": (VALUE, ()), "debug": (FLAG, ()),
    "systemd-cgroup": (FLAG, ()), "rootless": (VALUE, ()), "criu": (VALUE, ()), "version": (FLAG, ("v",)),
    "help": (FLAG, ("h",)),
}
_CREATE = {"bundle": (VALUE, ("b",)), "pid-file": (VALUE, ()), "console-socket": (VALUE, ()),
           "no-pivot": (FLAG, ()), "no-new-keyring": (FLAG, ()), "preserve-fds": (VALUE, ())}
_CRIU = {"image-path": (VALUE, ()), "work-path": (VALUE, ()), "manage-cgroups-mode": (VALUE, ()),
         "tcp-established": (FLAG, ()), "ext-unix-sk": (FLAG, ()), "shell-job": (FLAG, ()),
         "file-locks": (FLAG, ())}
_VERBS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "create": _CREATE,
    "run": {**_CREATE, "detach": (FLAG, ("d",)), "keep": (FLAG, ()), "no-subreaper": (FLAG, ())},
    "start": {},
    "state": {},
    "kill": {"all": (FLAG, ("a",))},
    "delete": {"force": (FLAG, ("f",))},
    "exec": {"process": (VALUE, ("p",)), "tty": (FLAG, ("t",)), "detach": (FLAG, ("d",)),
             "pid-file": (VALUE, ()), "console-socket": (VALUE, ()), "env": (LIST, ("e",)),
             "cwd": (VALUE, ()), "user": (VALUE, ("u",)), "additional-gids": (LIST, ("g",)),
             "no-new-privs": (FLAG, ()), "cap": (LIST, ("c",)), "preserve-fds": (VALUE, ()),
             "process-label": (VALUE, ()), "apparmor": (VALUE, ()), "cgroup": (VALUE, ())},
    "ps": {"format": (VALUE, ("f",))},
    "list": {"format": (VALUE, ("f",)), "quiet": (FLAG, ("q",))},
    "pause": {},
    "resume": {},
    "features": {},
    "spec": {"bundle": (VALUE, ("b",)), "rootless": (FLAG, ())},
    "checkpoint": {**_CRIU, "leave-running": (FLAG, ())},
    "restore": {**_CRIU, "bundle": (VALUE, ("b",)), "detach": (FLAG, ("d",)), "pid-file": (VALUE, ()),
                "console-socket": (VALUE, ()), "no-subreaper": (FLAG, ()), "no-pivot": (FLAG, ())},
    "events": {"stats": (FLAG, ()), "interval": (VALUE, ())},
    "update": {"resources": (VALUE, ("r",)), "memory": (VALUE, ()), "memory-reservation": (VALUE, ()),
               "memory-swap": (VALUE, ()), "cpu-shares": (VALUE, ()), "cpu-quota": (VALUE, ()),
               "cpu-period": (VALUE, ()), "cpuset-cpus": (VALUE, ()), "cpuset-mems": (VALUE, ()),
               "pids-limit": (VALUE, ()), "blkio-weight": (VALUE, ())},
}
# runc update's flags: (section of linux.resources, key, a size in bytes)
_UPDATE_FLAGS = {"memory": ("memory", "limit", True), "memory-reservation": ("memory", "reservation", True),
                 "memory-swap": ("memory", "swap", True), "cpu-shares": ("cpu", "shares", False),
                 "cpu-quota": ("cpu", "quota", False), "cpu-period": ("cpu", "period", False),
                 "cpuset-cpus": ("cpu", "cpus", None), "cpuset-mems": ("cpu", "mems", None),
                 "pids-limit": ("pids", "limit", False), "blkio-weight": ("blockIO", "weight", False)}
# verb -> (usage of its arguments, least, most (-1: any), summary)
_USAGE: dict[str, tuple[str, int, int, str]] = {
    "create": ("ID", 1, 1, "create a container: set up, waiting for start"),
    "run": ("ID", 1, 1, "create and start a container"),
    "start": ("ID", 1, 1, "start the command of a created container"),
    "state": ("ID", 1, 1, "print a container's state as JSON"),
    "kill": ("ID [SIGNAL]", 1, 2, "send a signal (default SIGTERM) to a container's process"),
    "delete": ("ID...", 1, -1, "delete a stopped (or, with --force, any) container"),
    "exec": ("ID [COMMAND [ARG...]]", 1, -1, "run a process in a container"),
    "ps": ("ID [PS-ARGS...]", 1, -1, "list a container's processes"),
    "list": ("", 0, 0, "list the containers"),
    "pause": ("ID", 1, 1, "suspend every process of a container"),
    "resume": ("ID", 1, 1, "resume a paused container"),
    "features": ("", 0, 0, "print what this runtime supports, as JSON"),
    "spec": ("", 0, 0, "write a default config.json"),
    "checkpoint": ("ID", 1, 1, "checkpoint a running container with CRIU (real root)"),
    "restore": ("ID", 1, 1, "restore a container from a checkpoint with CRIU (real root)"),
    "events": ("ID", 1, 1, "container events (not supported)"),
    "update": ("ID", 1, 1, "update a container's cgroup limits (--resources FILE|-, or runc's flags)"),
}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_options(table: dict[str, tuple[str, tuple[str, ...]]], argv: list[str], what: str,
                  stop_at_argument: bool) -> tuple[dict[str, Any], list[str]]:
    """Go-flag style options of ``table``; the rest.  ``stop_at_argument``: everything
    after the first argument is left alone (exec's command, the global options' verb)."""
    names = {alias: name for name, (_, aliases) in table.items() for alias in (name, *aliases)}
    values: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        i += 1
        if item == "--":
            rest += argv[i:]
            break
        if not item.startswith("-") or item == "-":
            rest.append(item)
            if stop_at_argument:
                rest += argv[i:]
                break
            continue
        key, eq, inline = item.lstrip("-").partition("=")
        name = names.get(key)
        if name is None:
            raise UsageError(f"{what}: unknown option {item.split('=', 1)[0]!r}",
                             hint=f"mesobox-oci {what if what != 'mesobox-oci' else ''} --help".replace("  ", " "))
        kind = table[name][0]
        if kind == FLAG:
            if eq and inline.lower() not in _BOOLS:
                raise UsageError(f"{what}: bad value {inline!r} for --{name}: true or false")
            values[name] = _BOOLS[inline.lower()] if eq else True
            continue
        if not eq:
            if i >= len(argv):
                raise UsageError(f"{what}: option --{name} needs a value")
            inline = argv[i]
            i += 1
        if kind == LIST:
            values.setdefault(name, []).append(inline)
        else:
            values[name] = inline
    return values, rest


def help_text(verb: str | None = None) -> str:
    if verb in _USAGE:
        args, _, _, summary = _USAGE[verb]
        options = "".join(f"  --{name}{' VALUE' if kind != FLAG else ''}\n" for name, (kind, _) in _VERBS[verb].items())
        return f"usage: mesobox-oci [GLOBAL OPTIONS] {verb} [OPTIONS] {args}\n{summary}\n" + (
            f"options:\n{options}" if options else "")
    verbs = "".join(f"  {name:<11} {summary}\n" for name, (_, _, _, summary) in _USAGE.items())
    return ("usage: mesobox-oci [GLOBAL OPTIONS] VERB [OPTIONS] ID [ARGS]\n"
            "An OCI runtime (runtime-spec 1.0) with runc's command line, made of mesobox's launcher.\n"
            f"verbs:\n{verbs}"
            "global options:\n  --root DIR  --log FILE  --log-format text|json  --debug  --systemd-cgroup\n"
            "  --rootless VALUE  --version  --help\n"
            "docs/oci.md tells what of config.json is honoured.\n")


def main_runtime(argv: list[str] | None = None) -> int:
    """``bin/mesobox-oci``: the error boundary of its own (cli/__init__.py's for ``mesobox oci``)."""
    return run_cli(list(sys.argv[1:] if argv is None else argv), None)


def main_oci(argv: list[str], config: Config) -> int:
    """``mesobox oci …``: the same command line; its help is the option table's
    (cli/table.py), as every verb's."""
    from mesobox.oci import log

    log.prog = "mesobox"
    if argv[:1] in (["--help"], ["-h"]) or argv[1:2] in (["--help"], ["-h"]):
        from mesobox.cli import table
        from mesobox.cli.usage import help_text as table_help

        path = f"oci {argv[0]}" if argv[0] not in ("--help", "-h") and table.find(f"oci {argv[0]}") else "oci"
        sys.stdout.write(table_help(path))
        return 0
    return run_cli(argv, config)


def run_cli(argv: list[str], config: Config | None) -> int:
    from mesobox.oci import log

    debug = False
    try:
        values, rest = parse_options(_GLOBAL, argv, "mesobox-oci", stop_at_argument=True)
        log.setup(values.get("log"), values.get("log-format", "text"))
        if values.get("log-format", "text") not in ("text", "json"):
            raise UsageError(f"unknown --log-format {values['log-format']!r}: text or json")
        if values.get("rootless", "auto") not in ("true", "false", "auto"):
            raise UsageError(f"bad --rootless {values['rootless']!r}: true, false or auto")
        debug = bool(values.get("debug"))
        if values.get("version"):
            from mesobox import __version__
            from mesobox.oci.state import OCI_VERSION

            sys.stdout.write(f"mesobox-oci version {__version__}\nspec: {OCI_VERSION}\n")
            return 0
        if values.get("help") or not rest or rest[0] == "help":
            sys.stdout.write(help_text(rest[1] if len(rest) > 1 else None))
            return 0 if values.get("help") or rest else 2
        if config is None:
            from mesobox.config import load_config

            _default_home()
            config = load_config()
        if debug:
            config = config.replace(debug=True)
        return _verb(rest[0], rest[1:], values, config)
    except MesoboxError as err:
        if debug:
            import traceback

            traceback.print_exc()
        log.error(err.message, err.hint)
        return err.exit_code
    except OSError as err:
        from mesobox.errors import os_error_text

        log.error(os_error_text(err))
        return 1
    except KeyboardInterrupt:
        return 130


def _default_home() -> None:
    """conmon runs ``start`` and ``delete`` without HOME: the user's configuration is
    that of the user who runs podman (paths.outer_uid: root of podman's rootless user
    namespace is that user), never root's, which ~ would name and mesobox may not read."""
    if os.environ.get("HOME"):
        return
    import pwd

    from mesobox.paths import outer_uid

    try:
        os.environ["HOME"] = pwd.getpwuid(outer_uid()).pw_dir
    except KeyError:
        os.environ["HOME"] = "/"


def _verb(verb: str, argv: list[str], globals_: dict[str, Any], config: Config) -> int:
    from mesobox.oci import runtime
    from mesobox.oci.state import default_root

    if verb not in _VERBS:
        raise UsageError(f"unknown oci verb {verb!r}", hint="mesobox-oci --help lists them")
    if "--help" in argv or "-h" in argv[:1]:
        sys.stdout.write(help_text(verb))
        return 0
    values, args = parse_options(_VERBS[verb], argv, verb, stop_at_argument=verb in ("exec", "ps"))
    usage, least, most, _ = _USAGE[verb]
    if len(args) < least or (most >= 0 and len(args) > most):
        raise UsageError(f"{verb}: expected {usage or 'no arguments'}, got {' '.join(args) or 'none'}",
                         hint=f"usage: mesobox-oci {verb} [OPTIONS] {usage}")
    root = globals_.get("root") or default_root(config.runtime_dir_str)
    if not os.path.isabs(root):
        root = os.path.abspath(root)
    rt = runtime.Runtime(root, config, systemd_cgroup=bool(globals_.get("systemd-cgroup")))
    handler = _HANDLERS.get(verb)
    if handler is None:
        raise UsageError(f"{verb} is not supported by mesobox-oci", hint="docs/oci.md lists what is")
    return handler(rt, values, args)


def _preserve(values: dict[str, Any]) -> int:
    text = values.get("preserve-fds", "0")
    if not str(text).isdigit():
        raise UsageError(f"bad --preserve-fds {text!r}: a number of fds")
    return int(text)


def _bundle(verb: str, values: dict[str, Any]) -> str:
    """--bundle, by default the current directory (runc's rule), which must then be one."""
    if values.get("bundle"):
        return str(values["bundle"])
    here = os.getcwd()
    if not os.path.exists(os.path.join(here, "config.json")):
        raise UsageError(f"{verb} needs --bundle DIR: the current directory {here} has no config.json")
    return here


def _create(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    runtime.create(rt, args[0], _bundle("create", values), values.get("pid-file"),
                   values.get("console-socket"), _preserve(values))
    return 0


def _run(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    return runtime.run(rt, args[0], _bundle("run", values), values.get("pid-file"),
                       bool(values.get("detach")), values.get("console-socket"), _preserve(values))


def _start(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    runtime.start(rt, args[0])
    return 0


def _state(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.cli import print_json
    from mesobox.oci import runtime

    print_json(runtime.state(rt, args[0]))
    return 0


def signal_number(text: str) -> int:
    """``9``, ``KILL``, ``SIGKILL``, ``sigkill``: the number (runc's parsing)."""
    if text.isdigit():
        number = int(text)
        if not 0 < number < signal.NSIG:
            raise UsageError(f"bad signal number {text}")
        return number
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {text!r}") from None


def _kill(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    runtime.kill(rt, args[0], signal_number(args[1] if len(args) > 1 else "SIGTERM"), bool(values.get("all")))
    return 0


def _delete(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    for container_id in args:
        runtime.delete(rt, container_id, bool(values.get("force")))
    return 0


def _exec(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    if values.get("process"):
        if len(args) > 1:
            raise UsageError("exec: give the command either after the id or in --process, not both")
        try:
            with open(values["process"], "rb") as f:
                process: dict[str, Any] = json.loads(f.read())
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read --process {values['process']}: {err}") from None
        if not isinstance(process, dict):
            raise UsageError(f"--process {values['process']}: not a process object")
    else:
        record = rt.container(args[0]).record()
        base = record.get("process") or {}
        process = {"args": args[1:], "env": list(base.get("env") or ()), "cwd": base.get("cwd", "/"),
                   "user": dict(base.get("user") or {}), "terminal": bool(values.get("tty"))}
    if values.get("env"):
        process["env"] = [*process.get("env", []), *values["env"]]
    if values.get("cwd"):
        process["cwd"] = values["cwd"]
    if values.get("user"):
        uid, _, gid = values["user"].partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise UsageError(f"bad --user {values['user']!r}: UID[:GID], numbers")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if values.get("additional-gids"):
        process.setdefault("user", {})["additionalGids"] = [int(g) for g in values["additional-gids"]]
    if values.get("tty"):
        process["terminal"] = True
    if values.get("cap"):
        raise UsageError("exec --cap is not supported: a process exec'd runs with the container's user "
                         "namespace capabilities", hint="docs/oci.md, exec")
    return runtime.exec_process(rt, args[0], process, bool(values.get("detach")), values.get("pid-file"),
                                values.get("console-socket"))


def _ps(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    import subprocess

    from mesobox.cli import print_json
    from mesobox.oci import runtime

    pids = runtime.pids(rt, args[0])
    fmt = values.get("format", "table")
    if fmt == "json":
        print_json(pids)
        return 0
    if fmt != "table":
        raise UsageError(f"unknown --format {fmt!r}: table or json")
    out = subprocess.run(["ps", *(args[1:] or ["-ef"])], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise LaunchError(f"ps failed: {out.stderr.strip()[:200]}")
    lines = out.stdout.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise UsageError("ps: the ps arguments must show a PID column")
    column = header.index("PID")
    sys.stdout.write(lines[0] + "\n")
    wanted = {str(p) for p in pids}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column] in wanted:
            sys.stdout.write(line + "\n")
    return 0


def _list(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.cli import print_json
    from mesobox.oci import runtime

    items = runtime.listing(rt)
    fmt = values.get("format", "table")
    if values.get("quiet"):
        sys.stdout.write("".join(f"{item['id']}\n" for item in items))
    elif fmt == "json":
        print_json(items)
    elif fmt == "table":
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(i["id"], str(i["pid"]), i["status"], i["bundle"], i["created"], i["owner"]) for i in items]
        widths = [max(len(row[n]) for row in rows) for n in range(6)]
        for row in rows:
            sys.stdout.write("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    else:
        raise UsageError(f"unknown --format {fmt!r}: table or json")
    return 0


def _pause(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    runtime.pause(rt, args[0], True)
    return 0


def _resume(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci import runtime

    runtime.pause(rt, args[0], False)
    return 0


def _features(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.cli import print_json
    from mesobox.oci.features import features

    print_json(features())
    return 0


def _spec(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci.features import write_default_config

    write_default_config(values.get("bundle") or os.getcwd(), bool(values.get("rootless")))
    return 0


def _criu_options(values: dict[str, Any]) -> tuple[str, ...]:
    from mesobox.oci.checkpoint import criu_options

    return criu_options({name for name, on in values.items() if on is True}, values.get("manage-cgroups-mode"))


def _checkpoint(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci.checkpoint import checkpoint

    checkpoint(rt, args[0], values.get("image-path"), values.get("work-path"), bool(values.get("leave-running")),
               _criu_options(values))
    return 0


def _restore(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from mesobox.oci.checkpoint import restore

    if values.get("console-socket"):
        raise UsageError("restore --console-socket is not supported: CRIU restores the terminal it dumped",
                         hint="checkpoint with --shell-job to keep a terminal job")
    return restore(rt, args[0], _bundle("restore", values), values.get("image-path"), values.get("work-path"),
                   bool(values.get("detach")), values.get("pid-file"), _criu_options(values))


def _update(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    from pathlib import Path

    from mesobox.oci import runtime

    resources: dict[str, Any] = {}
    source = values.get("resources")
    if source:
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
            resources = json.loads(text)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read --resources {source}: {err}") from None
        if not isinstance(resources, dict):
            raise UsageError(f"--resources {source}: not a linux.resources JSON object")
    for flag, (section, key, size) in _UPDATE_FLAGS.items():
        value = values.get(flag)
        if value is None:
            continue
        if size is None:
            parsed: Any = value
        elif size:
            from mesobox.sizes import parse_size

            parsed = -1 if value == "-1" else parse_size(value, f"--{flag}")
        else:
            try:
                parsed = int(value)
            except ValueError:
                raise UsageError(f"--{flag} takes a number, not {value!r}") from None
        resources.setdefault(section, {})[key] = parsed
    if not resources:
        raise UsageError("update needs --resources FILE or a limit flag (--memory, --pids-limit, …)")
    runtime.update(rt, args[0], resources)
    return 0


def _unsupported(rt: Runtime, values: dict[str, Any], args: list[str]) -> int:
    raise UsageError("this verb is not supported by mesobox-oci yet", hint="docs/oci.md lists what is")


_HANDLERS = {"create": _create, "run": _run, "start": _start, "state": _state, "kill": _kill,
             "delete": _delete, "exec": _exec, "ps": _ps, "list": _list, "pause": _pause, "resume": _resume,
             "features": _features, "spec": _spec, "checkpoint": _checkpoint, "restore": _restore,
             "events": _unsupported, "update": _update}
