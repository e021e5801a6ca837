"""Root in a user namespace, for the build's file work (``podman unshare``'s idea).

A stage's rootfs holds files of many owners (root, Debian's ``_apt``, a service user):
inside a user namespace that maps the caller to 0 and their sub-id range to 1…, as
``mesobox run --fakeroot`` does (launch/identity.id_maps, newuidmap/newgidmap), those
files show their container ids, can be chowned to them, read whatever their mode, and
written into layers as the ids the image means.  Outside, a file of container uid N
belongs to sub-id base + N - 1 and the caller could not even read it.

``call(fn, *args)`` forks, puts the child in such a namespace (mount namespace
untouched: it sees the host's files) and runs ``fn`` there; its JSON-able result or
its error comes back through a pipe.  The maps are the ones RUN containers get, so ids
mean the same on both sides.  Without a sub-id range (or newuidmap) only the caller is
mapped: every file is root's, and a chown to another id fails (``single_id``).
Real root needs no namespace: ``fn`` runs in a forked child as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

from mesobox.errors import LaunchError, MesoboxError, UsageError

SINGLE_ID_NOTE = ("mesobox: note: you have no sub-id range in /etc/subuid and /etc/subgid (or newuidmap is "
                  "missing): RUN runs as root mapped to your own id only, every file of the image belongs to root, "
                  "and a step that changes a file's owner or switches user (apt-get's _apt, useradd, USER) fails; "
                  "ask the site for a sub-id range\n")


class Maps:
    """The id maps of the build's namespaces (those of ``run --fakeroot``)."""

    def __init__(self) -> None:
        from mesobox.launch import identity

        self.real_root = os.getuid() == 0
        name = _user_name()
        self.uid_maps, self.gid_maps, self.subids = identity.id_maps(os.getuid(), os.getgid(), True, name) \
            if not self.real_root else ((), (), False)

    @property
    def single_id(self) -> bool:
        return not self.real_root and not self.subids


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def call(maps: Maps, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as root of the build's user namespace; its result (JSON-able)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(ready_r)
        os.close(go_w)
        os.close(out_r)
        _child(maps, fn, args, ready_w, go_r, out_w)
    os.close(ready_w)
    os.close(go_r)
    os.close(out_w)
    try:
        if os.read(ready_r, 1) == b"u" and maps.subids:
            _write_subid_maps(maps, pid)
        os.write(go_w, b"g")
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    with os.fdopen(out_r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        answer = json.loads(data) if data else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise LaunchError(f"the build's user namespace helper failed (status {status})")
    if "error" in answer:
        kind = UsageError if answer.get("usage") else MesoboxError
        raise kind(str(answer["error"]), hint=answer.get("hint"))
    return answer.get("result")


def _child(maps: Maps, fn: Callable[..., Any], args: tuple[Any, ...], ready_w: int, go_r: int, out_w: int) -> None:
    answer: dict[str, Any]
    try:
        from mesobox.launch import syscalls as sc

        sc.prctl(sc.PR_SET_PDEATHSIG, 9)
        if not maps.real_root:
            sc.unshare(sc.CLONE_NEWUSER)
            if not maps.subids:
                from mesobox.launch.identity import map_text

                sc.write_file("/proc/self/setgroups", "deny")
                sc.write_file("/proc/self/uid_map", map_text(maps.uid_maps))
                sc.write_file("/proc/self/gid_map", map_text(maps.gid_maps))
        os.write(ready_w, b"u")
        os.close(ready_w)
        if os.read(go_r, 1) != b"g":
            os._exit(125)
        if maps.subids:
            with contextlib.suppress(OSError):
                os.setgroups([])  # the host's supplementary groups are unmapped here anyway
        os.umask(0o022)
        answer = {"result": fn(*args)}
    except MesoboxError as err:
        answer = {"error": err.message, "hint": err.hint, "usage": isinstance(err, UsageError)}
    except OSError as err:
        from mesobox.errors import os_error_text

        answer = {"error": os_error_text(err)}
    except BaseException as err:  # a bug: still one line for the parent
        answer = {"error": f"internal: {type(err).__name__}: {err}"}
    try:
        with os.fdopen(out_w, "wb") as f:
            f.write(json.dumps(answer).encode())
    finally:
        os._exit(0)


def _write_subid_maps(maps: Maps, pid: int) -> None:
    from mesobox.launch.identity import newidmap_argv

    for tool, idmaps in (("newuidmap", maps.uid_maps), ("newgidmap", maps.gid_maps)):
        proc = subprocess.run(newidmap_argv(tool, pid, idmaps), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LaunchError(f"{tool} failed: {proc.stderr.strip()[:200]}",
                              hint="check your ranges in /etc/subuid and /etc/subgid")
