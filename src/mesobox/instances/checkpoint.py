"""Instances room: CRIU checkpoint/restore and snapshots of an instance's writable layer.

Invariants:
- Never fake success: ``checkpoint``/``restore`` first run ``criu check`` and, when CRIU
  is missing or cannot work on this kernel/for this user (Debian 12's CRIU 3.17 fails
  with "kerndat_vdso_fill_symtable failed" on current 6.x kernels), stop with
  one clear line that names what does work instead: pause/resume and snapshot.
- ``snapshot`` copies only the ``--overlay DIR`` upper layer the instance writes to —
  the image itself is immutable and already stored — and freezes the instance while it
  copies when it can, so the copy is consistent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from mesobox.errors import LaunchError, UsageError
from mesobox.instances import state as st

ALTERNATIVE = (
    "use `mesobox instance pause`/`resume` to hold an instance, `mesobox instance snapshot` to keep its writable layer"
)


def criu_status() -> tuple[bool, str]:
    """(works, why-not) from ``criu check``; the last error line is the reason."""
    tool = shutil.which("criu") or next((p for p in ("/usr/sbin/criu", "/sbin/criu") if os.access(p, os.X_OK)), None)
    if tool is None:
        return False, "CRIU is not installed"
    try:
        proc = subprocess.run([tool, "check"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"`criu check` could not run: {err}"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")] or lines
    if proc.returncode == 0 and not any(ln.startswith("Error") for ln in lines):
        return True, ""
    reason = errors[0] if errors else f"exit status {proc.returncode}"
    # "Error (criu/kerndat.c:1615): kerndat_vdso_… failed …" → keep the message, drop the source position.
    reason = reason.split("): ", 1)[-1]
    return False, f"CRIU does not work on this host (`criu check`: {reason})"


def require_criu() -> str:
    works, why = criu_status()
    if not works:
        raise LaunchError(f"cannot checkpoint: {why}", hint=ALTERNATIVE)
    return shutil.which("criu") or "/usr/sbin/criu"


def checkpoint(inst: st.Instance, images: Path) -> None:
    """``criu dump`` of the workload tree into ``images`` (the instance ends, as with
    `podman container checkpoint`)."""
    tool = require_criu()
    pid = inst.workload_pid
    if pid is None or inst.status not in (st.RUNNING, st.PAUSED):
        raise UsageError(f"instance {inst.name!r} is {inst.status}, not running")
    images.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [tool, "dump", "--tree", str(pid), "--images-dir", str(images), "--log-file", "dump.log"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise LaunchError(f"criu dump failed (exit {proc.returncode})", hint=f"see {images / 'dump.log'}")
    st.write_json(images / "mesobox-instance.json", {"spec": inst.spec, "pid": pid})


def restore(name: str, images: Path) -> int:
    """``criu restore`` from ``images``, detached; returns the restored root pid."""
    tool = require_criu()
    if not (images / "mesobox-instance.json").exists():
        raise UsageError(f"{images} is not a mesobox checkpoint", hint="make one with `mesobox checkpoint NAME DIR`")
    pidfile = images / "restored.pid"
    proc = subprocess.run(
        [tool, "restore", "--images-dir", str(images), "--restore-detached", "--pidfile", str(pidfile),
         "--log-file", "restore.log"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"criu restore of {name!r} failed (exit {proc.returncode})", hint=f"see {images / 'restore.log'}"
        )
    return int(pidfile.read_text().strip())


def overlay_dir(inst: st.Instance) -> Path:
    """The ``--overlay DIR`` the instance was started with, or a clear error."""
    options: list[str] = list(inst.spec.get("options", []))
    found = None
    for i, word in enumerate(options):
        if word == "--overlay" and i + 1 < len(options):
            found = options[i + 1]
        elif word.startswith("--overlay="):
            found = word.split("=", 1)[1]
    if found is None:
        raise UsageError(
            f"instance {inst.name!r} has no persistent writable layer to snapshot",
            hint="start it with `--overlay DIR`; a --writable-tmpfs layer lives in memory only",
        )
    path = Path(found)
    if not path.is_absolute():
        path = Path(inst.spec.get("cwd") or "/") / path
    # The launcher may keep upper/ and work/ side by side in DIR; the upper is the layer.
    return path / "upper" if (path / "upper").is_dir() else path


def snapshot(inst: st.Instance, dest: Path) -> str:
    """Copy the writable layer to ``dest`` (``*.tar`` / ``*.tar.gz``: an archive; else a
    new directory).  Returns how consistency was ensured."""
    source = overlay_dir(inst)
    if dest.exists():
        raise UsageError(f"{dest} already exists", hint="snapshots never overwrite: pick a new destination")
    from mesobox.instances import pause

    held = "not paused (instance not running)"
    if inst.status == st.RUNNING:
        held = pause.pause(inst)
        inst = st.Instance(inst.name, inst.path, inst.spec, inst.state)  # re-reads paused.json
    try:
        _copy(source, dest)
    finally:
        if inst.paused is not None and held in ("freezer", "sigstop"):
            pause.resume(inst)
    return held


def _copy(source: Path, dest: Path) -> None:
    name = dest.name
    # overlayfs' workdir is scratch space of the mount, not part of the layer.
    skip = {"work"} if source.name != "upper" else set()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        import tarfile

        # mesobox only writes this archive: the extraction hazards of image/layers.py do not apply.
        with tarfile.open(dest, "w:gz" if name.endswith("gz") else "w") as tar:
            for entry in sorted(source.iterdir()):
                if entry.name not in skip:
                    tar.add(entry, arcname=entry.name)
        return
    try:
        shutil.copytree(source, dest, symlinks=True, ignore=lambda d, n: skip if Path(d) == source else set())
    except shutil.Error as err:
        raise UsageError(f"cannot copy some files of the layer: {err.args[0][0][2]}",
                         hint="write a .tar snapshot instead: it keeps overlay whiteouts and special files") from None
