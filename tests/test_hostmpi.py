"""MPI bind model (``--mpi host``): the host's Open MPI in an image that has none.

Unit tier: discovery of this host's Open MPI, the option split, the glibc refusal.
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
