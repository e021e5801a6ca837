"""OCI bundles and the ``mesobox oci`` runtime state that Slurm's oci.conf drives.

A bundle is a directory with ``config.json`` (OCI runtime-spec, config.md) and a root
filesystem.  ``mesobox bundle`` writes one from an image; Slurm 22.05's
``srun --container=BUNDLE`` copies its config.json into the step's spool directory
with ``process`` replaced by the task's command and environment and ``root.path``
made absolute, then runs oci.conf's ``RunTimeRun`` pattern as the user (%b: that
directory).  ``mesobox oci run`` turns config.json back into the runtime's
Spec (``from_oci_json``) and calls the launcher in this very process, so the pid in
the state file is the one Slurm signals and the launcher forwards signals from it.

The runtime itself (``mesobox-oci``, alias ``mesobox oci``) is oci/runtime.py, its
state oci/state.py.  ``spec_from_bundle`` here is the one reading of a config.json:
mesobox's own bundles as ``mesobox run`` would run them, other tools' (podman, runc
spec, umoci) with OCI's defaults and the stand-ins and refusals of docs/oci.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import StoreError, UsageError
from mesobox.oci.state import OCI_VERSION, check_id  # noqa: F401 - names of this module since the first `mesobox oci`


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
    the caller's own identity and id maps, and Slurm's SLURMD_NODENAME.

    A config mesobox did not write (no ``org.mesobox.root.format`` annotation: podman's,
    runc spec's) gets OCI's defaults, not mesobox's (a writable root, noNewPrivileges
    off, the image's own /etc/passwd), and ``foreign_config`` maps what it asks for onto
    what the launcher has, or refuses it in one line (docs/oci.md)."""
    import copy

    from mesobox.launch import identity
    from mesobox.oci.spec import ANN_FORMAT, ANN_SUBIDS, from_oci_json

    doc = copy.deepcopy(data)
    foreign = ANN_FORMAT not in (doc.get("annotations") or {})
    if foreign:
        foreign_config(doc)
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
    userns = any(ns.get("type") == "user" for ns in linux.get("namespaces") or ())
    if not userns:
        pass  # root, real or of a user namespace (rootless podman's): run with its own ids
    elif not linux.get("uidMappings") and uid == 0 and not identity.is_real_root():
        # Root of a user namespace (rootless podman's): the container maps every id
        # this namespace has onto itself, so its files keep their owners.
        linux["uidMappings"] = _own_maps("/proc/self/uid_map")
        linux["gidMappings"] = _own_maps("/proc/self/gid_map")
    elif not linux.get("uidMappings"):
        name = identity.host_names(uid, gid)[0]
        fakeroot = int(process["user"].get("uid", uid)) == 0 and uid != 0
        uid_maps, gid_maps, helpers = identity.id_maps(uid, gid, fakeroot, name)
        linux["uidMappings"] = [{"containerID": m.container_id, "hostID": m.host_id, "size": m.size}
                                for m in uid_maps]
        linux["gidMappings"] = [{"containerID": m.container_id, "hostID": m.host_id, "size": m.size}
                                for m in gid_maps]
        if helpers:  # sub-id ranges: newuidmap/newgidmap write them (the launcher supervises)
            doc.setdefault("annotations", {})[ANN_SUBIDS] = "1"
    if (doc.get("linux") or {}).get("mountLabel") and not os.path.exists("/sys/fs/selinux/enforce"):
        raise UsageError(f"linux.mountLabel {doc['linux']['mountLabel']!r}: SELinux is not enabled on this host",
                         hint="remove mountLabel from config.json")
    spec = from_oci_json(doc)
    if foreign:
        spec = spec.replace(mesobox=spec.mesobox.replace(identity_files=False, as_written=True))
    spec.validate()
    return spec


def _own_maps(path: str) -> list[dict[str, int]]:
    """Identity maps of every id range of the caller's user namespace."""
    with open(path) as f:
        ranges = [line.split() for line in f if line.strip()]
    return [{"containerID": int(inside), "hostID": int(inside), "size": int(size)} for inside, _, size in ranges]


# Mount options a rootless stand-in keeps; every other option of a foreign config
# (atime flags, devpts's) is one the kernel's default covers.
_FLAG_OPTIONS = {"ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind", "private", "rprivate", "slave", "rslave"}
_TMPFS_DATA = ("mode=", "size=", "nr_inodes=", "uid=", "gid=")


