"""Capabilities room: which capabilities a container's process may hold.

Invariants:
- Decided in the spec (``process.capabilities``, OCI runtime-spec config.md
  "capabilities": ``bounding``/``effective``/``permitted``/``inheritable``/``ambient``,
  names spelled ``CAP_…``) and applied by the launcher just before execve.
- uid 0 inside (``--fakeroot``, or a root caller) gets Docker's default set
  (``DEFAULT``), adjusted by ``--cap-add``/``--cap-drop``; any other uid gets none:
  capabilities(7) clears a non-root uid's permitted set at execve anyway, and an
  empty bounding set means a setuid-root file could not give any back either.
- The bounding set is what is enforced: for uid 0 the kernel computes the new
  permitted set at execve as (file caps, all of them for root) ∩ bounding set
  (capabilities(7), "Transformation of capabilities during execve()").  A new user
  namespace made later inside (nesting) starts with a full set again
  (user_namespaces(7)), so dropping here does not break nested containers.
- Stdlib only and tiny: ``launch.specbuild`` imports it on every run.
"""

from __future__ import annotations

from mesobox.errors import UsageError

# <linux/capability.h>, in kernel order (the index is the capability number).
NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
# Docker's default capability set (moby oci/caps/defaults.go), what `docker run` grants.
DEFAULT = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
           "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
SETS = ("bounding", "effective", "permitted")


def canonical(name: str) -> str:
    """``chown``, ``CHOWN``, ``CAP_CHOWN`` → ``CHOWN``; ``ALL`` stays ``ALL``."""
    upper = name.strip().upper().removeprefix("CAP_")
    if upper != "ALL" and upper not in NAMES:
        raise UsageError(f"unknown capability {name!r}", hint="names as in capabilities(7), e.g. CHOWN or CAP_CHOWN")
    return upper


def resolve(root_inside: bool, add: tuple[str, ...], drop: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The OCI capability sets for the container's process."""
    added = [canonical(n) for n in add]
    dropped = [canonical(n) for n in drop]
    if added and not root_inside:
        raise UsageError("--cap-add needs uid 0 inside: a non-root uid loses its capabilities at execve",
                         hint="add --fakeroot")
    # Docker's order: "--cap-drop ALL --cap-add X" leaves X; otherwise a name both
    # added and dropped is dropped.
    have = set() if "ALL" in dropped or not root_inside else set(DEFAULT)
    have |= set(NAMES) if "ALL" in added else set(added)
    have -= set() if "ALL" in dropped else set(dropped)
    names = tuple(f"CAP_{n}" for n in NAMES if n in have)
    return {s: names for s in SETS}


def numbers(names: tuple[str, ...]) -> frozenset[int]:
    return frozenset(NAMES.index(n.removeprefix("CAP_")) for n in names if n.removeprefix("CAP_") in NAMES)


OCI_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


def check_sets(sets: dict[str, tuple[str, ...]]) -> None:
    """An OCI ``process.capabilities``: known set names and capability names (runc
    refuses an unknown capability rather than run with a different set)."""
    for kind, names in sets.items():
        if kind not in OCI_SETS:
            raise UsageError(f"unknown capability set {kind!r}", hint="one of " + ", ".join(OCI_SETS))
        for name in names:
            if not isinstance(name, str) or not name.startswith("CAP_") or name[4:] not in NAMES:
                raise UsageError(f"unknown capability {name!r} in process.capabilities.{kind}",
                                 hint="names as in capabilities(7), spelled CAP_…")


def masks(sets: dict[str, tuple[str, ...]]) -> tuple[int, int, int, int, int]:
    """(bounding, effective, permitted, inheritable, ambient) as bit masks; a set the
    config leaves out is empty (runtime-spec config.md)."""
    def mask(kind: str) -> int:
        return sum(1 << n for n in numbers(sets.get(kind, ())))

    return mask("bounding"), mask("effective"), mask("permitted"), mask("inheritable"), mask("ambient")
