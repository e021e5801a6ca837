"""MPI bind model (``--mpi host``): the host's Open MPI in an image that has none.

Unit tier: discovery of this host's Open MPI, the option split, the glibc refusal; its
UCX plugins; the MPICH ABI (libmpi.so.12): version strings, the image's MPI, the family
and version refusals (stub libraries), and a program built for it running on the host's
real libmpich (Debian's libmpich12, one rank); --rdma added where the node has RDMA.
Slurm tier: an MPI program compiled on the host runs as 4 ranks on 2 nodes inside a
plain Debian image (glibc, no libmpi), submitted by the ordinary user; each rank
prints the libmpi its process mapped (/proc/self/maps), which must be the host's
library bound under /opt/mesobox/host-mpi/lib.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, need_tool
from mesobox.cli.slurm import split_args
from mesobox.launch import hostmpi
from slurm_support import CACHE, slurm_cluster

__all__ = ["slurm_cluster"]  # fixture used by name below

BENCH_ROOTFS = Path("/var/tmp/mesobox-bench/debian-rootfs")  # made by bench/pull.py
HELLO_MAPS = r"""
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* Prints which libmpi this process mapped and whether the image itself has one. */
int main(int argc, char **argv)
{
    int rank, size, sum = 0;
    char line[512], lib[512] = "none";
    FILE *maps;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    maps = fopen("/proc/self/maps", "r");
    while (maps && fgets(line, sizeof line, maps))
        if (strstr(line, "/libmpi.so")) {
            sscanf(strchr(line, '/'), "%511s", lib);
            break;
        }
    printf("rank=%d size=%d sum=%d libmpi=%s image_has_libmpi=%d\n", rank, size, sum, lib,
           access("/usr/lib/x86_64-linux-gnu/libmpi.so.40", F_OK) == 0);
    MPI_Finalize();
    return 0;
}
"""


def _host_glibc() -> tuple[int, int]:
    major, minor = os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2]  # type: ignore[union-attr]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def host_mpi() -> hostmpi.HostMpi:
    need_tool("ompi_info", "ldd")
    return hostmpi.discover()


def test_discovery_finds_libmpi_plugins_and_pmix_but_no_glibc(host_mpi: hostmpi.HostMpi) -> None:
    libmpi = host_mpi.libs.get("libmpi.so.40")
    assert libmpi is not None and os.path.isfile(libmpi) and not os.path.islink(libmpi), host_mpi.libs
    # Everything the closure binds is a real host file, none of it glibc or the loader.
    assert all(os.path.isfile(p) for p in host_mpi.libs.values())
    assert not [n for n in host_mpi.libs if re.match(r"(libc|libm|libpthread|libdl|ld-linux)[.-]", n)]
    assert "libopen-pal.so.40" in host_mpi.libs and "libpmix.so.2" in host_mpi.libs
    pkglib = [d for d in host_mpi.dirs if list(Path(d).glob("mca_*.so"))]
    assert pkglib, host_mpi.dirs  # Open MPI's plugin directory
    assert (2, 17) <= host_mpi.glibc_needed <= _host_glibc()


def test_elf_needed_agrees_with_readelf(host_mpi: hostmpi.HostMpi) -> None:
    need_tool("readelf")
    plugin_dir = next(d for d in host_mpi.dirs if list(Path(d).glob("mca_*.so")))
    files = [host_mpi.libs["libmpi.so.40"], *sorted(str(p) for p in Path(plugin_dir).glob("mca_*.so"))[:20]]
    for path in files:
        dump = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        assert hostmpi.elf_needed(path) == set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dump)), path
    assert hostmpi.elf_needed(__file__) is None  # not an ELF file


def test_bind_arguments_are_read_only_and_put_host_libs_first(host_mpi: hostmpi.HostMpi) -> None:
    args = hostmpi.exec_args(host_mpi, {"LD_LIBRARY_PATH": "/site/lib"})
    binds = [args[i + 1] for i, a in enumerate(args) if a == "--bind"]
    assert f"{host_mpi.libs['libmpi.so.40']}:/opt/mesobox/host-mpi/lib/libmpi.so.40:ro" in binds
    assert all(b.endswith(":ro") for b in binds)
    envs = [args[i + 1] for i, a in enumerate(args) if a == "--env"]
    assert "LD_LIBRARY_PATH=/opt/mesobox/host-mpi/lib:/site/lib" in envs
    assert f"OPAL_PREFIX={host_mpi.prefix}" in envs


def test_split_keeps_mpi_host_for_mesobox_and_other_mpi_values_for_srun() -> None:
    split = split_args(["--image", "img", "--mpi", "host", "--mpi=pmix", "-n4", "--", "a.out"])
    assert split.run_args == ("--mpi", "host") and split.slurm_args == ("--mpi=pmix", "-n4")
    split = split_args(["--mpi=host", "--mpi", "pmi2", "a.out"])
    assert split.run_args == ("--mpi", "host") and split.slurm_args == ("--mpi", "pmi2")


def _fake_rootfs(top: Path, libc: bytes | None) -> Path:
    root = top / "rootfs"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "bin").mkdir()
    if libc is not None:
        (root / "usr/lib/x86_64-linux-gnu/libc.so.6").write_bytes(b"\x7fELF...\x00" + libc + b"\x00")
    return root


@pytest.mark.userns
@pytest.mark.parametrize(
    ("libc", "message"),
    [
        (b"GNU C Library (fake) stable release version 2.17.", r"image's glibc 2\.17 is older than the 2\.\d+"),
        (None, r"the image has no glibc"),
    ],
)
def test_image_without_a_new_enough_glibc_is_refused_in_one_line(
    libc: bytes | None, message: str, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    need_tool("ompi_info")
    root = _fake_rootfs(world_tmp, libc)
    result = mesobox("slurm", "task", "--mpi", "host", "--", str(root), "/bin/true", as_user=user)
    err = result.stderr.decode()
    assert result.returncode == 125, (result.returncode, err)
    assert re.search(message, err) and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("mesobox: error:")]) == 1, err


def test_image_glibc_is_read_from_directories_and_squashfs(world_tmp: Path) -> None:
    need_tool("mksquashfs", "unsquashfs")
    root = _fake_rootfs(world_tmp, b"GNU C Library (Debian GLIBC 2.31-13) stable release version 2.31.")
    assert hostmpi.image_glibc(root) == (2, 31)
    sqfs = world_tmp / "img.sqfs"
    subprocess.run(["mksquashfs", str(root), str(sqfs), "-quiet", "-noappend"], check=True)
    assert hostmpi.image_glibc(sqfs) == (2, 31)


@pytest.fixture(scope="module")
def bare_debian() -> Path:
    """A Debian rootfs with glibc and no MPI at all."""
    root = BENCH_ROOTFS
    if not (root / "usr/lib/x86_64-linux-gnu/libc.so.6").is_file():
        need_tool("debootstrap")
        root = CACHE / "bare-debian"
        if not (root / "usr/lib/x86_64-linux-gnu/libc.so.6").is_file():
            shutil.rmtree(root, ignore_errors=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
                           check=True, capture_output=True, timeout=600)
    # The test proves nothing if the image could provide an MPI of its own.
    assert not list(root.glob("usr/lib/*/libmpi.so*")) and not list(root.glob("usr/lib/*/libopen-pal*"))
    return root


@pytest.mark.slurm
@pytest.mark.userns
@pytest.mark.slow
def test_host_mpi_hello_across_two_nodes_in_an_image_without_mpi(
    slurm_cluster: Path, bare_debian: Path, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    binary = _compile_hello(world_tmp)
    # Control: without --mpi host the image cannot even load the program.
    result = mesobox("srun", "--image", str(bare_debian), "-N1", "-n1", "--", str(binary),
                     as_user=user, cwd=world_tmp, timeout=120)
    assert result.returncode != 0 and b"libmpi.so.40" in result.stderr, result.stderr.decode()
    result = mesobox("srun", "--image", str(bare_debian), "--mpi", "host", "--mpi=pmix", "-N2", "-n4", "--",
                     str(binary), as_user=user, cwd=world_tmp, timeout=180)
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    ranks = re.findall(r"^rank=(\d) size=4 sum=6 libmpi=(\S+) image_has_libmpi=(\d)$", out, re.M)
    assert sorted(r for r, _, _ in ranks) == ["0", "1", "2", "3"], out
    # The image has no libmpi; each rank mapped the host's, through the bind.
    assert {(lib, has) for _, lib, has in ranks} == {("/opt/mesobox/host-mpi/lib/libmpi.so.40", "0")}, out


def _compile_hello(world_tmp: Path) -> Path:
    need_tool("mpicc")
    source = world_tmp / "hello_maps.c"
    source.write_text(HELLO_MAPS)
    binary = world_tmp / "hello_maps"
    subprocess.run(["mpicc", "-O1", "-o", str(binary), str(source)], check=True)
    return binary


@pytest.mark.userns
def test_exec_mpi_host_resolves_the_program_and_every_plugin_inside(
    bare_debian: Path, host_mpi: hostmpi.HostMpi, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    binary = _compile_hello(world_tmp)
    plugins = next(d for d in host_mpi.dirs if list(Path(d).glob("mca_*.so")))
    # ldd here is the image's (its loader, its glibc): it resolves what a rank would load.
    script = (f'echo "LD=$LD_LIBRARY_PATH"; ldd {binary}; n=$(ls {plugins}/*.so | wc -l); '
              f'bad=$(ldd {plugins}/*.so 2>&1 | grep -c -e "not found" -e "No such" -e "cannot"); '
              'echo "plugins=$n bad=$bad"')
    result = mesobox("exec", "--mpi", "host", str(bare_debian), "/bin/sh", "-c", script, as_user=user, cwd=world_tmp)
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    assert out.startswith("LD=/opt/mesobox/host-mpi/lib"), out
    assert re.search(r"libmpi\.so\.40 => /opt/mesobox/host-mpi/lib/libmpi\.so\.40 ", out), out
    # Every Open MPI plugin is visible and none misses a library inside the image.
    assert out.split()[-2:] == [f"plugins={len(list(Path(plugins).glob('*.so')))}", "bad=0"], out


@pytest.mark.userns
def test_exec_rejects_an_unknown_mpi_model(bare_debian: Path, mesobox: Mesobox, user: User) -> None:
    result = mesobox("exec", "--mpi", "mpich", str(bare_debian), "/bin/true", as_user=user)
    err = result.stderr.decode()
    assert result.returncode == 2 and "unknown MPI model" in err and "Traceback" not in err, err


# --- transports: UCX and libfabric plugins, RDMA -----------------------------------------


def test_discovery_brings_the_ucx_plugins_and_what_they_need(host_mpi: hostmpi.HostMpi) -> None:
    ucx = Path(host_mpi.libs["libucs.so.0"]).parent / "ucx"
    if not ucx.is_dir():
        pytest.skip(f"this host's UCX has no plugin directory {ucx}")
    assert str(ucx) in host_mpi.dirs, host_mpi.dirs
    # libuct_ib needs libmlx5, which neither libmpi nor an Open MPI plugin links.
    needed = set().union(*(hostmpi.elf_needed(str(p)) or set() for p in ucx.glob("*.so.0")))
    assert "libmlx5.so.1" in needed and "libmlx5.so.1" in host_mpi.libs, sorted(host_mpi.libs)
    # A plugin stays in its directory; it is not bound a second time under the library directory.
    assert not [n for n, p in host_mpi.libs.items() if Path(p).parent == ucx], host_mpi.libs
    fabric = Path(host_mpi.libs["libfabric.so.1"]).parent / "libfabric"
    assert (str(fabric) in host_mpi.dirs) == fabric.is_dir()


@pytest.mark.userns
def test_exec_mpi_host_resolves_every_ucx_plugin_inside(bare_debian: Path, host_mpi: hostmpi.HostMpi,
                                                        mesobox: Mesobox, user: User) -> None:
    ucx = next((d for d in host_mpi.dirs if d.endswith("/ucx")), None)
    if ucx is None:
        pytest.skip("this host's MPI links no UCX with a plugin directory")
    script = f'n=$(ls {ucx}/*.so.0 | wc -l); bad=$(ldd {ucx}/*.so.0 2>&1 | grep -c "not found"); echo "$n $bad"'
    result = mesobox("exec", "--mpi", "host", str(bare_debian), "/bin/sh", "-c", script, as_user=user)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [str(len(list(Path(ucx).glob("*.so.0")))).encode(), b"0"], result.stdout


# --- the MPICH ABI (libmpi.so.12) ----------------------------------------------------------

# No mpi.h: the MPICH ABI fixes its handles as integers, so this is how any program built
# with MPICH, Cray MPICH, Intel MPI or MVAPICH calls the library.
HELLO_ABI = r"""
#include <stdio.h>
#include <string.h>
typedef int MPI_Comm, MPI_Datatype, MPI_Op;
#define MPI_COMM_WORLD ((MPI_Comm) 0x44000000)
#define MPI_INT ((MPI_Datatype) 0x4c000405)
#define MPI_SUM ((MPI_Op) 0x58000003)
int MPI_Init(int *, char ***);
int MPI_Comm_rank(MPI_Comm, int *);
int MPI_Comm_size(MPI_Comm, int *);
int MPI_Allreduce(const void *, void *, int, MPI_Datatype, MPI_Op, MPI_Comm);
int MPI_Get_library_version(char *, int *);
int MPI_Finalize(void);
int main(int argc, char **argv)
{
    int rank, size, sum = -1, len;
    char version[8192], line[512], lib[512] = "none";
    FILE *maps;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Get_library_version(version, &len);
    maps = fopen("/proc/self/maps", "r");
    while (maps && fgets(line, sizeof line, maps))
        if (strstr(line, "/libmpich.so") || strstr(line, "/libmpi.so")) {
            sscanf(strchr(line, '/'), "%511s", lib);
            break;
        }
    printf("rank=%d size=%d sum=%d lib=%s %.*s\n", rank, size, sum, lib, (int) strcspn(version, "\n"), version);
    MPI_Finalize();
    return 0;
}
"""
STUB = ("int MPI_Init(void *a, void *b) { return 0; } int MPI_Comm_rank(int c, int *r) { return 0; }\n"
        "int MPI_Comm_size(int c, int *s) { return 0; } int MPI_Finalize(void) { return 0; }\n"
        "int MPI_Allreduce(const void *a, void *b, int n, int t, int o, int c) { return 0; }\n"
        "int MPI_Get_library_version(char *v, int *n) { return 0; }\n")


def _gcc_shared(out: Path, soname: str, source: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(out), str(src)], check=True)
    src.unlink()
    os.chmod(out, 0o755)
    return out


def _fake_mpich(top: Path, soname: str, version: str) -> Path:
    """A library named like an MPICH-ABI libmpi that says its version, and its ldconfig
    cache (which also lists the host's trusted directories, after it: libmpi.so.12, the
    ABI's name, is looked up first, so a host's Debian libmpich.so.12 does not win)."""
    (top / "lib").mkdir(parents=True, mode=0o755)
    text = f"{STUB}__attribute__((used)) const char version[] = \"MPICH Version:\\t{version}\\n\";\n"
    _gcc_shared(top / "lib" / soname, soname, text)
    subprocess.run(["ldconfig", "-f", "/dev/null", "-C", str(top / "ld.so.cache"), str(top / "lib")], check=True)
    os.chmod(top / "ld.so.cache", 0o644)
    return top / "ld.so.cache"


def _host_mpich() -> Path:
    found = [line.split(" => ")[1] for line in
             subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout.splitlines()
             if line.strip().startswith(("libmpich.so.12 ", "libmpi.so.12 ")) and "x86-64" in line]
    if not found:
        pytest.skip("no MPICH-ABI library on this host (setup-host.sh installs libmpich12)")
    return Path(os.path.realpath(found[0]))


def _glibc_image(top: Path, mpi: tuple[str, Path] | None) -> Path:
    """A busybox rootfs with the host's glibc (libc, libm, the loader): a glibc image
    small enough to make per test; ``mpi``: (name, file) of the MPI it was built with."""
    from conftest import open_busybox_rootfs

    root = open_busybox_rootfs(top / "image")
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True, mode=0o755)
    for name in ("libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"):
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", libdir / name)
    (root / "lib64").mkdir(mode=0o755)
    os.symlink("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")
    if mpi is not None:
        shutil.copy2(mpi[1], libdir / mpi[0])
    return root


def test_mpich_version_is_read_from_real_and_spelled_out_builds(world_tmp: Path) -> None:
    assert hostmpi.mpich_version(b"x\x00MPICH Version:\t3.4.2\nMPICH Release") == "3.4.2"
    assert hostmpi.mpich_version(b"MPICH Version:\t%s\n\x00Thu Apr  7 12:34:45 CDT 2022\x004.1a1\x00") == "4.1a1"
    assert hostmpi.mpich_version(b"no version here 4.0.2") is None
    assert hostmpi._version_key("4.1a1") == (4, 1) < hostmpi._version_key("4.1.2") == (4, 1, 2)
    real = _host_mpich()
    mpich = hostmpi.discover_mpich()
    assert mpich is not None and mpich.family == hostmpi.MPICH_ABI
    # Debian's MPICH 4.0.2 library carries its version as MPICH's build strings.
    assert mpich.version and mpich.version == hostmpi.mpich_version(real.read_bytes()), mpich.version
    # Bound under the ABI's name and Debian's; no glibc part.
    assert mpich.libs["libmpi.so.12"] == mpich.libs["libmpich.so.12"] == str(real)
    assert not [n for n in mpich.libs if re.match(r"(libc|libm|libpthread|libdl|ld-linux)[.-]", n)]
    args = hostmpi.exec_args(mpich, {})
    assert f"{real}:/opt/mesobox/host-mpi/lib/libmpi.so.12:ro" in args
    assert not [a for a in args if a.startswith("OPAL_PREFIX=")]


def test_image_mpi_is_found_in_directories_and_squashfs_without_leaving_the_image(world_tmp: Path) -> None:
    need_tool("mksquashfs")
    root = world_tmp / "r"
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    _gcc_shared(libdir / "libmpich.so.12.1.0", "libmpich.so.12", 'const char v[] = "MPICH Version:\\t3.4.1\\n";\n')
    os.symlink("libmpich.so.12.1.0", libdir / "libmpich.so.12")
    assert hostmpi.image_mpi(root) == (hostmpi.MPICH_ABI, "libmpich.so.12", "3.4.1")
    sqfs = world_tmp / "img.sqfs"
    subprocess.run(["mksquashfs", str(root), str(sqfs), "-quiet", "-noappend"], check=True)
    assert hostmpi.image_mpi(sqfs) == (hostmpi.MPICH_ABI, "libmpich.so.12", "3.4.1")
    # An absolute /lib link leads to the host's directories: what is there is not the image's.
    other = world_tmp / "o"
    other.mkdir()
    os.symlink("/usr/lib", other / "usr")
    assert hostmpi.image_mpi(other) is None
    (libdir / "libmpi.so.40").write_bytes(b"")
    assert hostmpi.image_mpi(root) == (hostmpi.OPEN_MPI, "libmpi.so.40", "")


@pytest.mark.userns
@pytest.mark.parametrize("built_as", ["libmpich.so.12", "libmpi.so.12"])
def test_mpich_abi_program_runs_on_the_hosts_mpich(built_as: str, mesobox: Mesobox, user: User,
                                                   world_tmp: Path) -> None:
    """A program built with MPICH (Debian's libmpich.so.12, or the ABI's libmpi.so.12 as
    upstream MPICH, Cray and Intel install it) in an image carrying its own MPICH runs on
    the host's library: MPI_Init (a singleton), an Allreduce, the library's version."""
    real = _host_mpich()
    stub = _gcc_shared(world_tmp / built_as, built_as, STUB)
    (world_tmp / "hello.c").write_text(HELLO_ABI)
    binary = world_tmp / "hello"
    subprocess.run(["gcc", "-o", str(binary), str(world_tmp / "hello.c"), str(stub)], check=True)
    image = _glibc_image(world_tmp, (built_as, real))
    result = mesobox("exec", "--mpi", "host", str(image), str(binary), as_user=user, cwd=world_tmp, timeout=120)
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    version = hostmpi.mpich_version(real.read_bytes())
    assert out.strip() == (f"rank=0 size=1 sum=0 lib=/opt/mesobox/host-mpi/lib/{built_as} "
                           f"MPICH Version:\t{version}"), out
    # Control: without --mpi host the loader takes the image's own copy, which cannot
    # even load here (the image lacks the libraries it needs).
    result = mesobox("exec", str(image), str(binary), as_user=user, cwd=world_tmp, timeout=120)
    assert result.returncode != 0 and b"libhwloc.so.15" in result.stderr, result.stderr.decode()


def _refused(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode == 125, (result.returncode, err)
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("mesobox: error:")]) == 1, err
    return err


@pytest.mark.userns
def test_an_image_built_with_a_newer_mpich_is_refused(mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    cache = _fake_mpich(world_tmp / "host", "libmpi.so.12", "4.0.2")
    image_lib = _gcc_shared(world_tmp / "libmpi.so.12", "libmpi.so.12", 'const char v[] = "MPICH Version:\\t4.1.1\\n";')
    image = _glibc_image(world_tmp, ("libmpi.so.12", image_lib))
    env = {"MESOBOX_HOST_LD_CACHE": str(cache)}
    err = _refused(mesobox("exec", "--mpi", "host", str(image), "/bin/true", as_user=user, env=env))
    assert "built with MPICH-ABI MPI 4.1.1, newer than this node's MPICH 4.0.2" in err, err
    # The other way round is the ABI's promise: a newer runtime serves an older build.
    older = _gcc_shared(world_tmp / "old.so", "libmpi.so.12", 'const char v[] = "MPICH Version:\\t3.3\\n";')
    shutil.copy2(older, image / "usr/lib/x86_64-linux-gnu/libmpi.so.12")
    result = mesobox("exec", "--mpi", "host", str(image), "/bin/sh", "-c", "echo $LD_LIBRARY_PATH",
                     as_user=user, env=env)
    assert result.returncode == 0 and result.stdout.startswith(b"/opt/mesobox/host-mpi/lib"), result.stderr


@pytest.mark.userns
def test_an_mpich_image_on_an_open_mpi_node_is_refused(mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    need_tool("ompi_info")
    top = world_tmp / "empty"
    (top / "lib").mkdir(parents=True)
    subprocess.run(["ldconfig", "-r", str(top), "-f", "/dev/null", "-C", "/ld.so.cache", "/lib"], check=True)
    os.chmod(top / "ld.so.cache", 0o644)
    image_lib = _gcc_shared(world_tmp / "libmpich.so.12", "libmpich.so.12", STUB)
    image = _glibc_image(world_tmp, ("libmpich.so.12", image_lib))
    err = _refused(mesobox("exec", "--mpi", "host", str(image), "/bin/true", as_user=user,
                           env={"MESOBOX_HOST_LD_CACHE": str(top / "ld.so.cache")}))
    assert "the image's MPI has the MPICH ABI (libmpich.so.12) but this node's MPI is Open MPI" in err, err


def test_an_open_mpi_image_on_an_mpich_node_is_refused(world_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _fake_mpich(world_tmp / "host", "libmpi.so.12", "4.0.2")
    image = _glibc_image(world_tmp, ("libmpi.so.40", _gcc_shared(world_tmp / "o.so", "libmpi.so.40", STUB)))
    which = shutil.which
    monkeypatch.setattr(hostmpi.shutil, "which", lambda name: None if name == "ompi_info" else which(name))
    with pytest.raises(hostmpi.LaunchError, match=r"image's MPI is Open MPI \(libmpi\.so\.40\) but this node's "
                                                  r"is MPICH 4\.0\.2 \(libmpi\.so\.12\)"):
        hostmpi.choose(image, str(cache))
    # An image with no MPI of its own takes the MPICH the node has.
    bare = _glibc_image(world_tmp / "bare", None)
    assert hostmpi.choose(bare, str(cache)).family == hostmpi.MPICH_ABI


@pytest.mark.userns
def test_mpi_host_adds_the_rdma_binds_where_the_node_has_rdma(mesobox: Mesobox, user: User,
                                                              world_tmp: Path) -> None:
    from test_rdma import _fake_tree

    env = _fake_tree(world_tmp / "ib")
    real = _host_mpich()
    image = _glibc_image(world_tmp, ("libmpich.so.12", real))
    script = "stat -c '%n %F' /dev/infiniband/uverbs0; echo $LD_LIBRARY_PATH"
    result = mesobox("exec", "--mpi", "host", str(image), "/bin/sh", "-c", script, as_user=user, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == [
        "/dev/infiniband/uverbs0 character special file", "/opt/mesobox/host-mpi/lib:/.mesobox/rdma/lib"]
