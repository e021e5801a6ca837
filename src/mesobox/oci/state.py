"""mesobox-oci's container state: one private directory per container under ``--root``.

Layout (runc's, in spirit): ``ROOT/ID/state.json`` holds what ``create`` learnt — the
container process's pid and kernel start time, the bundle, the config's lifecycle hooks
that the runtime itself runs (prestart, createRuntime, poststart, poststop), the
creation time, the owner — and ``ROOT/ID/exec.fifo`` exists from ``create`` until
``start``: the container's process waits on it (launch/execute.py ``start_fifo``).

Status is derived, never stored (there is no monitor process to update it):
- ``stopped``: the recorded (pid, start time) no longer names a live process (a reused
  pid is not the container: procs.same_process);
- ``created``: it lives and exec.fifo is still there;
- ``paused``: it lives and ``paused`` is recorded (``pause``: SIGSTOP of its tree);
- ``running``: otherwise.

Security: ROOT is trusted only as paths.runtime_dir trusts a runtime dir (the caller's
own, mode 0700 or tightened to it, never a symlink at its last component, in parents
nobody else may rename in).  ``ROOT/ID`` is made exclusively (an existing one means the
id is taken) and read back only if it is a private directory of the caller's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

from mesobox import paths
from mesobox.errors import LaunchError, UsageError
from mesobox.files import write_atomic
from mesobox.procs import same_process, start_time

OCI_VERSION = "1.0.2"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
FIFO = "exec.fifo"
STATE = "state.json"
RUNTIME_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")  # run by the runtime, outside


def check_id(container_id: str) -> str:
    if not _ID_RE.match(container_id):
        raise UsageError(f"invalid container id {container_id!r}",
                         hint="use letters, digits and . _ + - (at most 128 characters)")
    return container_id


def default_root(runtime_dir: str) -> str:
    """runc's convention: /run/mesobox-oci for real root, $XDG_RUNTIME_DIR/mesobox-oci
    for a user who has one, else ``oci`` in mesobox's own private runtime dir (by
    default /tmp/mesobox-UID: paths.default_runtime_dir)."""
    from mesobox.launch.identity import is_real_root

    if is_real_root():
        return "/run/mesobox-oci"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "mesobox-oci")
    return os.path.join(runtime_dir, "oci")


class Container:
    """The one owner of ``ROOT/ID``."""

    def __init__(self, root: str, container_id: str) -> None:
        self.id = check_id(container_id)
        self.root = root
        self.path = os.path.join(root, self.id)
        self.fifo = os.path.join(self.path, FIFO)

    # --- the directory ---------------------------------------------------------------

    def _root_exists(self) -> bool:
        """The root, checked private; False when it does not exist.  A query, kill or
        delete never creates it (slurmstepd runs them as root too)."""
        if not os.path.lexists(self.root):
            return False
        paths.runtime_dir(self.root)  # private, or refused
        return True

    def claim(self) -> None:
        """Make ``ROOT/ID`` (and ROOT if need be) for a new container; an existing one
        is refused, stopped or not: runc's "container with id exists"."""
        paths.runtime_dir(self.root)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            raise LaunchError(f"container {self.id!r} already exists",
                              hint=f"delete it first: mesobox-oci delete {self.id}") from None

    def make_fifo(self) -> None:
        os.mkfifo(self.fifo, 0o600)

    def _private(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_mode & 0o170000) != 0o040000 or not paths.own(st):
            raise UsageError(f"{self.path} is not a private directory of yours: refusing to use it")
        return True

    def exists(self) -> bool:
        return self._root_exists() and self._private() and os.path.exists(os.path.join(self.path, STATE))

    def remove(self) -> None:
        if self._root_exists() and self._private():
            shutil.rmtree(self.path, ignore_errors=True)

    # --- the record ------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        write_atomic(os.path.join(self.path, STATE), (json.dumps(record) + "\n").encode(), mode=0o600)

    def record(self) -> dict[str, Any]:
        if not self.exists():
            raise UsageError(f"container {self.id!r} does not exist")
        fd = os.open(os.path.join(self.path, STATE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            try:
                data: dict[str, Any] = json.loads(f.read(paths.MAX_BYTES))
            except ValueError:
                raise UsageError(f"container {self.id!r} has a damaged state file",
                                 hint=f"delete it: mesobox-oci delete --force {self.id}") from None
        return data

    def status(self, record: dict[str, Any]) -> str:
        pid = int(record.get("pid") or 0)
        if not same_process(pid, record.get("started")):
            return "stopped"
        if os.path.lexists(self.fifo):
            return "created"
        return "paused" if record.get("paused") else "running"

    def state(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """runtime.md's state object (what ``state`` prints and hooks read)."""
        record = self.record() if record is None else record
        status = self.status(record)
        return {"ociVersion": OCI_VERSION, "id": self.id, "status": status,
                "pid": int(record.get("pid") or 0) if status != "stopped" else 0,
                "bundle": record["bundle"], "annotations": record.get("annotations") or {}}


def new_record(bundle: str, pid: int, annotations: dict[str, str], hooks: dict[str, Any]) -> dict[str, Any]:
    """state.json of a container whose process is ``pid``: its start time makes the
    pair an identity that a reused pid cannot fake."""
    return {"pid": pid, "started": start_time(pid), "bundle": bundle, "annotations": annotations,
            "hooks": {kind: hooks[kind] for kind in RUNTIME_HOOKS if hooks.get(kind)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "owner": _owner()}


def _owner() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def list_ids(root: str) -> list[str]:
    """The container ids under ``root`` (none when it does not exist)."""
    if not os.path.lexists(root):
        return []
    paths.runtime_dir(root)
    return sorted(name for name in os.listdir(root) if _ID_RE.match(name))
