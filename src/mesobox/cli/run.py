"""CLI wiring for ``mesobox run``, ``exec`` and ``shell`` (the hot path).

A hand-rolled option parser instead of argparse: argparse (+ its gettext/re imports)
costs more than half of the ≈20 ms start-up budget (measured: ≈19 ms with json).  Grammar:
short and long options, ``--opt=value`` and ``--opt value``, ``-Bvalue``; repeatable
``-B/-e/--env-file/--security-opt/--cap-add/--cap-drop/-p``; ``--`` ends the options;
options stop at the IMAGE positional (everything after it is the command).
"""

from __future__ import annotations

import sys

from mesobox.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config

# option -> (RunOptions field, kind); kind: "flag", "value", "list"
OPTIONS: dict[str, tuple[str, str]] = {
    "-B": ("binds", "list"), "--bind": ("binds", "list"),
    "-e": ("env", "list"), "--env": ("env", "list"), "--env-file": ("env_files", "list"),
    "-w": ("workdir", "value"), "--workdir": ("workdir", "value"), "--pwd": ("workdir", "value"),
    "-c": ("contain", "flag"), "--contain": ("contain", "flag"), "--cleanenv": ("cleanenv", "flag"),
    "--fakeroot": ("fakeroot", "flag"), "--host-root": ("host_root", "flag"), "--entrypoint": ("entrypoint", "value"),
    "--writable-tmpfs": ("writable_tmpfs", "optional"), "--overlay": ("overlay", "value"),
    "--pid": ("pid", "flag"), "--ipc": ("ipc", "flag"), "--uts": ("uts", "flag"),
    "--hostname": ("hostname", "value"), "--net": ("net", "value"), "--network": ("net", "value"),
    "-m": ("memory", "value"), "--memory": ("memory", "value"), "--cpus": ("cpus", "value"),
    "--pids-limit": ("pids_limit", "value"), "--security-opt": ("security_opts", "list"),
    "--cpuset-cpus": ("cpuset_cpus", "value"),
    "--io-read-bps": ("io_read_bps", "list"), "--io-write-bps": ("io_write_bps", "list"),
    "--io-read-iops": ("io_read_iops", "list"), "--io-write-iops": ("io_write_iops", "list"),
    "--cap-add": ("cap_add", "list"), "--cap-drop": ("cap_drop", "list"),
    "-p": ("publish", "list"), "--publish": ("publish", "list"),
    "--mpi": ("mpi", "value"),  # mesobox.launch.hostmpi; popped before RunOptions
}

HELP = """\
usage: mesobox {verb} [OPTIONS] IMAGE {rest}

IMAGE: a directory rootfs, a squashfs file, a stored reference, or docker://REF (pulled if missing).

  -B, --bind SRC[:DST[:ro|rw]]  bind a host path (repeatable, comma lists ok; always nosuid,nodev)
  -c, --contain             no default binds ($HOME, working directory, /tmp, site binds)
  -e, --env K=V | K         set a variable (K alone copies the host's); repeatable
      --env-file FILE       KEY=VALUE lines; repeatable
      --cleanenv            do not pass the host environment through
  -w, --workdir DIR         working directory inside
      --entrypoint CMD      replace the image Entrypoint (run only; "" clears it)
      --fakeroot            be uid 0 inside (files you write stay yours on the host)
      --host-root           (real root only) container root is host root; default: a sub-id range
      --writable-tmpfs[=SIZE]  writable root: changes in a tmpfs capped at SIZE, then discarded
      --overlay DIR|FILE    writable root: changes kept in DIR, or in an ext4 image FILE with a
                            size quota (`mesobox overlay create FILE SIZE`; mounting it needs root)
      --pid, --ipc, --uts   new pid / IPC / UTS namespace
      --hostname NAME       hostname inside (implies --uts)
      --net host|none|slirp network (default host)
  -p, --publish HOST:CTR    with --net slirp: forward a host port
  -m, --memory SIZE, --cpus N, --pids-limit N   cgroup limits
  --cpuset-cpus LIST                            CPUs the workload may use (e.g. 0-1)
  --io-read-bps/--io-write-bps DEV:RATE         block I/O rate limits (repeatable; also -iops)
      --security-opt seccomp=default|unconfined|FILE
      --cap-add CAP, --cap-drop CAP   adjust Docker's default set (uid 0 inside); ALL allowed
      --mpi host            bind the host's MPI (libmpi and its libraries) into the container
      --debug               print the mount plan (also: mesobox --debug {verb} ...)
  -h, --help                this text
"""


