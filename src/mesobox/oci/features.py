"""What ``mesobox-oci features`` and ``mesobox-oci spec`` print.

``features``: runtime-spec features.md's object, as runc prints it, listing what
mesobox honours (docs/oci.md): a client that reads it (podman, containerd) must not be
promised a mount option or namespace that would then be refused.
``spec``: a default config.json in runc's shape.  For real root, runc spec's own
default (no user namespace; devices made by the runtime; sysfs, mqueue, a cgroup
mount; runc's masked and read-only paths and capabilities).  ``--rootless``: a user
namespace of the caller's ids, /proc and /dev/pts, the host's /dev/null and friends
bound on a tmpfs /dev.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mesobox.launch.mountplan import DEFAULT_DEVICES
from mesobox.oci.spec import HOOK_KINDS, NAMESPACES
from mesobox.oci.state import OCI_VERSION

MOUNT_OPTIONS = ("async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "iversion", "lazytime",
                 "loud", "mand", "noatime", "nodev", "nodiratime", "noexec", "noiversion", "nolazytime", "nomand",
                 "norelatime", "nostrictatime", "nosuid", "private", "rbind", "relatime", "ro", "rprivate",
                 "rshared", "rslave", "runbindable", "rw", "shared", "silent", "slave", "strictatime", "suid",
                 "sync", "unbindable")
CAPABILITIES = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")  # runc spec's default set
MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def features() -> dict[str, Any]:
    from mesobox import __version__
    from mesobox.isolation.caps import NAMES

    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": list(HOOK_KINDS),
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": list(NAMESPACES),
            "capabilities": [f"CAP_{name}" for name in NAMES],
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True,
                        "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                        "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                                      "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"]},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {"org.mesobox.version": __version__, "org.opencontainers.runtime-spec.version": OCI_VERSION},
    }


def default_config(rootless: bool) -> dict[str, Any]:
    """runc spec's default, as mesobox runs it (terminal false: no console is needed)."""
    doc: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/", "noNewPrivileges": True,
            "capabilities": {kind: list(CAPABILITIES) for kind in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "mesobox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        ],
        "linux": {"maskedPaths": list(MASKED), "readonlyPaths": list(READONLY)},
    }
    if rootless:
        uid, gid = os.getuid(), os.getgid()
        doc["mounts"] += [{"destination": f"/dev/{name}", "type": "bind", "source": f"/dev/{name}",
                           "options": ["bind", "nosuid", "noexec"]}
                          for name, _, _ in DEFAULT_DEVICES]
        doc["linux"]["namespaces"] = [{"type": ns} for ns in ("pid", "ipc", "uts", "mount", "user")]
        doc["linux"]["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
        doc["linux"]["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    else:
        doc["mounts"][2]["options"].append("gid=5")
        doc["mounts"] += [
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ]
        doc["linux"]["namespaces"] = [{"type": ns} for ns in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    return doc


def write_default_config(bundle: str, rootless: bool) -> None:
    """``spec``: BUNDLE/config.json, never over an existing one (nor through a symlink)."""
    from mesobox.errors import UsageError

    path = os.path.join(bundle, "config.json")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UsageError(f"{path} exists", hint="remove it first") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(default_config(rootless), indent=2) + "\n")
