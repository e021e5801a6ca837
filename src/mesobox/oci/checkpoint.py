"""``mesobox-oci checkpoint`` and ``restore``: runc's two verbs over CRIU.

``checkpoint`` runs ``criu dump`` on the container's process tree (its recorded pid is
the root of the tree: pid 1 of its pid namespace) into ``--image-path``, then, unless
``--leave-running``, deletes the container as runc does.  ``restore`` creates the
container again from a bundle and those images with ``criu restore``, puts the restored
tree in the container's cgroup and records it as running.

Rules:
- Real root only, as runc: an ordinary user's container lives in a user namespace that
  CRIU can dump only with CAP_CHECKPOINT_RESTORE, which mesobox never has.
- ``criu check`` first (instances/checkpoint.py ``criu_status``): where CRIU cannot run
  on this kernel, one line says why and the container is left exactly as it was.
- A mount whose source lies outside the container (a bind mount; a masked file, which
  is /dev/null bound over it) cannot be dumped: each is named ``--external`` by its
  destination, and ``restore`` binds the source the bundle gives for it now.  The image
  directory keeps which destinations those were, in ``mesobox-oci.json``.
- CRIU restores the root onto a bind of the bundle's rootfs made for it under the work
  directory, detached again as soon as ``criu restore`` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from mesobox.errors import LaunchError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.oci.runtime import Runtime
    from mesobox.oci.spec import Spec

IMAGE_RECORD = "mesobox-oci.json"
# runc's checkpoint/restore flags that are CRIU's own flags of the same name
CRIU_FLAGS = ("tcp-established", "ext-unix-sk", "shell-job", "file-locks")
CGROUP_MODES = ("soft", "full", "strict", "ignore")  # runc's --manage-cgroups-mode, CRIU's --manage-cgroups
DEV_NULL = "/dev/null"


def criu_options(chosen: set[str], cgroups_mode: str | None) -> tuple[str, ...]:
    """CRIU's arguments for runc's flags ``chosen`` (of CRIU_FLAGS) and --manage-cgroups-mode
    (CRIU's default, soft, when not given)."""
    mode = cgroups_mode or "soft"
    if mode not in CGROUP_MODES:
        raise UsageError(f"bad --manage-cgroups-mode {mode!r}: " + ", ".join(CGROUP_MODES))
    return (*(f"--{flag}" for flag in CRIU_FLAGS if flag in chosen), f"--manage-cgroups={mode}")


def _require_root(verb: str) -> None:
    from mesobox.launch.identity import is_real_root

    if not is_real_root():
        raise UsageError(f"{verb} needs real root: CRIU cannot dump or restore a rootless container",
                         hint="mesobox-oci pause/resume hold a container; runc refuses a rootless checkpoint too")


def _criu(verb: str, container_id: str) -> str:
    """The criu program, or one line saying why CRIU cannot run here."""
    from mesobox.instances.checkpoint import criu_status

    works, why = criu_status()
    if not works:
        raise LaunchError(f"cannot {verb} container {container_id!r}: {why}",
                          hint="mesobox-oci pause/resume hold a container without CRIU")
    import shutil

    return shutil.which("criu") or "/usr/sbin/criu"


def external_mounts(binds: dict[str, str], masked_files: list[str]) -> dict[str, str]:
    """destination → source of every mount CRIU must be told is external: the bind
    mounts of the config, and each masked path that is a file (a bind of /dev/null)."""
    return {**binds, **{path: DEV_NULL for path in masked_files}}


def dump_args(criu: str, pid: int, images: str, work: str, externals: list[str], leave_running: bool,
              flags: tuple[str, ...], freezer: str | None = None) -> list[str]:
    """``criu dump`` of the tree rooted at ``pid``; with the container's freezer cgroup,
    CRIU stops the tree with it (a paused container stays as it is) instead of ptrace."""
    args = [criu, "dump", "--tree", str(pid), "--images-dir", images, "--work-dir", work,
            "--log-file", "dump.log", *(["--freeze-cgroup", freezer] if freezer else [])]
    args += [f"--external=mnt[{dest}]:{dest}" for dest in externals]
    return [*args, *flags, *(["--leave-running"] if leave_running else [])]


def restore_args(criu: str, images: str, work: str, root: str, pid_file: str, externals: dict[str, str],
                 detach: bool, flags: tuple[str, ...]) -> list[str]:
    """``criu restore`` onto ``root``; detached, or as a child of the caller (sibling of criu)."""
    args = [criu, "restore", "--images-dir", images, "--work-dir", work, "--root", root,
            "--pidfile", pid_file, "--log-file", "restore.log",
            "--restore-detached" if detach else "--restore-sibling"]
    args += [f"--external=mnt[{dest}]:{source}" for dest, source in externals.items()]
    return [*args, *flags]


def _criu_failed(verb: str, proc: subprocess.CompletedProcess[str], log: Path) -> LaunchError:
    """One line: CRIU's last "Error" line from its log, or its exit status."""
    reason = f"exit status {proc.returncode}"
    try:
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln]
    except OSError:
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if errors:
        reason = errors[-1].split("): ", 1)[-1].strip()[:300]
    return LaunchError(f"criu {verb} failed: {reason}", hint=f"CRIU's log: {log}")