def foreign_config(doc: dict[str, Any]) -> None:
    """Rewrite, in place, a config.json mesobox did not write into what the launcher
    runs, OCI's defaults first.  Real root runs it as written: every namespace it lists
    (and no user namespace if it lists none), every mount type, device nodes made.  In
    a user namespace, what it may not do has stand-ins (docs/oci.md): sysfs is the
    host's /sys bound read-only (rootless runc does the same where it may not mount
    one), a cgroup mount is covered by it, mqueue is an empty tmpfs (mq_open(3) works
    without it), devices are the host's nodes bound on /dev."""
    from mesobox.launch import identity

    doc["root"].setdefault("readonly", False)
    doc["process"].setdefault("noNewPrivileges", False)
    linux = doc.setdefault("linux", {})
    if "namespaces" not in linux:
        # mesobox's own default (from_oci_json): user and mount.  Slurm's rewritten
        # config.json of a bundle made by hand has no linux section at all.
        linux["namespaces"] = [{"type": "user"}, {"type": "mount"}]
    namespaces = list(linux.get("namespaces") or ())
    types = [ns.get("type") for ns in namespaces]
    real_root = identity.is_real_root()
    if "user" not in types and os.getuid() != 0:
        # An ordinary user needs one to make the others: the caller's own ids, so no
        # privilege is lost or gained.  Root of a user namespace (rootless podman) runs
        # in its own, as runc does there: a namespace it joins (podman's network) is
        # one that namespace owns.
        namespaces.append({"type": "user"})
    if "mount" not in types:
        namespaces.append({"type": "mount"})
    linux["namespaces"] = namespaces
    if real_root:
        for m in doc.get("mounts") or ():
            if isinstance(m, dict) and {"bind", "rbind"} & set(m.get("options") or ()):
                m["type"] = "bind"  # runc's rule: the option makes it a bind, whatever the type says
        return
    linux["namespaces"] = [ns for ns in namespaces if ns.get("type") != "cgroup"]
    mounts = [m for m in (_mount(each) for each in doc.get("mounts") or ()) if m is not None]
    if any(m["destination"].rstrip("/") == "/dev" and m["type"] == "tmpfs" for m in mounts):
        have = {m["destination"].rstrip("/") for m in mounts}
        from mesobox.launch.mountplan import DEFAULT_DEVICES

        wanted = [f"/dev/{name}" for name, _, _ in DEFAULT_DEVICES]
        wanted += [str(d.get("path")) for d in linux.get("devices") or () if d.get("path") not in wanted]
        for path in wanted:
            if path not in have:
                mounts.append(_device(path))
    elif linux.get("devices"):
        raise UsageError("linux.devices needs a tmpfs on /dev", hint="docs/oci.md")
    linux.pop("devices", None)  # bound above: a user namespace may not mknod
    doc["mounts"] = mounts


def _mount(m: dict[str, Any]) -> dict[str, Any] | None:
    """A mount as a user namespace may make it (foreign_config's stand-ins)."""
    kind, dest = m.get("type") or "bind", str(m.get("destination", ""))
    options = [str(o) for o in m.get("options") or ()]
    if kind in ("none", "") and ("bind" in options or "rbind" in options):
        kind = "bind"
    if kind == "sysfs":
        return {"destination": dest, "type": "bind", "source": "/sys",
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}
    if kind in ("cgroup", "cgroup2"):
        return None  # under the read-only /sys bind already
    if kind == "mqueue":
        return {"destination": dest, "type": "tmpfs", "source": "mqueue", "options": ["nosuid", "nodev", "noexec"]}
    if kind == "tmpfs":
        options = [o for o in options if o in _FLAG_OPTIONS or o.startswith(_TMPFS_DATA)]
    elif kind == "bind":
        options = [o for o in options if o in _FLAG_OPTIONS]
    elif kind not in ("proc", "devpts"):
        raise UsageError(f"mount type {kind!r} ({dest}) is not supported yet", hint="docs/oci.md")
    return {**m, "type": kind, "options": options}


def _device(path: str) -> dict[str, Any]:
    """The host's device node at ``path``, bound (a user namespace may not mknod)."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        raise UsageError(f"device {path} does not exist on this host: it cannot be bound in") from None
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"device {path} is not a device node on this host")
    return {"destination": path, "type": "bind", "source": path, "options": ["bind", "nosuid", "noexec"]}


class StateDir:
    """``RUNTIME_DIR/oci/ID`` through oci/state.py's ``Container`` (where mesobox-oci
    keeps state when no XDG_RUNTIME_DIR is set): the interface of the first
    ``mesobox oci``.  ``status`` is derived from the pid, never stored."""

    def __init__(self, config: Config, container_id: str) -> None:
        from mesobox.oci.state import Container

        self.container = Container(os.path.join(config.runtime_dir_str, "oci"), container_id)
        self.id = self.container.id

    def read(self) -> dict[str, Any]:
        return self.container.state()

    def write(self, bundle: Path, status: str, pid: int) -> None:
        from mesobox.oci.state import new_record

        if not self.container.exists():
            self.container.claim()
        self.container.write(new_record(str(bundle.resolve()), pid, {}, {}))

    def exists(self) -> bool:
        return self.container.exists()

    def remove(self) -> None:
        self.container.remove()
