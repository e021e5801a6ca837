"""MPI bind model (``--mpi host``): run an image's MPI program on the host's MPI.

Room: discovery of the host's MPI — Open MPI, or one with the MPICH ABI (MPICH, Cray
MPICH, Intel MPI, MVAPICH: ``libmpi.so.12``) — and the ``mesobox exec`` arguments that
bind it into a container (as Sarus' and Shifter's MPI hooks do).  Steps:

0. Which MPI: the image's own tells the ABI it was built for (``libmpi.so.40``: Open
   MPI; ``libmpi.so.12`` or Debian's ``libmpich.so.12``: the MPICH ABI), found in its
   library directories without following a symlink out of the image.  A host MPI of
   the other family is refused with one line naming both; for the MPICH ABI the host's
   version must be at least the image's (the ABI lets a newer library serve an older
   build).  An image without an MPI gets the host's Open MPI, else its MPICH.
1. Open MPI: ``ompi_info --parsable --path all`` names the install (prefix, libdir,
   plugin dir ``pkglibdir``, help files ``pkgdatadir``, ``sysconfdir``).  MPICH ABI:
   the ldconfig cache names the library (its version from the library's own strings),
   bound under both names, with its Fortran and C++ companions.
2. ``ldd`` on libmpi, and on each Open MPI / PMIx plugin that needs (DT_NEEDED,
   read here from its ELF dynamic section) a library not already found, gives the
   library closure; glibc's own libraries and the dynamic loader are left out, because
   they must come from the image (a process has exactly one libc, the one its
   loader — the image's — maps; ld.so(8)).
3. ABI check: every ``GLIBC_2.N`` symbol version the closure needs (its
   ``.gnu.version_r`` names, which are plain strings in ``.dynstr``) must be
   provided by the image's libc.so.6; an older image is refused with one line.
4. Binds, all read-only: each closure library onto
   ``/opt/mesobox/host-mpi/lib/<soname>``; the plugin, help-file and config
   directories at their host paths (Open MPI looks for them at its configured
   paths; OPAL_PREFIX names that prefix for relocated installs).
   ``LD_LIBRARY_PATH`` inside starts with ``/opt/mesobox/host-mpi/lib``.  Where the
   closure links UCX or libfabric, their plugin directories (``<libdir>/ucx``,
   ``<libdir>/libfabric``) are bound at their host paths too, with what the plugins need.
5. Where the node has an RDMA device (``/dev/infiniband``), ``--rdma`` is added
   (launch/rdma.py: the device nodes, the verbs stack and its providers); quietly not
   where it has none.

Invariants: nothing here mounts anything — it only produces ``--bind``/``--env``
arguments that go through the runtime's ordinary, checked bind path (nosuid,
nodev, ro).  No glibc part of the host is ever bound.  Stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesobox.errors import LaunchError, UsageError
from mesobox.launch.hostlibs import GLIBC_PARTS, cache_index, elf_needed, glibc_needed, image_glibc, ld_cache

CONTAINER_LIBDIR = "/opt/mesobox/host-mpi/lib"
OPEN_MPI, MPICH_ABI = "Open MPI", "MPICH ABI"
# The MPICH ABI's libraries (MPICH, Cray MPICH, Intel MPI, MVAPICH): the ABI's names and
# Debian's (libmpich.so.12…); the host's file is bound under both, so a program built
# either way finds it.
MPICH_NAMES = (("libmpi.so.12", "libmpich.so.12"), ("libmpifort.so.12", "libmpichfort.so.12"),
               ("libmpicxx.so.12", "libmpichcxx.so.12"))
# Where an image keeps its MPI (symlinks leaving the image are not followed).
IMAGE_LIBDIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib/powerpc64le-linux-gnu",
                 "usr/lib64", "usr/lib", "lib/x86_64-linux-gnu", "lib64", "lib", "usr/local/lib", "usr/local/lib64")
# MPI_Get_library_version's text where a build spells it out, and MPICH's build strings:
# the release date (MPII_Version_date) right before the version (MPII_Version_string).
MPICH_VERSION = re.compile(rb"(?:MPICH|MVAPICH2?) Version:\t(\d+(?:\.\d+)+[a-z0-9]*)\n")
MPICH_DATED = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d [A-Z]{2,5} \d{4}\x00+"
                         rb"(\d+\.\d+(?:\.\d+)?(?:[a-z]+\d*)?)\x00")


@dataclass(frozen=True)
class HostMpi:
    """The host's Open MPI as the container needs it."""

    prefix: str
    libs: dict[str, str]  # soname -> real host file
    dirs: tuple[str, ...]  # plugin/help/config directories, bound at their host paths
    glibc_needed: tuple[int, int]  # highest GLIBC_2.N the closure needs, as (2, N)
    family: str = OPEN_MPI  # OPEN_MPI or MPICH_ABI
    version: str = ""  # e.g. "4.0.2" (MPICH ABI); "" when unknown


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"--mpi host: {name} not found on this node",
                          hint="install the host MPI (e.g. openmpi-bin) or drop --mpi host")
    return path