def _masked_files(pid: int, masked: tuple[str, ...]) -> list[str]:
    """The masked paths that are files inside the running container (a directory is
    masked by a tmpfs, which CRIU dumps itself)."""
    found = []
    for path in masked:
        try:
            if not os.path.isdir(f"/proc/{pid}/root{path}") and os.path.exists(f"/proc/{pid}/root{path}"):
                found.append(path)
        except OSError:
            continue
    return found


def _freezer(record: dict[str, Any]) -> str | None:
    """The container's freezer cgroup directory (v1 freezer, else pure v2's), if it has one."""
    cgroup = record.get("cgroup")
    dirs = cgroup.get("dirs") if isinstance(cgroup, dict) else None
    if not isinstance(dirs, dict):
        return None
    found = dirs.get("freezer") or dirs.get("unified")
    return str(found) if found else None


def _image_dirs(image_path: str | None, work_path: str | None, create: bool) -> tuple[Path, Path]:
    """--image-path (runc's default: ./checkpoint) and --work-path (default: the image
    path), each the caller's own private directory (made 0700 if missing; ``create``
    False: the image directory must exist).  Root restores the process state the
    images hold, so a directory another user could write to, or a symlink planted in
    its place, is refused: paths.runtime_dir's rules."""
    from mesobox import paths
    from mesobox.errors import UnsafeDirectory

    images = os.path.abspath(image_path or "checkpoint")
    work = os.path.abspath(work_path) if work_path else images
    if not create and not os.path.lexists(images):
        raise UsageError(f"{images} is not a checkpoint of mesobox-oci: it does not exist",
                         hint="make one with: mesobox-oci checkpoint --image-path DIR ID")
    for option, path in (("--image-path", images), ("--work-path", work)):
        try:
            paths.runtime_dir(path)
        except UnsafeDirectory as err:
            raise UsageError(f"{option}: {err.message}",
                             hint="give a directory of your own (mode 0700), in directories only you "
                                  "and root may write to") from None
    return Path(images), Path(work)


