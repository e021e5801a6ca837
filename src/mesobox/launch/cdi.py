"""CDI room: Container Device Interface specs → the binds and environment a
``--device vendor.com/class=name`` (or ``=all``) asks for.

A site (or a driver's installer: ``nvidia-ctk cdi generate``) describes a device in a
spec file, JSON or YAML, under the directories of the ``cdi_spec_dirs`` setting
(/etc/cdi, then /var/run/cdi: a later directory's device of the same name wins, as the
CDI spec gives the dynamic directory priority).  Spec versions 0.5.0 to 0.8.0 are read.

Imported only when a CDI name is on the command line: never on the hot path, and the
YAML parser (PyYAML) only when a .yaml/.yml spec is read.  Every host read goes
through probe.py (the directory listing, each spec file's identity before it is read),
so a saved launch program notices a spec that changed.

What the edits become, for an ordinary user who cannot mknod:

- ``deviceNodes``: the host's node (``hostPath``, by default ``path``) is bound at
  ``path``, nosuid but not nodev, exactly as ``--device`` binds one.
- ``mounts``: bind mounts, nosuid and nodev, read-only when the options say ``ro``.
  Their sources obey ``allowed_bind_sources`` as ``-B`` binds do: a spec directory a
  user points the setting at grants nothing ``-B`` and ``--device`` would not.
- ``env``: KEY=VALUE, over the image's Env, under --env-file and -e.
- ``hooks``: createContainer and startContainer hooks become ``Spec.hooks`` entries,
  run by the launch as the OCI runtime spec says (program.py, execute.py); ``nvidia-ctk``'s
  update-ldcache and create-symlinks write into the root, so specbuild.py gives such a
  container a writable root (--writable-tmpfs), as Apptainer's --nvccli does.  A
  prestart, createRuntime, poststart or poststop hook is refused in one line naming it.
- ``additionalGIDs``, ``intelRdt`` and ``netDevices`` are refused with one line for a
  device that asks for them: ignoring one would leave a container that looks right and
  fails.

A spec names programs the launch runs and files it binds, so only a spec nobody else
could have written is used: the file must belong to root or to the caller and be
writable by nobody else, and so must every directory on the way to it (a sticky one,
such as /tmp, excepted: others cannot replace what is in it).  Any other spec is
treated as a broken one.

A spec file that cannot be read or parsed is an error only when a device of its kind
(when it can tell) is asked for; otherwise it is a warning.
"""

from __future__ import annotations

import json
import os
import re

from mesobox.errors import UsageError
from mesobox.launch import probe
from mesobox.launch.binds import check_source, device_bind, require_allowed
from mesobox.oci import spec as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config

VERSIONS = ("0.5.0", "0.6.0", "0.7.0", "0.8.0")
SPEC_SUFFIXES = (".json", ".yaml", ".yml")
MAX_SPEC_BYTES = 4 << 20
# The CDI spec's grammar of a fully qualified device name: vendor (domain-like) / class = name.
_VENDOR = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
_CLASS = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?"
KIND_RE = re.compile(rf"^{_VENDOR}/{_CLASS}$")
NAME_RE = re.compile(rf"^{_NAME}$")
UNSUPPORTED = ("additionalGIDs", "intelRdt", "netDevices")
RUN_HOOKS = ("createContainer", "startContainer")  # the kinds mesobox run runs (Spec.hooks)
LATER_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
HINT = "use --device VENDOR/CLASS=NAME (or =all), as named in a spec under the cdi_spec_dirs directories"


class Edits:
    """What CDI devices add to a container: bind mounts (device nodes included),
    KEY=VALUE environment entries and (kind, hook) pairs, in the order the specs give
    them."""

    __slots__ = ("env", "hooks", "mounts")

    def __init__(self, mounts: tuple[S.Mount, ...] = (), env: tuple[str, ...] = (),
                 hooks: tuple[tuple[str, S.Hook], ...] = ()) -> None:
        self.mounts = mounts
        self.env = env
        self.hooks = hooks


class _Spec:
    """One parsed spec file: its kind, top-level edits and devices by name."""

    def __init__(self, path: str, kind: str, edits: dict[str, Any], devices: dict[str, dict[str, Any]]) -> None:
        self.path, self.kind, self.edits, self.devices = path, kind, edits, devices