def _ompi_paths() -> dict[str, str]:
    """``ompi_info --parsable --path all`` → {"libdir": …, "pkglibdir": …}."""
    proc = subprocess.run([_tool("ompi_info"), "--parsable", "--path", "all"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LaunchError(f"--mpi host: ompi_info failed: {proc.stderr.strip() or proc.returncode}")
    paths: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        kind, _, rest = line.partition(":")
        key, _, value = rest.partition(":")
        if kind == "path" and value:
            paths[key] = value
    if "libdir" not in paths or "prefix" not in paths:
        raise LaunchError("--mpi host: ompi_info named no libdir/prefix", hint="is this Open MPI ≥ 3?")
    return paths


def _plugins(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(str(p) for p in Path(directory).glob("*.so"))


def ldd_closure(files: list[str]) -> dict[str, str]:
    """soname -> real path of every library ``files`` load, glibc excluded.

    One ``ldd`` run for all files (it prints a ``FILE:`` header per file); a
    library ldd cannot find is an error: the rank would fail the same way."""
    proc = subprocess.run([_tool("ldd"), *files], capture_output=True, text=True, check=False)
    libs: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow or GLIBC_PARTS.match(name):
            continue
        target = rest.split(" (")[0].strip()
        if target == "not found":
            raise LaunchError(f"--mpi host: the host MPI needs {name}, which this node lacks",
                              hint="repair the host MPI install (ldd reports it missing)")
        libs.setdefault(name, os.path.realpath(target))
    return libs


def _soname(real: str) -> str:
    """The ``libmpi.so.N`` link naming ``real`` (ldconfig(8) makes it), else the file name."""
    for link in sorted(Path(real).parent.glob("libmpi.so.*")):
        if re.fullmatch(r"libmpi\.so\.\d+", link.name) and os.path.realpath(link) == real:
            return link.name
    return os.path.basename(real)


def _more(libs: dict[str, str], plugins: list[str]) -> dict[str, str]:
    """Closure of the plugins that need a library ``libs`` lacks (ldd, one run).

    ldd starts the loader once per file (~7 ms each): skipping the plugins whose
    DT_NEEDED names are all known already takes discovery from ~0.9 s to ~0.2 s."""
    todo = []
    for plugin in plugins:
        needed = elf_needed(plugin)
        if needed is None or any(n not in libs and not GLIBC_PARTS.match(n) for n in needed):
            todo.append(plugin)
    found = ldd_closure(todo) if todo else {}
    return {name: path for name, path in found.items() if name not in libs}


def _closure(libmpi: str, plugins: list[str]) -> dict[str, str]:
    libs = ldd_closure([libmpi])
    libs.setdefault(_soname(libmpi), libmpi)
    libs.update(_more(libs, plugins))
    return libs


def discover() -> HostMpi:
    """Find the host's Open MPI, its closure and what it needs from glibc."""
    paths = _ompi_paths()
    libmpi = os.path.realpath(os.path.join(paths["libdir"], "libmpi.so"))
    if not os.path.isfile(libmpi):
        raise LaunchError(f"--mpi host: no libmpi.so in {paths['libdir']}", hint="install the MPI development files")
    libs = _closure(libmpi, _plugins(paths.get("pkglibdir", "")))
    dirs = [paths[k] for k in ("pkglibdir", "pkgdatadir", "sysconfdir") if os.path.isdir(paths.get(k, ""))]
    if "libpmix.so.2" in libs:
        # PMIx loads its own plugins from <its libdir>/pmix and help files from ../share/pmix.
        pmix_lib = os.path.dirname(libs["libpmix.so.2"])
        pmix_plugins = os.path.join(pmix_lib, "pmix")
        if _plugins(pmix_plugins):
            libs.update(_more(libs, _plugins(pmix_plugins)))
            dirs.append(pmix_plugins)
        share = os.path.normpath(os.path.join(pmix_lib, "..", "share", "pmix"))
        dirs += [share] if os.path.isdir(share) else []
    dirs += _transports(libs)
    return HostMpi(paths["prefix"], libs, tuple(dirs), glibc_needed(sorted(set(libs.values()))))


def _transports(libs: dict[str, str]) -> list[str]:
    """UCX's and libfabric's plugin directories, where the closure links them, and what
    those plugins need (added to ``libs``).  Both look for plugins beside their library
    at its configured path (UCX: <libdir>/ucx, its UCX_MODULE_DIR default; libfabric:
    <libdir>/libfabric, its FI_PROVIDER_PATH default), so they are bound at their host
    paths.  A plugin's own directory is not bound twice through the library directory."""
    dirs = []
    for lib, sub in (("libucs.so.0", "ucx"), ("libfabric.so.1", "libfabric")):
        if lib not in libs:
            continue
        folder = os.path.join(os.path.dirname(libs[lib]), sub)
        if os.path.isdir(folder) and not os.path.islink(folder):
            found = _more(libs, sorted(str(p) for p in Path(folder).glob("*.so*") if not p.is_symlink()))
            libs.update({n: p for n, p in found.items() if os.path.dirname(p) != folder})
            dirs.append(folder)
    return dirs


def discover_mpich(cache_file: str = "") -> HostMpi | None:
    """The host's MPICH-ABI MPI, found in the ldconfig cache (libmpi.so.12 or Debian's
    libmpich.so.12); None when it has none."""
    index = cache_index(ld_cache(cache_file))
    main = index.get("libmpi.so.12") or index.get("libmpich.so.12")
    if main is None:
        return None
    libmpi = os.path.realpath(main)
    libs = ldd_closure([libmpi])
    for names in MPICH_NAMES:
        path = next((index[n] for n in names if n in index), None)
        if path is not None:
            libs.update(dict.fromkeys(names, os.path.realpath(path)))
    companions = sorted({p for n, p in libs.items() if n in MPICH_NAMES[1] + MPICH_NAMES[2]})
    if companions:  # the Fortran and C++ bindings bring their own needs (libgfortran…)
        libs.update(_more(libs, companions))
    dirs = _transports(libs)
    version = mpich_version(Path(libmpi).read_bytes()) or ""
    prefix = os.path.dirname(libmpi)
    return HostMpi(prefix, libs, tuple(dirs), glibc_needed(sorted(set(libs.values()))), MPICH_ABI, version)


def mpich_version(data: bytes) -> str | None:
    """The version an MPICH-ABI library was built as, from its bytes; None if unknown."""
    match = MPICH_VERSION.search(data)
    if match is None and b"MPICH Version:" in data:
        match = MPICH_DATED.search(data)
    return match.group(1).decode() if match else None


def _version_key(text: str) -> tuple[int, ...]:
    """"4.0.2" → (4, 0, 2); a pre-release suffix (4.1a1, 4.1rc2) counts as its release."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def image_mpi(image: Path) -> tuple[str, str, str] | None:
    """(family, library name, version) of the MPI an image carries, or None."""
    names = _image_libs(image)
    if "libmpi.so.40" in names:
        return OPEN_MPI, "libmpi.so.40", ""
    for name in MPICH_NAMES[0]:
        if name in names:
            data = _image_file(image, names[name])
            return MPICH_ABI, name, (mpich_version(data) or "") if data else ""
    return None


def _image_libs(image: Path) -> dict[str, str]:
    """MPI library name → its path inside the image (symlinks resolved inside the image;
    a name whose directory leaves the image is not the image's)."""
    wanted = ("libmpi.so.40", *MPICH_NAMES[0])
    found: dict[str, str] = {}
    if image.is_dir():
        top = os.path.realpath(image)
        for rel in IMAGE_LIBDIRS:
            folder = os.path.realpath(image / rel)
            if folder != top and not folder.startswith(top + os.sep):
                continue
            for name in wanted:
                if name not in found and os.path.lexists(os.path.join(folder, name)):
                    found[name] = os.path.relpath(os.path.join(folder, name), top)
        return found
    proc = subprocess.run([_tool("unsquashfs"), "-lls", "-d", "", str(image), *IMAGE_LIBDIRS],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        # "lrwxrwxrwx root/root  18 2024-01-01 00:00 /usr/lib/…/libmpich.so.12 -> libmpich.so.12.2.2"
        entry = re.search(r" \d\d:\d\d (/.*)$", line)
        if entry is None:
            continue
        path, _, target = entry.group(1).partition(" -> ")
        name = os.path.basename(path)
        if name in wanted and name not in found:
            rel = path.lstrip("/")
            if target:
                rel = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                       else os.path.join(os.path.dirname(rel), target))
            found[name] = rel
    return found


def _image_file(image: Path, rel: str) -> bytes | None:
    """A file of the image (a rootfs directory or a squashfs file), never one outside it."""
    if image.is_dir():
        top = os.path.realpath(image)
        path = os.path.realpath(image / rel)
        if path.startswith(top + os.sep) and os.path.isfile(path):
            return Path(path).read_bytes()
        return None
    if rel.startswith(".."):
        return None
    proc = subprocess.run([_tool("unsquashfs"), "-cat", str(image), rel], capture_output=True, check=False)
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


def check_abi(mpi: HostMpi, image: Path) -> None:
    """Refuse an image whose glibc is older than what the host MPI was linked against."""
    if not image.exists():
        raise LaunchError(f"--mpi host: no image at {image}", hint="give a rootfs directory or a squashfs file")
    have = image_glibc(image)
    need = f"{mpi.glibc_needed[0]}.{mpi.glibc_needed[1]}"
    if have is None:
        raise LaunchError(f"--mpi host: the image has no glibc (libc.so.6); the host MPI needs glibc ≥ {need}",
                          hint="use a glibc-based image, or the image's own MPI (drop --mpi host)")
    if have < mpi.glibc_needed:
        raise LaunchError(f"--mpi host: the image's glibc {have[0]}.{have[1]} is older than the {need} "
                          "the host MPI needs", hint="use a newer image, or the image's own MPI (drop --mpi host)")


def exec_args(mpi: HostMpi, env: Mapping[str, str], more_libdirs: list[str] | None = None) -> list[str]:
    """``mesobox exec`` arguments binding ``mpi`` into the container; ``more_libdirs``
    follow the MPI's on LD_LIBRARY_PATH (--rdma's: our --env outranks its image-level one)."""
    args: list[str] = []
    for soname, path in sorted(mpi.libs.items()):
        args += ["--bind", f"{path}:{CONTAINER_LIBDIR}/{soname}:ro"]
    for directory in mpi.dirs:
        args += ["--bind", f"{directory}:{directory}:ro"]
    old = env.get("LD_LIBRARY_PATH")
    ld = ":".join([CONTAINER_LIBDIR, *(more_libdirs or []), *([old] if old else [])])
    args += ["--env", f"LD_LIBRARY_PATH={ld}"]
    if mpi.family == OPEN_MPI:
        # Open MPI finds its plugins relative to OPAL_PREFIX when the install was moved.
        args += ["--env", f"OPAL_PREFIX={mpi.prefix}"]
    return args


def choose(image: Path, cache_file: str = "") -> HostMpi:
    """The host MPI for this image: the family the image was built with (Open MPI's
    libmpi.so.40, or the MPICH ABI's libmpi.so.12); for an image without an MPI, Open
    MPI where the host has it, else its MPICH-ABI MPI.  One line where they differ."""
    wanted = image_mpi(image) if image.exists() else None
    if wanted is None or wanted[0] == OPEN_MPI:
        if shutil.which("ompi_info") is not None:
            return discover()
        mpich = discover_mpich(cache_file)
        if mpich is None:
            _tool("ompi_info")  # the error naming what is missing
        assert mpich is not None
        if wanted is None:
            return mpich
        raise LaunchError(f"--mpi host: the image's MPI is Open MPI (libmpi.so.40) but this node's is "
                          f"{_named(mpich)} (libmpi.so.12)",
                          hint="an MPI library can only replace one of the same ABI: use the image's own MPI "
                               "(drop --mpi host)")
    mpich = discover_mpich(cache_file)
    if mpich is None:
        other = "Open MPI (libmpi.so.40)" if shutil.which("ompi_info") else "none"
        raise LaunchError(f"--mpi host: the image's MPI has the MPICH ABI ({wanted[1]}) but this node's MPI is "
                          f"{other}", hint="an MPI library can only replace one of the same ABI: use the image's "
                                          "own MPI (drop --mpi host)")
    if wanted[2] and mpich.version and _version_key(mpich.version) < _version_key(wanted[2]):
        raise LaunchError(f"--mpi host: the image was built with MPICH-ABI MPI {wanted[2]}, newer than this node's "
                          f"{_named(mpich)}", hint="the MPICH ABI lets a newer library serve an older build, not "
                                                  "the reverse: use the image's own MPI (drop --mpi host)")
    return mpich


def _named(mpi: HostMpi) -> str:
    return f"{mpi.family} {mpi.version}".strip() if mpi.family == OPEN_MPI else f"MPICH {mpi.version}".strip()


def host_mpi_args(image: Path, env: Mapping[str, str]) -> list[str]:
    """Discover, check the image, and return the ``mesobox exec`` arguments for
    ``--mpi host``: binds, environment, and ``--rdma`` where the node has an RDMA device
    (its verbs stack is what the MPI's UCX or libfabric drive)."""
    from mesobox.config import load_config
    from mesobox.launch import rdma

    config = load_config(dict(env))
    mpi = choose(image, config.host_ld_cache)
    check_abi(mpi, image)
    if not rdma.present(config):
        return exec_args(mpi, env)
    return [*exec_args(mpi, env, [f"{rdma.TOP}/lib"]), "--rdma"]


def with_host_mpi(values: dict[str, Any], mode: str, image: str) -> dict[str, Any]:
    """``mesobox exec/run --mpi host``: parsed run options plus the host MPI's binds/env.

    The user's own ``--bind``/``--env`` come after ours, so they still win."""
    if mode != "host":
        raise UsageError(f"--mpi {mode}: unknown MPI model", hint="the only model is `--mpi host` (the host's MPI)")
    args = host_mpi_args(Path(image), os.environ)
    rdma = "--rdma" in args
    args = [a for a in args if a != "--rdma"]
    binds = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "--bind"]
    envs = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "--env"]
    out = dict(values)
    if rdma:
        out["rdma"] = True
    out["binds"] = (*binds, *values.get("binds", ()))
    out["env"] = (*envs, *values.get("env", ()))
    return out