def parse(verb: str, argv: list[str]) -> dict[str, Any]:
    """argv → RunOptions keyword arguments (plus "help")."""
    values: dict[str, Any] = {"mode": verb}
    lists: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            i -= 1
            break
        if arg in ("-h", "--help"):
            return {"help": True}
        if arg == "--debug":
            values["debug"] = True
            continue
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg[:2], "", arg[2:])
        if not arg.startswith("--") and inline:
            eq = "="
        if name not in OPTIONS:
            raise UsageError(f"unknown option {arg}", hint=f"mesobox {verb} --help lists the options")
        field, kind = OPTIONS[name]
        if kind == "flag":
            if eq:
                raise UsageError(f"{name} takes no value")
            values[field] = True
            continue
        if kind == "optional":
            values[field] = inline if eq else ""
            continue
        if not eq:
            if i >= len(argv):
                raise UsageError(f"{name} needs a value")
            inline = argv[i]
            i += 1
        if kind == "list":
            lists.setdefault(field, []).append(inline)
        else:
            values[field] = inline
    rest = argv[i:]
    if not rest:
        raise UsageError(f"{verb}: no image given", hint=f"mesobox {verb} [OPTIONS] IMAGE ...")
    values["image"], values["args"] = rest[0], tuple(rest[1:])
    values.update({k: tuple(v) for k, v in lists.items()})
    return values


def _main(verb: str, argv: list[str], config: Config) -> int:
    values = parse(verb, argv)
    if values.get("help"):
        rest = {"run": "[ARGS...]", "exec": "CMD [ARGS...]", "shell": "[ARGS...]"}[verb]
        sys.stdout.write(HELP.format(verb=verb, rest=rest))
        return 0
    if values.pop("debug", False):
        config = config.replace(debug=True)
    mpi = values.pop("mpi", None)
    if values.get("writable_tmpfs") is not None:
        from mesobox.sizes import parse_size

        text = values["writable_tmpfs"]
        values["writable_tmpfs"] = parse_size(text, "--writable-tmpfs") if text else 0
    if verb != "run" and values.get("entrypoint") is not None:
        raise UsageError("--entrypoint is for `mesobox run`")
    from mesobox.launch.launcher import launch
    from mesobox.launch.specbuild import RunOptions, find_image, make_spec

    image = find_image(values["image"], config)
    if mpi is not None:
        from mesobox.launch import probe
        from mesobox.launch.hostmpi import with_host_mpi

        probe.untracked()  # the host's MPI libraries are not recorded (plancache.py)

        values = with_host_mpi(values, mpi, image.path)
    opts = RunOptions(**values)
    spec = make_spec(opts, config, image)
    if opts.host_root:
        from mesobox.launch.identity import HOST_ROOT_WARNING

        sys.stderr.write(HOST_ROOT_WARNING)
    if config.debug:
        sys.stderr.write(f"mesobox: spec: {spec!r}\n")
    return launch(spec, config)


def main_run(argv: list[str], config: Config) -> int:
    return _main("run", argv, config)


def main_exec(argv: list[str], config: Config) -> int:
    return _main("exec", argv, config)


def main_shell(argv: list[str], config: Config) -> int:
    return _main("shell", argv, config)
