"""RDMA room: ``--rdma``, the host's InfiniBand/RoCE devices and verbs stack in a container.

What a verbs program (libibverbs, librdmacm, UCX, libfabric) needs from its host, as
Apptainer's and Sarus' RDMA setups and podman's ``--device /dev/infiniband`` give it:

- the character devices under ``/dev/infiniband`` (``uverbs*``, ``rdma_cm``, ``umad*``,
  ``issm*``), bound as ``--device`` binds them (nosuid, not nodev: a node on a nodev
  mount cannot be opened; its permissions and the job's device cgroup still decide);
  an entry that is a symlink, or no character device, is never bound;
- the host's verbs libraries (libibverbs.so.1, librdmacm.so.1, the vendor libraries
  libmlx5/libmlx4/libefa… and the non-glibc libraries they need), found in the host's
  ldconfig cache and bound read-only under ``/.mesobox/rdma/lib``, first on the
  container's ``LD_LIBRARY_PATH``: the user-space driver must match the host's kernel
  driver, not whatever the image was built with;
- libibverbs' provider directory (``libibverbs`` beside libibverbs.so.1, e.g.
  ``/usr/lib/x86_64-linux-gnu/libibverbs``) at its host path, because libibverbs
  dlopens providers from its compiled-in path, and ``/etc/libibverbs.d`` (which
  providers exist), both read-only.

No glibc part of the host is ever bound (a process has one libc: the image's); a host
library that needs a newer glibc than the image has is refused with one line.  A host
without an RDMA device is an error, never a silent no-op.  Reading the ldconfig cache
runs ``ldconfig``, so such a launch saves no program (probe.py).  Stdlib only; imported
only when asked (``--rdma``, or ``--mpi host`` on a host with ``/dev/infiniband``).
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError, UsageError
from mesobox.launch import probe
from mesobox.launch.binds import device_bind, require_allowed
from mesobox.launch.hostlibs import cache_index, ld_cache
from mesobox.oci import spec as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config

DEV_DIR = "/dev/infiniband"
CONFIG_DIR = "/etc/libibverbs.d"
TOP = "/.mesobox/rdma"
# The verbs stack, by name prefix (``libibverbs.so`` matches libibverbs.so.1): the core
# libraries and the vendors' direct-verbs libraries UCX and libfabric link.
RDMA_LIBRARIES = ("libibverbs.so", "librdmacm.so", "libibumad.so", "libmlx5.so", "libmlx4.so", "libefa.so",
                  "libmana.so", "libhns.so")
LIB_OPTIONS = ("bind", "nosuid", "nodev", "ro")
DIR_OPTIONS = ("nosuid", "nodev", "noexec", "mode=755", "size=64k")


def rdma_setup(config: Config, image_env: tuple[str, ...],
               image_root: str | None = None) -> tuple[tuple[S.Mount, ...], tuple[str, ...]]:
    """(mounts, image-Env-like entries) for ``--rdma``; UsageError where the host has no
    RDMA device, LaunchError where the image's glibc is too old for the host's libraries."""
    nodes = rdma_nodes(config)
    if not nodes:
        raise UsageError(f"--rdma: no RDMA device (uverbs, rdma_cm) in {dev_dir(config)} on this host",
                         hint="--rdma needs an InfiniBand/RoCE adapter and its kernel driver (ib_uverbs)")
    allowed = _override_allowed(config)
    mounts = [_node_mount(src, dst, allowed) for src, dst in nodes]
    cache = ld_cache(config.host_ld_cache)
    found = dict(libraries(cache, RDMA_LIBRARIES))
    if "libibverbs.so.1" not in found:
        raise UsageError("--rdma: no libibverbs.so.1 in the host's ldconfig cache",
                         hint="install the host's rdma-core (libibverbs1, ibverbs-providers)")
    providers = provider_dir(found["libibverbs.so.1"])
    plugins, targets = provider_files(providers) if providers else ([], [])
    found.update(closure(cache, [*found.values(), *plugins, *targets], found))
    if image_root is not None:
        files = sorted({probe.realpath(p) for p in [*found.values(), *plugins, *targets]})
        check_glibc(image_root, files, "--rdma", "the host's verbs libraries")
    mounts.append(S.Mount(destination=TOP, type="tmpfs", source="tmpfs", options=DIR_OPTIONS))
    mounts += [_file_mount(path, f"{TOP}/lib/{name}", allowed) for name, path in sorted(found.items())]
    if providers:
        mounts.append(_file_mount(providers, providers, allowed))
        # rdma-core's links (libmlx5-rdmav34.so -> ../libmlx5.so.1.24.44.0) must resolve inside.
        mounts += [_file_mount(target, target, allowed) for target in targets]
    verbs_d = config.rdma_config_dir or CONFIG_DIR
    if _plain_dir(verbs_d):
        mounts.append(_file_mount(verbs_d, CONFIG_DIR, allowed))
    return tuple(mounts), _environment(image_env)


# --- device nodes ----------------------------------------------------------------------


def dev_dir(config: Config) -> str:
    return config.rdma_dev_dir or DEV_DIR


def rdma_nodes(config: Config) -> list[tuple[str, str]]:
    """(host path, container path) of each character device directly in the RDMA device
    directory; none unless there is a verbs or RDMA-CM node.  A symlink is skipped: a
    name someone planted there must not bring another node (or a file) in."""
    dev = dev_dir(config)
    if not _plain_dir(dev):
        return []
    real_dev = probe.realpath(dev)
    names = [n for n in sorted(probe.listdir(dev))
             if probe.realpath(f"{dev}/{n}") == f"{real_dev}/{n}" and probe.node_type(f"{dev}/{n}") == "c"]
    if not any(n.startswith("uverbs") or n == "rdma_cm" for n in names):
        return []
    return [(f"{real_dev}/{n}", f"{DEV_DIR}/{n}") for n in names]


def present(config: Config) -> bool:
    """Whether this host has an RDMA device mesobox would bind (``--mpi host`` asks)."""
    return bool(rdma_nodes(config))


def _node_mount(src: str, dst: str, allowed: tuple[str, ...]) -> S.Mount:
    require_allowed(src, allowed, f"RDMA device {src}")
    return device_bind(src, dst)


# --- libraries -------------------------------------------------------------------------


def libraries(cache: list[tuple[str, str, str]], wanted: tuple[str, ...]) -> list[tuple[str, str]]:
    """(soname, host path) of each cached library with a ``wanted`` name and a version
    (libibverbs.so.1; not the development link libibverbs.so, which nothing loads)."""
    from mesobox.launch.gpu import libraries as pick

    return [(name, path) for name, path in pick(cache, wanted) if name not in wanted]


def closure(cache: list[tuple[str, str, str]], files: list[str], have: dict[str, str]) -> dict[str, str]:
    """soname -> host path of every library ``files`` need (DT_NEEDED, transitively)
    that ``have`` lacks, found in ``cache``; glibc's own libraries are left out, and so
    is a name the cache lacks (the image may have it; the loader says so if not)."""
    from mesobox.launch.hostlibs import GLIBC_PARTS, elf_needed

    index = cache_index(cache)
    out: dict[str, str] = {}
    todo = list(files)
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in sorted(elf_needed(path) or ()):
            if GLIBC_PARTS.match(name) or name in have or name in out or name not in index:
                continue
            out[name] = index[name]
            todo.append(index[name])
    return out


def provider_files(providers: str) -> tuple[list[str], list[str]]:
    """(plain provider files, targets of provider links) of the provider directory.
    rdma-core installs some providers as links to the vendor's library beside
    libibverbs (libmlx5-rdmav34.so -> ../libmlx5.so.1.24.44.0); a link is followed only
    to a plain file in that directory: any other (a name planted in a tree someone
    moved there) is neither read nor bound, and points at nothing inside."""
    libdir = probe.realpath(os.path.dirname(providers))
    plain, targets = [], []
    for name in sorted(probe.listdir(providers)):
        path = os.path.join(providers, name)
        if not name.endswith(".so"):
            continue
        if _plain_file(path):
            plain.append(path)
            continue
        real = probe.realpath(path)
        if os.path.dirname(real) == libdir and _plain_file(real) and real not in targets:
            targets.append(real)
    return plain, targets


def provider_dir(libibverbs: str) -> str:
    """``libibverbs`` beside the real libibverbs.so.1: where it dlopens providers from
    (its compiled-in path, libdir/libibverbs); "" when that is not a plain directory."""
    folder = os.path.join(os.path.dirname(probe.realpath(libibverbs)), "libibverbs")
    return folder if _plain_dir(folder) else ""


def _plain_dir(path: str) -> bool:
    """A directory that is not reached through a symlink at its last step."""
    parent = probe.realpath(os.path.dirname(path) or "/")
    return probe.isdir(path) and probe.realpath(path) == os.path.join(parent, os.path.basename(path))


def _plain_file(path: str) -> bool:
    return probe.isfile(path) and probe.realpath(path) == os.path.join(probe.realpath(os.path.dirname(path)),
                                                                      os.path.basename(path))


def _file_mount(path: str, dst: str, allowed: tuple[str, ...]) -> S.Mount:
    real = probe.realpath(path)  # libibverbs.so.1 is a link to libibverbs.so.1.14.44.0: bind the file
    require_allowed(real, allowed, f"RDMA file {real}")
    return S.Mount(destination=dst, type="bind", source=real, options=LIB_OPTIONS)


def _override_allowed(config: Config) -> tuple[str, ...]:
    """The site's allowed bind sources rule these binds only where a location was moved
    (a user's own tree); the host's real devices and verbs stack are the site's."""
    if config.rdma_dev_dir or config.host_ld_cache or config.rdma_config_dir:
        return tuple(config.allowed_bind_sources)
    return ()


# --- glibc and environment -------------------------------------------------------------


def check_glibc(image_root: str, files: list[str], flag: str, what: str) -> None:
    """Refuse an image whose glibc is older than the newest ``GLIBC_2.N`` ``files`` need."""
    from pathlib import Path

    from mesobox.launch.hostlibs import glibc_needed, image_glibc

    need = glibc_needed(files)
    have = image_glibc(Path(image_root))
    if have is None:
        raise LaunchError(f"{flag}: the image has no glibc (libc.so.6); {what} need glibc ≥ {need[0]}.{need[1]}",
                          hint="use a glibc-based image")
    if have < need:
        raise LaunchError(f"{flag}: the image's glibc {have[0]}.{have[1]} is older than the {need[0]}.{need[1]} "
                          f"{what} need", hint="use a newer image")


def _environment(image_env: tuple[str, ...]) -> tuple[str, ...]:
    """The library directory first on the image's LD_LIBRARY_PATH.  Entries after the
    image's Env (and after --nv's, which put theirs first already): -e and --env-file
    still win."""
    image = dict(item.partition("=")[::2] for item in image_env)
    ld = ":".join([f"{TOP}/lib"] + [p for p in image.get("LD_LIBRARY_PATH", "").split(":") if p])
    return (f"LD_LIBRARY_PATH={ld}",)
