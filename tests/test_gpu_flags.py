"""--nv and --rocm, without a CDI spec and through one, against a fake driver tree (this machine has no
GPU): root makes character devices named like the vendor's (copies of /dev/null, 1:3,
and /dev/zero, 1:5, mode 0666) in a directory of the test's own, shared objects with
the driver's sonames compiled by gcc, their own ldconfig cache (``ldconfig -C``) and a
fake nvidia-smi; the config keys gpu_dev_dir and gpu_ld_cache point mesobox at them.
An ordinary user then runs the container."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User
from mesobox.launch import gpu
from run_support import error_text

SOURCE = "int cuInit(int flags) { return flags; }\n"
NO_SPECS = "/nonexistent/cdi"  # a host's own /etc/cdi (nvidia-ctk's spec) would take --nv


def _node(path: Path, minor: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    os.chmod(path, 0o666)  # past root's umask


def _driver(top: Path, sonames: tuple[str, ...]) -> Path:
    """Shared objects named ``sonames`` in top/lib and their ldconfig cache: its path."""
    lib = top / "lib"
    lib.mkdir(mode=0o755)
    (top / "x.c").write_text(SOURCE)
    for soname in sonames:
        subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(lib / soname),
                        str(top / "x.c")], check=True)
        os.chmod(lib / soname, 0o755)
    cache = top / "ld.so.cache"
    # -f /dev/null: not the host's /etc/ld.so.conf (its trusted /lib, /usr/lib still are)
    subprocess.run(["ldconfig", "-f", "/dev/null", "-C", str(cache), str(lib)], check=True)
    os.chmod(cache, 0o644)
    return cache


@pytest.fixture()
def nvidia(world_tmp: Path) -> dict[str, str]:
    top = world_tmp / "nv"
    top.mkdir(mode=0o755)
    for name, minor in (("nvidia0", 3), ("nvidia1", 5), ("nvidiactl", 3), ("nvidia-uvm", 5)):
        _node(top / "dev" / name, minor)
    cache = _driver(top, ("libcuda.so.1", "libnvidia-ml.so.1", "libunrelated.so.1"))
    bin_dir = top / "bin"
    bin_dir.mkdir(mode=0o755)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho fake-smi\n")
    os.chmod(bin_dir / "nvidia-smi", 0o755)
    return {"MESOBOX_GPU_DEV_DIR": str(top / "dev"), "MESOBOX_GPU_LD_CACHE": str(cache),
            "PATH": f"{bin_dir}:/usr/bin:/bin", "MESOBOX_CDI_SPEC_DIRS": NO_SPECS}


@pytest.fixture()
def rocm(world_tmp: Path) -> dict[str, str]:
    top = world_tmp / "rocm"
    top.mkdir(mode=0o755)
    for name, minor in (("kfd", 3), ("dri/card0", 5), ("dri/renderD128", 5)):
        _node(top / "dev" / name, minor)
    cache = _driver(top, ("libamdhip64.so.6", "libhsa-runtime64.so.1"))
    return {"MESOBOX_GPU_DEV_DIR": str(top / "dev"), "MESOBOX_GPU_LD_CACHE": str(cache),
            "MESOBOX_CDI_SPEC_DIRS": NO_SPECS}


NV_SCRIPT = ("ls /.mesobox/nvidia/lib; echo LD=$LD_LIBRARY_PATH; ls /dev | grep nvidia; nvidia-smi; "
             "test -c /dev/nvidia0 && echo x > /dev/nvidia0 && echo written")


def test_nv_binds_devices_libraries_and_tools(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                              nvidia: dict[str, str]) -> None:
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "sh", "-c", NV_SCRIPT, as_user=user, env=nvidia)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().split()
    assert out[:2] == ["libcuda.so.1", "libnvidia-ml.so.1"]  # not libunrelated: not on the list
    assert out[2] == "LD=/.mesobox/nvidia/lib"
    assert out[3:] == ["nvidia-uvm", "nvidia0", "nvidia1", "nvidiactl", "fake-smi", "written"]


def test_nv_libraries_are_read_only_and_the_site_list_replaces_ours(mesobox: Mesobox, user: User,
                                                                   busybox_rootfs: Path,
                                                                   nvidia: dict[str, str]) -> None:
    env = dict(nvidia, MESOBOX_NV_LIBRARIES="libcuda.so,libunrelated.so")
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "sh", "-c",
                   "ls /.mesobox/nvidia/lib; echo x > /.mesobox/nvidia/lib/libcuda.so.1 || echo refused",
                   as_user=user, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"libcuda.so.1", b"libunrelated.so.1", b"refused"]


@pytest.mark.parametrize(("job", "seen"), [
    ({"CUDA_VISIBLE_DEVICES": "1"}, [b"nvidia1"]),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, [b"nvidia0", b"nvidia1"]),
    ({"SLURM_STEP_GPUS": "0", "CUDA_VISIBLE_DEVICES": "1"}, [b"nvidia0"]),  # Slurm's are host indexes
    ({"CUDA_VISIBLE_DEVICES": "GPU-8a6c0f6e"}, [b"nvidia0", b"nvidia1"]),  # a UUID: all
])
def test_nv_binds_only_the_jobs_gpus(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                     nvidia: dict[str, str], job: dict[str, str], seen: list[bytes]) -> None:
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "sh", "-c", "ls /dev | grep 'nvidia[0-9]'",
                   as_user=user, env={**nvidia, **job})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == seen


def test_nv_without_a_gpu_is_one_error(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                       nvidia: dict[str, str], world_tmp: Path) -> None:
    empty = world_tmp / "nodev"
    empty.mkdir(mode=0o755)
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "true", as_user=user,
                   env=dict(nvidia, MESOBOX_GPU_DEV_DIR=str(empty)))
    assert "no nvidia GPU device" in error_text(proc)


def test_nv_without_libcuda_is_one_error(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                         nvidia: dict[str, str], world_tmp: Path) -> None:
    top = world_tmp / "nolibcuda"
    top.mkdir(mode=0o755)
    cache = _driver(top, ("libnvidia-ml.so.1",))
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "true", as_user=user,
                   env=dict(nvidia, MESOBOX_GPU_LD_CACHE=str(cache)))
    assert "no libcuda.so in the host's ldconfig cache" in error_text(proc)


def test_rocm_binds_kfd_dri_and_libraries(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                          rocm: dict[str, str]) -> None:
    script = "echo LD=$LD_LIBRARY_PATH; ls /dev/dri; test -c /dev/kfd && echo kfd; ls /.mesobox/rocm/lib"
    proc = mesobox("exec", "--rocm", str(busybox_rootfs), "sh", "-c", script, as_user=user, env=rocm)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.split()
    assert out[:4] == [b"LD=/.mesobox/rocm/lib", b"card0", b"renderD128", b"kfd"]
    # ldconfig -C caches the host's trusted directories too: libdrm may come from there
    assert {b"libamdhip64.so.6", b"libhsa-runtime64.so.1"} <= set(out[4:]), out


def test_rocm_without_a_gpu_is_one_error(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                         rocm: dict[str, str], nvidia: dict[str, str]) -> None:
    proc = mesobox("exec", "--rocm", str(busybox_rootfs), "true", as_user=user,
                   env=dict(rocm, MESOBOX_GPU_DEV_DIR=nvidia["MESOBOX_GPU_DEV_DIR"]))
    assert "no rocm GPU device" in error_text(proc)


def test_a_moved_driver_tree_obeys_allowed_bind_sources(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                        nvidia: dict[str, str]) -> None:
    """A user who points gpu_dev_dir at a tree of their own gets no bind the site's
    allowed sources refuse."""
    proc = mesobox("exec", "-c", "--nv", str(busybox_rootfs), "true", as_user=user,
                   env=dict(nvidia, MESOBOX_ALLOWED_BIND_SOURCES="/nonexistent-allowed"))
    assert "outside the allowed bind sources" in error_text(proc)


def test_ld_cache_lines_pick_the_wide_entry() -> None:
    text = ("3 libs found in cache `/etc/ld.so.cache'\n"
            "\tlibcuda.so.1 (libc6) => /usr/lib32/libcuda.so.1\n"
            "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
            "\tlibcudart.so.12 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcudart.so.12\n")
    found = gpu.libraries(gpu.parse_ld_cache(text), ("libcuda.so",))
    assert found == [("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1")]


# --- --nv and --rocm through the site's CDI spec --------------------------------------------


def _site_spec(world_tmp: Path, nvidia: dict[str, str], kind: str = "nvidia.com/gpu") -> Path:
    """A spec as ``nvidia-ctk cdi generate`` shapes one, of the fake driver's nodes: the
    control node in the spec's own edits, one device per GPU named by its index and one
    by a UUID, and "all"."""
    dev = nvidia["MESOBOX_GPU_DEV_DIR"]
    gpu = [{"deviceNodes": [{"path": f"/dev/nvidia{i}", "hostPath": f"{dev}/nvidia{i}"}]} for i in (0, 1)]
    spec = {"cdiVersion": "0.5.0", "kind": kind,
            "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                               "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": f"{dev}/nvidiactl"}]},
            "devices": [{"name": "0", "containerEdits": gpu[0]}, {"name": "1", "containerEdits": gpu[1]},
                        {"name": "GPU-8a6c0f6e", "containerEdits": gpu[1]},
                        {"name": "all", "containerEdits": {"deviceNodes": gpu[0]["deviceNodes"]
                                                           + gpu[1]["deviceNodes"]}}]}
    specs = world_tmp / "cdi"
    specs.mkdir(mode=0o755, exist_ok=True)
    (specs / "nvidia.json").write_text(json.dumps(spec))
    os.chmod(specs / "nvidia.json", 0o644)
    return specs


@pytest.mark.parametrize(("job", "seen"), [
    ({}, [b"nvidia0", b"nvidia1"]),  # no list: the spec's "all"
    ({"CUDA_VISIBLE_DEVICES": "1"}, [b"nvidia1"]),
    ({"SLURM_STEP_GPUS": "0", "CUDA_VISIBLE_DEVICES": "1"}, [b"nvidia0"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8a6c0f6e"}, [b"nvidia1"]),  # a UUID the spec names
])
def test_nv_uses_the_sites_cdi_spec(mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path,
                                    nvidia: dict[str, str], job: dict[str, str], seen: list[bytes]) -> None:
    """With a spec of kind nvidia.com/gpu, --nv is its devices for the job's GPUs: the
    spec's env and nodes, and none of the ldconfig path's binds (its cache is not even
    read: it names a file that is not there)."""
    specs = _site_spec(world_tmp, nvidia)
    env = {**nvidia, **job, "MESOBOX_CDI_SPEC_DIRS": str(specs), "MESOBOX_GPU_LD_CACHE": "/nonexistent/ld.so.cache"}
    proc = mesobox("exec", "--debug", "--nv", str(busybox_rootfs), "sh", "-c",
                   "ls /dev | grep 'nvidia[0-9]'; echo $NVIDIA_VISIBLE_DEVICES; test -c /dev/nvidiactl && echo ctl; "
                   "test -e /.mesobox/nvidia || echo no-ldconfig-binds", as_user=user, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [*seen, b"void", b"ctl", b"no-ldconfig-binds"]
    assert "--nv: through the site's CDI spec" in proc.stderr.decode()


def test_nv_asks_the_spec_for_a_gpu_it_lacks(mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path,
                                             nvidia: dict[str, str]) -> None:
    specs = _site_spec(world_tmp, nvidia)
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "true", as_user=user,
                   env={**nvidia, "CUDA_VISIBLE_DEVICES": "3", "MESOBOX_CDI_SPEC_DIRS": str(specs)})
    assert "the site's CDI spec has no device nvidia.com/gpu=3" in error_text(proc)


def test_nv_without_a_site_spec_binds_the_driver(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                 world_tmp: Path, nvidia: dict[str, str]) -> None:
    """A spec of another vendor's kind does not take --nv: the ldconfig path does."""
    specs = _site_spec(world_tmp, nvidia, kind="other.example/gpu")
    proc = mesobox("exec", "--debug", "--nv", str(busybox_rootfs), "sh", "-c", "ls /.mesobox/nvidia/lib",
                   as_user=user, env={**nvidia, "MESOBOX_CDI_SPEC_DIRS": str(specs)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"libcuda.so.1", b"libnvidia-ml.so.1"]
    assert "--nv: no CDI spec of kind nvidia.com/gpu: binding the driver" in proc.stderr.decode()


def test_rocm_uses_an_amd_spec(mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path,
                               nvidia: dict[str, str]) -> None:
    specs = _site_spec(world_tmp, nvidia, kind="amd.com/gpu")
    proc = mesobox("exec", "--rocm", str(busybox_rootfs), "sh", "-c", "ls /dev | grep 'nvidia[0-9]'",
                   as_user=user, env={**nvidia, "MESOBOX_CDI_SPEC_DIRS": str(specs)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"nvidia0", b"nvidia1"]


def test_nv_refuses_a_spec_others_could_write(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                              world_tmp: Path, nvidia: dict[str, str]) -> None:
    """A spec of kind nvidia.com/gpu that another user could have planted (its directory
    writable by all, not sticky) is neither used nor silently passed over for the
    ldconfig path: --nv fails in one line naming it."""
    specs = _site_spec(world_tmp, nvidia)
    os.chmod(specs, 0o777)
    proc = mesobox("exec", "--nv", str(busybox_rootfs), "true", as_user=user,
                   env={**nvidia, "MESOBOX_CDI_SPEC_DIRS": str(specs)})
    assert f"CDI spec {specs}/nvidia.json: is not trusted" in error_text(proc)
