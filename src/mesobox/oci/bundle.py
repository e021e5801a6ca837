"""OCI bundles and the ``mesobox oci`` runtime state that Slurm's oci.conf drives.

A bundle is a directory with ``config.json`` (OCI runtime-spec, config.md) and a root
filesystem.  ``mesobox bundle`` writes one from an image; Slurm 22.05's
``srun --container=BUNDLE`` copies its config.json into the step's spool directory
with ``process`` replaced by the task's command and environment and ``root.path``
made absolute, then runs oci.conf's ``RunTimeRun`` pattern as the user (%b: that
directory).  ``mesobox oci run`` turns config.json back into the runtime's
Spec (``from_oci_json``) and calls the launcher in this very process, so the pid in
the state file is the one Slurm signals and the launcher forwards signals from it.

State (runtime-spec runtime.md "State"): one JSON file per container id under the
user's runtime dir, ``RUNTIME_DIR/oci/ID/state.json``; ``status`` is computed from
the recorded pid (running while it lives, stopped after).  Ids are validated: they
become path components.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mesobox import paths
from mesobox.config import Config
from mesobox.errors import StoreError, UsageError
from mesobox.files import write_atomic
from mesobox.procs import alive

OCI_VERSION = "1.0.2"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
# The patterns of Slurm 22.05's oci.conf (oci.conf(5)); %n node, %u user, %j job,
# %s step, %t task (%U, the numeric uid, is unknown to 22.05 and kills the step).


def check_id(container_id: str) -> str:
    if not _ID_RE.match(container_id):
        raise UsageError(f"invalid container id {container_id!r}",
                         hint="use letters, digits and . _ + - (at most 128 characters)")
    return container_id


def bundle_config(config: Config, image: str, args: tuple[str, ...] = ()) -> dict[str, Any]:
    """config.json for an image, made by the launcher's own planner (``make_spec`` with
    ``--contain --cleanenv``: a bundle carries no binds of the host it was made on) and
    written with ``to_oci_json``, so ``mesobox oci run`` reads back exactly what the
    launcher understands.  A squashfs image stays one file: root.path names it and the
    ``org.mesobox.root.format`` annotation says how to mount it."""
    from mesobox.launch.specbuild import RunOptions, find_image, make_spec
    from mesobox.oci.spec import to_oci_json

    opts = RunOptions(mode="run", image=image, args=args, contain=True, cleanenv=True)
    spec = make_spec(opts, config, find_image(image, config))
    return to_oci_json(spec.replace(process=spec.process.replace(terminal=False)))


def make_bundle(config: Config, image: Path, dest: Path, copy: bool = False) -> Path:
    """Write ``dest/config.json`` and ``dest/rootfs``: a symlink to the image (a
    directory or a squashfs file), or with ``copy`` a copy of its tree.

    Slurm 22.05 always rewrites root.path to ``BUNDLE/rootfs`` (measured), so the image
    must be reachable under that name; config.json says ``rootfs`` as runtime-spec
    bundle.md suggests, and the ``org.mesobox.root.format`` annotation (kept by Slurm)
    tells the launcher whether to mount it as squashfs."""
    dest = dest.resolve()  # "new/.." must not turn into writing the parent directory
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"bundle directory {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest / "rootfs"
    if copy:
        _copy_rootfs(image, root)
    else:
        root.symlink_to(image.resolve())
    data = bundle_config(config, str(root))
    data["root"]["path"] = "rootfs"
    (dest / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return dest


def _copy_rootfs(image: Path, rootfs: Path) -> None:
    if image.is_dir():
        shutil.copytree(image, rootfs, symlinks=True)
        return
    result = subprocess.run(["unsquashfs", "-q", "-n", "-d", str(rootfs), str(image)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StoreError(f"cannot unpack {image}: {result.stderr.strip()[:200]}",
                         hint="is it a squashfs image? (apt-get install squashfs-tools)")


def load_bundle(bundle: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{bundle} has no config.json", hint="make one with `mesobox bundle IMAGE DIR`") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {bundle}/config.json: {err}") from None
    if not isinstance(data.get("process"), dict) or not data["process"].get("args"):
        raise UsageError(f"{bundle}/config.json has no process.args")
    if not isinstance(data.get("root"), dict) or not data["root"].get("path"):
        raise UsageError(f"{bundle}/config.json has no root.path")
    return data


def spec_from_bundle(bundle: Path, data: dict[str, Any]) -> Any:
    """config.json → the launcher's Spec (``from_oci_json``), filling in what a bundle
    written by another tool (or rewritten by Slurm) may leave out: an absolute root,
    the caller's own identity and id maps, and Slurm's SLURMD_NODENAME."""
    import copy

    from mesobox.launch import identity
    from mesobox.oci.spec import from_oci_json

    doc = copy.deepcopy(data)
    root = Path(doc["root"]["path"])
    # The bundle's rootfs is usually a symlink to the image (make_bundle): resolve it
    # here, in the user's own bundle, so the launcher gets the real image path.
    doc["root"]["path"] = os.path.realpath(root if root.is_absolute() else bundle / root)
    uid, gid = os.getuid(), os.getgid()
    process = doc["process"]
    process.setdefault("user", {"uid": uid, "gid": gid})
    env = list(process.get("env") or [])
    node = os.environ.get("SLURMD_NODENAME")
    if node and not any(item.startswith("SLURMD_NODENAME=") for item in env):
        process["env"] = [*env, f"SLURMD_NODENAME={node}"]
    linux = doc.setdefault("linux", {})
    if not linux.get("uidMappings"):
        name = identity.host_names(uid, gid)[0]
        fakeroot = int(process["user"].get("uid", uid)) == 0 and uid != 0
        uid_maps, gid_maps, _ = identity.id_maps(uid, gid, fakeroot, name)
        linux["uidMappings"] = [{"containerID": m.container_id, "hostID": m.host_id, "size": m.size}
                                for m in uid_maps]
        linux["gidMappings"] = [{"containerID": m.container_id, "hostID": m.host_id, "size": m.size}
                                for m in gid_maps]
    spec = from_oci_json(doc)
    spec.validate()
    return spec


class StateDir:
    """The one owner of ``RUNTIME_DIR/oci/ID``."""

    def __init__(self, config: Config, container_id: str) -> None:
        self.id = check_id(container_id)
        self.top = config.runtime_dir_str
        self.path = Path(self.top) / "oci" / self.id

    def _trusted(self, make: bool) -> bool:
        """The runtime dir, checked private (paths.runtime_dir) and made only when
        ``make``: a query, kill or delete never creates it (slurmstepd runs them as root
        too, where no container of root's ever was); False when it does not exist."""
        if not make and not os.path.lexists(self.top):
            return False
        paths.runtime_dir(self.top)  # private, or refused
        return True

    def read(self) -> dict[str, Any]:
        if not self._trusted(make=False):
            raise UsageError(f"container {self.id!r} does not exist")
        try:
            state: dict[str, Any] = json.loads((self.path / "state.json").read_text())
        except FileNotFoundError:
            raise UsageError(f"container {self.id!r} does not exist") from None
        pid = int(state.get("pid", 0))
        if state.get("status") == "running" and not alive(pid):
            state["status"] = "stopped"
        return state

    def write(self, bundle: Path, status: str, pid: int) -> None:
        self._trusted(make=True)
        paths.private_subdir(self.top, "oci", self.id)
        state = {"ociVersion": OCI_VERSION, "id": self.id, "status": status, "pid": pid,
                 "bundle": str(bundle.resolve()), "annotations": {}}
        write_atomic(self.path / "state.json", (json.dumps(state) + "\n").encode(), mode=0o644)

    def exists(self) -> bool:
        return self._trusted(make=False) and (self.path / "state.json").exists()

    def remove(self) -> None:
        if self._trusted(make=False):
            shutil.rmtree(self.path, ignore_errors=True)