def checkpoint(rt: Runtime, container_id: str, image_path: str | None, work_path: str | None,
               leave_running: bool, flags: tuple[str, ...]) -> None:
    from mesobox.oci import runtime

    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    if status not in ("running", "paused"):
        raise UsageError(f"cannot checkpoint container {container_id!r}: it is {status}, not running")
    _require_root("checkpoint")
    criu = _criu("checkpoint", container_id)
    binds, masked_paths = record.get("binds"), record.get("maskedPaths")
    if not isinstance(binds, dict) or not isinstance(masked_paths, list):
        raise LaunchError(f"container {container_id!r} was created by an older mesobox-oci: its mounts are unknown",
                          hint="re-create it to checkpoint it")
    pid = int(record["pid"])
    masked = _masked_files(pid, tuple(str(p) for p in masked_paths))
    externals = external_mounts({str(k): str(v) for k, v in binds.items()}, masked)
    images, work = _image_dirs(image_path, work_path, create=True)
    proc = subprocess.run(dump_args(criu, pid, str(images), str(work), sorted(externals), leave_running, flags,
                                    _freezer(record)),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise _criu_failed("dump", proc, work / "dump.log")
    (images / IMAGE_RECORD).write_text(json.dumps({"id": container.id, "bundle": record["bundle"],
                                                   "external": sorted(externals), "masked_files": masked}) + "\n")
    if not leave_running:
        runtime.delete(rt, container_id, force=True)


def restore(rt: Runtime, container_id: str, bundle: str, image_path: str | None, work_path: str | None,
            detach: bool, pid_file: str | None, flags: tuple[str, ...]) -> int:
    """Restore into a new container ``container_id``; returns 0 (detached) or the restored
    workload's exit status (foreground, as runc restore without --detach)."""
    from mesobox.oci import runtime

    _require_root("restore")
    images, work = _image_dirs(image_path, work_path, create=False)
    saved = _saved(images)
    criu = _criu("restore", container_id)
    bundle = os.path.abspath(bundle)
    container = rt.container(container_id)
    runtime.claim(container)
    loaded, pid = None, 0
    try:
        loaded = runtime.load(bundle, container.id, rt.systemd_cgroup)
        pid = _criu_restore(criu, loaded.spec, bundle, images, work, saved, detach, flags)
        if loaded.cgroup is not None:
            from mesobox.instances.state import process_tree

            for member in process_tree(pid):
                loaded.cgroup.join(member)
        container.write(runtime.container_record(bundle, pid, loaded))
    except BaseException:
        if pid:  # restored, but not recorded: nothing may run on unseen
            _kill_restored(pid)
        if loaded is not None:
            runtime.empty_cgroup(loaded.record())
            loaded.drop_cgroup()
        container.remove()
        raise
    if pid_file:
        runtime.write_pid_file(pid_file, pid)
    if detach:
        return 0
    from mesobox.launch.forwarding import block_signals, wait_forwarding

    block_signals()
    return wait_forwarding(pid)


def _kill_restored(pid: int) -> None:
    from mesobox.instances.state import process_tree

    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _saved(images: Path) -> dict[str, Any]:
    try:
        data = json.loads((images / IMAGE_RECORD).read_text())
    except FileNotFoundError:
        raise UsageError(f"{images} is not a checkpoint of mesobox-oci (no {IMAGE_RECORD})",
                         hint="make one with: mesobox-oci checkpoint --image-path DIR ID") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {images / IMAGE_RECORD}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("external"), list):
        raise UsageError(f"{images / IMAGE_RECORD} is damaged")
    return data


def _criu_restore(criu: str, spec: Spec, bundle: str, images: Path, work: Path, saved: dict[str, Any],
                  detach: bool, flags: tuple[str, ...]) -> int:
    from mesobox.launch import syscalls as sc
    from mesobox.oci.spec import bind_sources

    sources = external_mounts(bind_sources(spec), [str(p) for p in saved.get("masked_files") or ()])
    missing = [dest for dest in saved["external"] if dest not in sources]
    if missing:
        raise UsageError(f"the bundle's config.json has no bind mount for {', '.join(missing)}, "
                         "which the checkpoint has", hint="restore with the bundle the container was created from")
    rootfs = spec.root.path if os.path.isabs(spec.root.path) else os.path.join(bundle, spec.root.path)
    from mesobox import paths

    root = Path(paths.private_subdir(str(work), "criu-root"))  # never a symlink planted there
    pid_path = work / "restored.pid"
    pid_path.unlink(missing_ok=True)
    sc.mount(rootfs, str(root), None, sc.MS_BIND | sc.MS_REC)
    try:
        proc = subprocess.run(
            restore_args(criu, str(images), str(work), str(root), str(pid_path),
                         {dest: sources[dest] for dest in saved["external"]}, detach, flags),
            capture_output=True, text=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            sc.umount2(str(root), sc.MNT_DETACH)
    if proc.returncode != 0:
        raise _criu_failed("restore", proc, work / "restore.log")
    return int(pid_path.read_text().strip())