def cdi_edits(names: list[str], config: Config) -> Edits:
    """The mounts and environment of the CDI devices ``names`` (``vendor/class=name`` or
    ``vendor/class=all``), from the specs under ``config.cdi_spec_dirs``.

    Raises UsageError (one line) for a malformed name, an unknown device, a broken spec
    of a requested kind, a missing host node or mount source, or an edit mesobox cannot
    apply (hooks); PolicyError for a source outside ``allowed_bind_sources``."""
    wanted = [_parse_name(text) for text in names]
    specs, broken = _load(tuple(config.cdi_spec_dirs))
    # A later spec directory wins for the same (kind, device): the dynamic one overrides.
    by_kind: dict[str, list[_Spec]] = {}
    for spec in specs:
        by_kind.setdefault(spec.kind, []).append(spec)
    chosen: list[tuple[_Spec, str]] = []
    for kind, device in wanted:
        if kind in broken:
            raise UsageError(broken[kind], hint="fix or remove the spec file")
        found = _devices(by_kind.get(kind, []), kind, device, broken)
        chosen += [pair for pair in found if pair not in chosen]
    for message in sorted(set(broken.values())):
        from mesobox.console import warn

        warn(message)
    mounts: list[S.Mount] = []
    env: list[str] = []
    hooks: list[tuple[str, S.Hook]] = []
    applied: set[str] = set()
    allowed = tuple(config.allowed_bind_sources)
    for spec, device in chosen:
        sources = ([spec.edits] if spec.path not in applied else []) + [spec.devices[device]]
        applied.add(spec.path)  # a spec's own edits once, however many of its devices
        for edits in sources:
            _refuse_unsupported(edits, spec, device)
            mounts += [_node_mount(node, spec, allowed) for node in edits.get("deviceNodes") or ()]
            mounts += [_bind_mount(mount, spec, config) for mount in edits.get("mounts") or ()]
            env += list(edits.get("env") or ())
            hooks += [_hook(hook, spec, device) for hook in edits.get("hooks") or ()]
    return Edits(tuple(mounts), tuple(env), tuple(hooks))


def kind_devices(kind: str, config: Config) -> tuple[str, ...] | None:
    """The device names the specs under ``config.cdi_spec_dirs`` give for ``kind``, or
    None when no spec file is of that kind (gpu.py: --nv through the site's spec).  A
    broken or untrusted spec of that kind counts, with no names: using it then fails in
    one line, rather than silently taking another path."""
    specs, broken = _load(tuple(config.cdi_spec_dirs))
    names = {name for spec in specs if spec.kind == kind for name in spec.devices}
    if not names and kind not in broken:
        return None
    return tuple(sorted(names))


def _parse_name(text: str) -> tuple[str, str]:
    kind, _, device = text.partition("=")
    if not KIND_RE.match(kind) or not (device == "all" or NAME_RE.match(device)):
        raise UsageError(f"bad CDI device name {text!r}", hint=HINT)
    return kind, device


def _devices(specs: list[_Spec], kind: str, device: str, broken: dict[str, str]) -> list[tuple[_Spec, str]]:
    latest: dict[str, _Spec] = {}
    for spec in specs:  # in directory order: the last one wins
        for name in spec.devices:
            latest[name] = spec
    if device == "all":
        if not latest:
            raise UsageError(f"no CDI spec describes devices of kind {kind}", hint=_unknown_hint(broken))
        if "all" in latest:  # nvidia-ctk writes an "all" device of its own: it is the spec's word for all
            return [(latest["all"], "all")]
        return [(spec, name) for name, spec in latest.items()]
    if device not in latest:
        raise UsageError(f"unknown CDI device {kind}={device}", hint=_unknown_hint(broken, latest))
    return [(latest[device], device)]


def _unknown_hint(broken: dict[str, str], known: dict[str, _Spec] | None = None) -> str:
    if "" in broken:  # a spec whose kind could not be read might have described it
        return broken[""]
    if known:
        return "known devices of this kind: " + ", ".join(sorted(known))
    return "the spec directories are those of the cdi_spec_dirs setting"


# --- reading the spec files ----------------------------------------------------------------


def _load(dirs: tuple[str, ...]) -> tuple[list[_Spec], dict[str, str]]:
    """Every spec of the spec directories, in order, and the one-line error of each
    broken one by its kind ("" when the kind itself could not be read)."""
    specs: list[_Spec] = []
    broken: dict[str, str] = {}
    distrust: dict[str, str | None] = {}  # directory → why it is not trusted
    for directory in dirs:
        for entry in probe.listdir(directory):
            if not entry.endswith(SPEC_SUFFIXES) or entry.startswith("."):
                continue
            path = os.path.join(directory, entry)
            kind = ""
            try:
                document, owner = _read(path)
                kind = document.get("kind", "") if isinstance(document, dict) else ""
                folder = os.path.dirname(os.path.realpath(path))
                if folder not in distrust:
                    distrust[folder] = _untrusted_directory(folder)
                if owner or distrust[folder]:
                    raise _Broken(f"is not trusted: {owner or distrust[folder]}")
                specs.append(_validate(path, document))
            except _Broken as err:
                kind = kind if isinstance(kind, str) else ""
                broken.setdefault(kind, f"CDI spec {path}: {err}")
    return specs, broken


