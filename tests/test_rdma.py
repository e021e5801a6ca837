"""--rdma against a fake InfiniBand tree (this machine has no RDMA adapter): root makes
character devices named like the kernel's (uverbs0, rdma_cm, umad0: copies of /dev/null,
1:3, and /dev/zero, 1:5, mode 0666) in a directory of the test's own; gcc compiles shared
objects with the verbs stack's sonames, a provider in a ``libibverbs`` directory beside
them and a libibverbs.d config directory; their own ldconfig cache (``ldconfig -C``).  The
config keys rdma_dev_dir, rdma_config_dir and host_ld_cache point mesobox at them.  An
ordinary user then runs the container (a busybox rootfs with a stand-in libc.so.6 that
only names its glibc release: busybox itself is static).  Last, this host's real rdma-core
(libibverbs and its providers, no adapter) in a Debian image that lacks it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs
from run_support import error_text
from test_hostmpi import bare_debian

__all__ = ["bare_debian"]  # fixture used by name below

# A library that needs glibc ≥ 2.25 (getrandom): the image's glibc is checked against it.
NEW_GLIBC = "#include <sys/random.h>\nint v(void *b) { return (int) getrandom(b, 1, 0); }\n"


def _node(path: Path, minor: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    os.chmod(path, 0o666)  # past root's umask


def _shared(out: Path, soname: str, needs: tuple[str, ...] = (), source: str = "int f(void) { return 0; }\n",
            lib: Path | None = None) -> None:
    src = out.parent.parent / f"{out.name}.c"  # not in a provider directory
    src.write_text(source)
    links = [f"-L{lib}", *[f"-l:{n}" for n in needs]] if needs else []
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-Wl,--no-as-needed", "-o", str(out),
                    str(src), *links], check=True)
    os.chmod(out, 0o755)


def _fake_tree(top: Path, glibc_source: str = "int f(void) { return 0; }\n") -> dict[str, str]:
    top.mkdir(mode=0o755)
    for name, minor in (("uverbs0", 3), ("rdma_cm", 5), ("umad0", 3)):
        _node(top / "dev" / name, minor)
    (top / "dev" / "README").write_text("not a device\n")
    # Planted: a symlink to a host device node must not be bound.
    os.symlink("/dev/zero", top / "dev" / "uverbs9")
    lib = top / "lib"
    lib.mkdir(mode=0o755)
    _shared(lib / "libnl-fake.so.200", "libnl-fake.so.200")
    _shared(lib / "libprovonly.so.1", "libprovonly.so.1")
    _shared(lib / "libsecret.so.1", "libsecret.so.1")
    _shared(lib / "libunrelated.so.1", "libunrelated.so.1")
    # libibverbs.so.1 is a link to its versioned file, as rdma-core installs it.
    _shared(lib / "libibverbs.so.1.14.0", "libibverbs.so.1", ("libnl-fake.so.200",), glibc_source, lib)
    os.symlink("libibverbs.so.1.14.0", lib / "libibverbs.so.1")
    _shared(lib / "librdmacm.so.1", "librdmacm.so.1", ("libibverbs.so.1",), lib=lib)
    # Every name --rdma asks for, so that the host's own (this cache also lists the
    # trusted /lib directories, after ours) does not come in.
    for soname in ("libmlx5.so.1", "libmlx4.so.1", "libefa.so.1", "libmana.so.1", "libhns.so.1",
                   "libibumad.so.3"):
        _shared(lib / soname, soname, ("libibverbs.so.1",), lib=lib)
    providers = lib / "libibverbs"
    providers.mkdir(mode=0o755)
    _shared(providers / "libfake-rdmav34.so", "libfake-rdmav34.so", ("libprovonly.so.1",), lib=lib)
    # Planted: a provider that is a symlink is neither read nor followed for its needs.
    secret = top / "secret"
    secret.mkdir(mode=0o755)
    _shared(secret / "libevil-rdmav34.so", "libevil-rdmav34.so", ("libsecret.so.1",), lib=lib)
    os.symlink(secret / "libevil-rdmav34.so", providers / "libevil-rdmav34.so")
    # As rdma-core installs mlx5's provider: a link to the vendor library beside libibverbs.
    _shared(lib / "libvendor.so.1.2.0", "libvendor.so.1", ("libprovonly.so.1",), lib=lib)
    os.symlink("../libvendor.so.1.2.0", providers / "libvendor-rdmav34.so")
    verbs_d = top / "libibverbs.d"
    verbs_d.mkdir(mode=0o755)
    (verbs_d / "fake.driver").write_text("driver fake\n")
    cache = top / "ld.so.cache"
    # -f /dev/null: not the host's /etc/ld.so.conf (its trusted /lib, /usr/lib still are)
    subprocess.run(["ldconfig", "-f", "/dev/null", "-C", str(cache), str(lib)], check=True)
    os.chmod(cache, 0o644)
    return {"MESOBOX_RDMA_DEV_DIR": str(top / "dev"), "MESOBOX_HOST_LD_CACHE": str(cache),
            "MESOBOX_RDMA_CONFIG_DIR": str(verbs_d)}


@pytest.fixture()
def rdma(world_tmp: Path) -> dict[str, str]:
    return _fake_tree(world_tmp / "ib")


def _image(world_tmp: Path, glibc: str = "2.36") -> Path:
    root = make_busybox_rootfs(world_tmp / "img")
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (libdir / "libc.so.6").write_bytes(b"\x7fELF\x00GNU C Library (fake) stable release version " +
                                       glibc.encode() + b".\x00")
    return root


SCRIPT = """
echo LD=$LD_LIBRARY_PATH
for n in /dev/infiniband/*; do stat -c "%n %F %t:%T" $n; done
echo x > /dev/infiniband/uverbs0 && echo wrote-uverbs0
head -c 3 /dev/infiniband/rdma_cm | wc -c
ls /.mesobox/rdma/lib | tr '\\n' ' '; echo
ls {providers} | tr '\\n' ' '; echo
cat /etc/libibverbs.d/fake.driver
echo x > /.mesobox/rdma/lib/librdmacm.so.1 || echo lib-read-only
wc -c < /.mesobox/rdma/lib/libibverbs.so.1
test -f {providers}/libvendor-rdmav34.so && echo vendor-resolves
test -e {providers}/libevil-rdmav34.so || echo evil-dangles
"""


def test_rdma_binds_devices_libraries_providers_and_config(mesobox: Mesobox, user: User, world_tmp: Path,
                                                           rdma: dict[str, str]) -> None:
    image = _image(world_tmp)
    providers = world_tmp / "ib/lib/libibverbs"
    # -c: no default binds, so the host's /tmp (where the planted link points) is not there either.
    proc = mesobox("exec", "-c", "--rdma", str(image), "sh", "-c", SCRIPT.format(providers=providers),
                   as_user=user, env=rdma)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "LD=/.mesobox/rdma/lib"
    # Character devices with the host node's rdev, opened for writing and reading; the
    # planted symlink (uverbs9) and the plain file are not there.
    assert lines[1:4] == ["/dev/infiniband/rdma_cm character special file 1:5",
                          "/dev/infiniband/umad0 character special file 1:3",
                          "/dev/infiniband/uverbs0 character special file 1:3"], lines
    assert lines[4:6] == ["wrote-uverbs0", "3"], lines
    # The verbs stack and what it and the real provider need; not the library only the
    # symlinked provider needs, not a library nobody asked for.
    assert lines[6].split() == ["libefa.so.1", "libhns.so.1", "libibumad.so.3", "libibverbs.so.1", "libmana.so.1",
                                "libmlx4.so.1", "libmlx5.so.1", "libnl-fake.so.200", "libprovonly.so.1",
                                "librdmacm.so.1"], lines
    # The provider directory at its host path (libibverbs' compiled-in path); the planted
    # link is there as the link it is, pointing at nothing inside.
    assert lines[7].split() == ["libevil-rdmav34.so", "libfake-rdmav34.so", "libvendor-rdmav34.so"], lines
    assert lines[8:10] == ["driver fake", "lib-read-only"], lines
    # The fake tree's libibverbs (the first cache entry, as the loader takes it), by its real file.
    assert lines[10] == str((world_tmp / "ib/lib/libibverbs.so.1.14.0").stat().st_size), lines
    # The vendor provider's link resolves inside (its target is bound at its host path);
    # the planted one does not.
    assert lines[11:] == ["vendor-resolves", "evil-dangles"], lines


def test_rdma_keeps_the_images_library_path_after_its_own(mesobox: Mesobox, user: User, world_tmp: Path,
                                                          rdma: dict[str, str]) -> None:
    image = _image(world_tmp)
    proc = mesobox("exec", "--rdma", "--env", "X=1", str(image), "sh", "-c", "echo $LD_LIBRARY_PATH",
                   as_user=user, env=dict(rdma, LD_LIBRARY_PATH="/host/only"))
    assert proc.returncode == 0, proc.stderr.decode()
    # The host's LD_LIBRARY_PATH is not kept (as --nv): its paths mostly do not exist inside.
    assert proc.stdout.decode().strip() == "/.mesobox/rdma/lib"


def test_rdma_without_a_device_is_one_error(mesobox: Mesobox, user: User, world_tmp: Path,
                                            rdma: dict[str, str]) -> None:
    empty = world_tmp / "nodev"
    empty.mkdir(mode=0o755)
    # Only a symlink to a real node, and umad alone: still no RDMA device.
    os.symlink("/dev/null", empty / "uverbs0")
    _node(empty / "umad0", 3)
    proc = mesobox("exec", "--rdma", str(_image(world_tmp)), "true", as_user=user,
                   env=dict(rdma, MESOBOX_RDMA_DEV_DIR=str(empty)))
    assert "--rdma: no RDMA device" in error_text(proc)


def test_rdma_device_dir_that_is_a_symlink_is_not_followed(mesobox: Mesobox, user: User, world_tmp: Path,
                                                            rdma: dict[str, str]) -> None:
    link = world_tmp / "ib-link"
    os.symlink(rdma["MESOBOX_RDMA_DEV_DIR"], link)
    proc = mesobox("exec", "--rdma", str(_image(world_tmp)), "true", as_user=user,
                   env=dict(rdma, MESOBOX_RDMA_DEV_DIR=str(link)))
    assert "--rdma: no RDMA device" in error_text(proc)


def test_rdma_without_libibverbs_is_one_error(mesobox: Mesobox, user: User, world_tmp: Path,
                                              rdma: dict[str, str]) -> None:
    top = world_tmp / "noverbs"
    (top / "lib").mkdir(mode=0o755, parents=True)
    _shared(top / "lib/librdmacm.so.1", "librdmacm.so.1")
    cache = top / "ld.so.cache"
    # -r: a root of our own, so that the host's trusted directories (and its real
    # libibverbs) are not cached; the paths then read /lib/…, which does not matter here.
    subprocess.run(["ldconfig", "-r", str(top), "-f", "/dev/null", "-C", "/ld.so.cache", "/lib"], check=True)
    os.chmod(cache, 0o644)
    proc = mesobox("exec", "--rdma", str(_image(world_tmp)), "true", as_user=user,
                   env=dict(rdma, MESOBOX_HOST_LD_CACHE=str(cache)))
    assert "no libibverbs.so.1 in the host's ldconfig cache" in error_text(proc)


def test_rdma_refuses_an_image_whose_glibc_is_too_old(mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    env = _fake_tree(world_tmp / "ib-new", NEW_GLIBC)
    proc = mesobox("exec", "--rdma", str(_image(world_tmp, "2.17")), "true", as_user=user, env=env)
    err = error_text(proc)
    assert "--rdma: the image's glibc 2.17 is older than the 2.25 the host's verbs libraries need" in err, err
    # The same libraries are fine in an image with a new enough glibc.
    (world_tmp / "img2").mkdir()
    ok = mesobox("exec", "--rdma", str(_image(world_tmp / "img2", "2.36")), "true", as_user=user, env=env)
    assert ok.returncode == 0, ok.stderr.decode()


def test_a_moved_rdma_tree_obeys_allowed_bind_sources(mesobox: Mesobox, user: User, world_tmp: Path,
                                                      rdma: dict[str, str]) -> None:
    proc = mesobox("exec", "-c", "--rdma", str(_image(world_tmp)), "true", as_user=user,
                   env=dict(rdma, MESOBOX_ALLOWED_BIND_SOURCES="/nonexistent-allowed"))
    assert "outside the allowed bind sources" in error_text(proc)


VERBS_PROBE = r"""
#include <stdio.h>
#include <string.h>
/* libibverbs' entry point, declared here: no libibverbs-dev on the host is needed. */
struct ibv_device;
struct ibv_device **ibv_get_device_list(int *num_devices);
int main(void)
{
    int n = -1;
    char line[512], lib[512] = "none";
    FILE *maps;
    ibv_get_device_list(&n);
    maps = fopen("/proc/self/maps", "r");
    while (maps && fgets(line, sizeof line, maps))
        if (strstr(line, "/libibverbs.so")) {
            sscanf(strchr(line, '/'), "%511s", lib);
            break;
        }
    printf("devices=%d lib=%s\n", n, lib);
    return 0;
}
"""


@pytest.mark.userns
def test_rdma_brings_the_hosts_real_verbs_stack_into_an_image_without_one(
        mesobox: Mesobox, user: User, world_tmp: Path, bare_debian: Path) -> None:
    """This host's rdma-core (no adapter): a program linked with libibverbs runs in a
    Debian image that has none, and every provider resolves its libraries inside."""
    from mesobox.launch.hostlibs import cache_index, ld_cache

    libibverbs = cache_index(ld_cache()).get("libibverbs.so.1")
    if libibverbs is None:
        pytest.skip("no libibverbs.so.1 on this host")
    assert not list(bare_debian.glob("usr/lib/*/libibverbs.so*")), "the image must not have its own"
    providers = Path(os.path.realpath(libibverbs)).parent / "libibverbs"
    (world_tmp / "probe.c").write_text(VERBS_PROBE)
    subprocess.run(["gcc", "-o", str(world_tmp / "probe"), str(world_tmp / "probe.c"), libibverbs], check=True)
    dev = world_tmp / "dev"
    _node(dev / "uverbs0", 3)
    script = (f"{world_tmp}/probe; n=$(ls {providers}/*.so | wc -l); "
              f"bad=$(ldd {providers}/*.so 2>&1 | grep -c -e 'not found' -e 'No such'); echo providers=$n bad=$bad")
    proc = mesobox("exec", "--rdma", str(bare_debian), "/bin/sh", "-c", script, as_user=user, cwd=world_tmp,
                   env={"MESOBOX_RDMA_DEV_DIR": str(dev)})
    assert proc.returncode == 0, proc.stderr.decode()
    count = len(list(providers.glob("*.so")))
    assert proc.stdout.decode().split() == ["devices=0", "lib=/.mesobox/rdma/lib/libibverbs.so.1",
                                            f"providers={count}", "bad=0"], proc.stdout.decode()