class _Broken(Exception):
    """Why a spec file cannot be used."""


def _read(path: str) -> tuple[Any, str | None]:
    """(the parsed document, why its file is not trusted or None)."""
    if probe.file_identity(path) is None:
        raise _Broken("not a regular file")
    try:
        with open(path, "rb") as f:
            # The file read, not the name: its owner and mode (a change of either moves
            # the ctime that probe.file_identity recorded).
            owner = _untrusted_file(os.fstat(f.fileno()), "the file")
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise _Broken(f"cannot be read ({err.strerror})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise _Broken("is too large")
    try:
        text = data.decode()
        if path.endswith(".json"):
            return json.loads(text), owner
        import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints

        return yaml.safe_load(text), owner
    except (UnicodeDecodeError, ValueError) as err:
        raise _Broken(f"cannot be parsed ({_first_line(err)})") from None
    except Exception as err:  # yaml.YAMLError: its module is imported here only
        raise _Broken(f"cannot be parsed ({_first_line(err)})") from None


def _untrusted_file(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with this status could have been written by someone other
    than root or the caller, or None."""
    import stat

    if st.st_uid not in (0, os.getuid()):
        return f"{what} belongs to uid {st.st_uid} (a spec must be root's or yours)"
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _untrusted_directory(folder: str) -> str | None:
    """Why someone other than root or the caller could replace what ``folder`` (a real
    path) holds: it or a directory above it is theirs, or writable by them and not
    sticky.  These stat(2)s are not recorded questions (probe.py), and need not be: a
    directory that becomes writable later lets others add or replace a spec, which
    changes a recorded listing or file identity, so a saved launch compiles anew and
    checks again."""
    path = "/"
    for part in [""] + [p for p in folder.split("/") if p]:
        path = os.path.join(path, part)
        try:
            problem = _untrusted_file(os.stat(path), f"directory {path}")
        except OSError as err:
            return f"directory {path} cannot be checked ({err.strerror})"
        if problem:
            return problem
    return None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _validate(path: str, document: Any) -> _Spec:
    if not isinstance(document, dict):
        raise _Broken("is not a mapping")
    version = document.get("cdiVersion")
    if version not in VERSIONS:
        raise _Broken(f"cdiVersion {version!r} is not supported (supported: {', '.join(VERSIONS)})")
    kind = document.get("kind")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise _Broken(f"bad kind {kind!r} (VENDOR/CLASS)")
    devices = document.get("devices")
    if not isinstance(devices, list) or not devices:
        raise _Broken("has no devices")
    named: dict[str, dict[str, Any]] = {}
    for device in devices:
        name = device.get("name") if isinstance(device, dict) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _Broken(f"bad device name {name!r}")
        if name in named:
            raise _Broken(f"device {name!r} is described twice")
        named[name] = _check_edits(device.get("containerEdits"), f"device {name}")
    return _Spec(path, kind, _check_edits(document.get("containerEdits") or {}, "containerEdits"), named)


def _check_edits(edits: Any, where: str) -> dict[str, Any]:
    """The shape of a containerEdits mapping, checked so that applying it cannot fail
    on a wrong type."""
    if not isinstance(edits, dict):
        raise _Broken(f"{where}: containerEdits is missing or not a mapping")
    env = edits.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e and not e.startswith("=") for e in env):
        raise _Broken(f"{where}: env must be a list of KEY=VALUE")
    for key, required in (("deviceNodes", "path"), ("mounts", "containerPath")):
        items = edits.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get(required), str)
                                                 for i in items):
            raise _Broken(f"{where}: each of {key} needs a {required}")
    for mount in edits.get("mounts") or []:
        options = mount.get("options") or []
        if not isinstance(mount.get("hostPath"), str) or not isinstance(options, list) \
                or not all(isinstance(o, str) for o in options):
            raise _Broken(f"{where}: each mount needs a hostPath and a list of options")
    hooks = edits.get("hooks") or []
    if not isinstance(hooks, list):
        raise _Broken(f"{where}: hooks must be a list")
    for hook in hooks:
        _check_hook(hook, where)
    return edits


def _check_hook(hook: Any, where: str) -> None:
    if not isinstance(hook, dict) or hook.get("hookName") not in RUN_HOOKS + LATER_HOOKS:
        name = hook.get("hookName") if isinstance(hook, dict) else hook
        raise _Broken(f"{where}: bad hookName {name!r} (one of {', '.join(RUN_HOOKS + LATER_HOOKS)})")
    path, timeout = hook.get("path"), hook.get("timeout")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise _Broken(f"{where}: a hook needs an absolute path, not {path!r}")
    for key in ("args", "env"):
        items = hook.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) and "\0" not in i for i in items):
            raise _Broken(f"{where}: hook {path}: {key} must be a list of strings")
    if not all("=" in e and not e.startswith("=") for e in hook.get("env") or []):
        raise _Broken(f"{where}: hook {path}: env must be a list of KEY=VALUE")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise _Broken(f"{where}: hook {path}: timeout must be a positive number of seconds")


# --- applying the edits ----------------------------------------------------------------------


def _hook(hook: dict[str, Any], spec: _Spec, device: str) -> tuple[str, S.Hook]:
    """A CDI hook as (OCI hook kind, Spec hook); one line for a kind not run yet."""
    kind = hook["hookName"]
    if kind not in RUN_HOOKS:
        raise UsageError(f"CDI device {spec.kind}={device}: {kind} hooks are not run by mesobox run yet "
                         f"({hook['path']}, spec {spec.path})",
                         hint="mesobox runs createContainer and startContainer hooks; ask the site for a spec "
                              "without " + kind + " hooks")
    return kind, S.Hook(path=hook["path"], args=tuple(hook.get("args") or ()), env=tuple(hook.get("env") or ()),
                        timeout=hook.get("timeout"))


def _refuse_unsupported(edits: dict[str, Any], spec: _Spec, device: str) -> None:
    for key in UNSUPPORTED:
        if edits.get(key):
            raise UsageError(f"CDI device {spec.kind}={device}: {key} are not supported yet ({spec.path})",
                             hint="mesobox applies deviceNodes, mounts and env; ask the site for a spec without "
                                  + key)


def _destination(path: str, spec: _Spec) -> str:
    if not os.path.isabs(path) or ".." in path.split("/") or os.path.normpath(path) == "/":
        raise UsageError(f"CDI spec {spec.path}: bad container path {path!r}",
                         hint="a container path is absolute, without '..'")
    return os.path.normpath(path)


def _node_mount(node: dict[str, Any], spec: _Spec, allowed: tuple[str, ...]) -> S.Mount:
    """A host device node bound as --device binds one (nosuid, not nodev)."""
    dst = _destination(node["path"], spec)
    host = node.get("hostPath") or node["path"]
    if not isinstance(host, str) or not os.path.isabs(host):
        raise UsageError(f"CDI spec {spec.path}: bad hostPath {host!r}")
    error = probe.stat_error(host)
    if error is not None:
        what = "does not exist" if error in ("ENOENT", "ENOTDIR") else f"cannot be reached ({error})"
        raise UsageError(f"CDI device node {host} {what} (spec {spec.path})",
                         hint="is the driver loaded on this node?")
    real = probe.realpath(host)
    kind = probe.node_type(real)
    wanted = node.get("type")
    if kind not in ("c", "b") or (wanted in ("c", "u", "b") and (wanted == "b") != (kind == "b")):
        raise UsageError(f"CDI device node {host} is not a {'block' if wanted == 'b' else 'character'} device "
                         f"(spec {spec.path})")
    # as --device: the site's rule holds for device nodes too
    require_allowed(real, allowed, f"CDI device node {host}", f" (spec {spec.path})")
    return device_bind(real, dst)


def _bind_mount(mount: dict[str, Any], spec: _Spec, config: Config) -> S.Mount:
    """A spec's mount: a bind, nosuid and nodev, checked as a -B source is."""
    dst = _destination(mount["containerPath"], spec)
    options = mount.get("options") or []
    if mount.get("type") not in (None, "", "bind") and not {"bind", "rbind"} & set(options):
        raise UsageError(f"CDI spec {spec.path}: mount type {mount.get('type')!r} is not supported yet",
                         hint="mesobox applies bind mounts")
    real = check_source(mount["hostPath"], tuple(config.allowed_bind_sources), "CDI mount source",
                        f" (spec {spec.path})")
    flags = ("rbind" if "rbind" in options else "bind", "nosuid", "nodev", "ro" if "ro" in options else "rw")
    return S.Mount(destination=dst, type="bind", source=real, options=flags)
