"""GPU room: ``--nv`` and ``--rocm`` as Apptainer means them.

A site that ships a CDI spec of kind ``nvidia.com/gpu`` (``amd.com/gpu`` for --rocm)
in the ``cdi_spec_dirs`` directories (``nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml``
writes one) gets that path: ``site_cdi`` turns the flag into the CDI devices of the
job's GPUs (cdi.py applies them, hooks included), the same selection as below, by the
names nvidia-ctk gives (the host index, "0", "1"…, or the GPU's UUID), or ``all`` when
no list is set.  Without such a spec, the rest of this module binds the driver itself.

A vendor's GPUs reach the container as three things, all decided at compile time:

- its device nodes, bound as ``--device`` binds them (nosuid, not nodev: a node on a
  nodev mount cannot be opened); NVIDIA's per-GPU nodes only for the job's GPUs
  (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS`` or ``CUDA_VISIBLE_DEVICES``: host indexes);
- its driver libraries, found in the host's ldconfig cache from a list the site can
  replace (``nv_libraries``, ``rocm_libraries``: Apptainer's nvliblist.conf), bound
  read-only under one directory (``/.mesobox/nvidia/lib``) that goes first on the
  container's ``LD_LIBRARY_PATH``;
- its tools (nvidia-smi…) from the host's ``PATH``, bound read-only beside them and
  added to the container's ``PATH``.

The directory is a private tmpfs (a mount point the image lacks is made by the mount
plan's skeletons, mountplan.py).  A host with no such GPU is an error, never a silent
no-op.  Reading the ldconfig cache runs ``ldconfig -p``: a program run while compiling,
so such a launch saves no program (probe.py).  Stdlib only; imported only when asked.
"""

from __future__ import annotations

import os

from mesobox.errors import UsageError
from mesobox.launch import probe
from mesobox.launch.binds import device_bind, require_allowed
from mesobox.oci import spec as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config

NV_LIBRARIES = ("libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
                "libnvidia-fatbinaryloader.so", "libnvidia-opencl.so", "libnvidia-compiler.so",
                "libnvidia-nvvm.so", "libnvidia-gpucomp.so", "libnvidia-cfg.so", "libnvidia-allocator.so",
                "libnvidia-opticalflow.so", "libnvcuvid.so", "libnvidia-encode.so", "libnvoptix.so",
                "libnvidia-rtcore.so", "libnvidia-pkcs11.so")
NV_PROGRAMS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced")
NV_CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
ROCM_LIBRARIES = ("libamdhip64.so", "libhsa-runtime64.so", "libhsakmt.so", "librocm_smi64.so",
                  "libamd_comgr.so", "libdrm_amdgpu.so", "libdrm.so", "librocprofiler-register.so")
ROCM_PROGRAMS = ("rocm-smi", "rocminfo")
GPU_LISTS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")  # the first set wins
LIB_OPTIONS = ("bind", "nosuid", "nodev", "ro")
DIR_OPTIONS = ("nosuid", "nodev", "noexec", "mode=755", "size=64k")


def vendor_dir(vendor: str) -> str:
    return f"/.mesobox/{vendor}"


def gpu_setup(nv: bool, rocm: bool, config: Config,
              image_env: tuple[str, ...]) -> tuple[tuple[S.Mount, ...], tuple[str, ...]]:
    """(mounts, image-Env-like entries) for ``--nv`` and ``--rocm``; UsageError where
    the host has no such GPU."""
    mounts: list[S.Mount] = []
    libs: list[str] = []
    bins: list[str] = []
    cache = _ld_cache(config) if nv or rocm else []
    if nv:
        mounts += _vendor_mounts("nvidia", "--nv", nvidia_nodes(config), config.nv_libraries or NV_LIBRARIES,
                                 "libcuda.so", NV_PROGRAMS, cache, config, libs, bins)
    if rocm:
        mounts += _vendor_mounts("rocm", "--rocm", rocm_nodes(config), config.rocm_libraries or ROCM_LIBRARIES,
                                 "libamdhip64.so", ROCM_PROGRAMS, cache, config, libs, bins)
    return tuple(mounts), _environment(image_env, libs, bins)


def _vendor_mounts(vendor: str, flag: str, nodes: list[tuple[str, str]], wanted: tuple[str, ...], needed: str,
                   programs: tuple[str, ...], cache: list[tuple[str, str, str]], config: Config,
                   libs: list[str], bins: list[str]) -> list[S.Mount]:
    if not nodes:
        raise UsageError(f"{flag}: no {vendor} GPU device on this host",
                         hint=f"{flag} needs the vendor's device nodes in {_dev_dir(config)}")
    found = libraries(cache, wanted)
    if not any(_matches(name, needed) for name, _path in found):
        raise UsageError(f"{flag}: no {needed} in the host's ldconfig cache",
                         hint="is the GPU driver installed on this host?")
    allowed = _override_allowed(config)
    mounts = [_node_mount(src, dst, allowed) for src, dst in nodes]
    top = vendor_dir(vendor)
    mounts.append(S.Mount(destination=top, type="tmpfs", source="tmpfs", options=DIR_OPTIONS))
    mounts += [_file_mount(path, f"{top}/lib/{name}", allowed) for name, path in found]
    libs.append(f"{top}/lib")
    tools = [(name, path) for name in programs if (path := _on_path(name))]
    mounts += [_file_mount(path, f"{top}/bin/{name}", allowed) for name, path in tools]
    if tools:
        bins.append(f"{top}/bin")
    return mounts


# --- device nodes ----------------------------------------------------------------------


def _dev_dir(config: Config) -> str:
    return config.gpu_dev_dir or "/dev"


def nvidia_nodes(config: Config) -> list[tuple[str, str]]:
    """(host path, container path) of the NVIDIA nodes to bind; none without nvidiactl."""
    dev = _dev_dir(config)
    if probe.node_type(f"{dev}/nvidiactl") != "c":
        return []
    chosen = job_gpus()
    names = [n for n in probe.listdir(dev) if n.startswith("nvidia") and n[6:].isdigit()
             and (chosen is None or int(n[6:]) in chosen)]
    names.sort(key=lambda n: int(n[6:]))
    names += NV_CONTROL
    names += [f"nvidia-caps/{n}" for n in sorted(probe.listdir(f"{dev}/nvidia-caps"))]
    return _char_nodes(dev, names)


def rocm_nodes(config: Config) -> list[tuple[str, str]]:
    """/dev/kfd and the DRM nodes (card*, renderD*); none without kfd."""
    dev = _dev_dir(config)
    if probe.node_type(f"{dev}/kfd") != "c":
        return []
    dri = sorted(n for n in probe.listdir(f"{dev}/dri") if n.startswith(("card", "renderD")))
    return _char_nodes(dev, ["kfd"] + [f"dri/{n}" for n in dri])


def job_gpus() -> set[int] | None:
    """The host GPU indexes this job may use, or None: all (no list set, or one naming
    GPUs by UUID, which no node name carries)."""
    items = job_gpu_items()
    if items is None or not all(i.isdigit() for i in items):
        return None
    return {int(i) for i in items}


def job_gpu_items(lists: tuple[str, ...] = GPU_LISTS) -> list[str] | None:
    """The entries of the first of ``lists`` set (indexes or UUIDs), or None: none is set."""
    for key in lists:
        text = probe.environ(key)
        if text is not None:
            return [i.strip() for i in text.split(",") if i.strip()]
    return None


# --- through the site's CDI spec ------------------------------------------------------------

# (flag, its option, the CDI kind, the lists that select the job's GPUs): for AMD, only
# Slurm's (host indexes, as the ldconfig path binds every DRI node without one)
CDI_KINDS = (("nv", "--nv", "nvidia.com/gpu", GPU_LISTS),
             ("rocm", "--rocm", "amd.com/gpu", ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")))


def site_cdi(nv: bool, rocm: bool, config: Config) -> tuple[tuple[str, ...], bool, bool]:
    """(CDI device names for the flags a site spec covers, --nv left, --rocm left): a flag
    whose vendor has a spec under ``cdi_spec_dirs`` becomes that spec's devices; the
    other stays for ``gpu_setup``.  --debug says which path each flag took."""
    from mesobox.launch import cdi

    names: list[str] = []
    left = {"nv": nv, "rocm": rocm}
    for key, flag, kind, lists in CDI_KINDS:
        if not left[key]:
            continue
        known = cdi.kind_devices(kind, config)
        if known is None:
            _debug(config, f"{flag}: no CDI spec of kind {kind}: binding the driver from the ldconfig cache")
            continue
        left[key] = False
        chosen = _cdi_selection(flag, kind, known, lists)
        _debug(config, f"{flag}: through the site's CDI spec: --device " + " --device ".join(
            f"{kind}={name}" for name in chosen))
        names += [f"{kind}={name}" for name in chosen]
    return tuple(names), left["nv"], left["rocm"]


def _cdi_selection(flag: str, kind: str, known: tuple[str, ...], lists: tuple[str, ...]) -> list[str]:
    """The job's GPUs by the spec's names: indexes as nvidia-ctk names them ("0"), UUIDs
    where the spec names devices by them; ``all`` without a list, or for UUIDs the spec
    does not name (as the ldconfig path binds every GPU then).  A spec of that kind that
    is broken names none: ``all`` then makes cdi.py say what is wrong with it."""
    items = job_gpu_items(lists)
    if items is None or not known:
        return ["all"]
    if not items:
        raise UsageError(f"{flag}: the job's GPU list is empty",
                         hint="it names no GPU: unset it, or name some (" + ", ".join(lists) + ")")
    if all(i.isdigit() for i in items) or all(i in known for i in items):
        missing = [i for i in items if i not in known]
        if missing:
            raise UsageError(f"{flag}: the site's CDI spec has no device {kind}={missing[0]}",
                             hint="known devices: " + ", ".join(known))
        return items
    return ["all"]


def _debug(config: Config, line: str) -> None:
    if config.debug:
        import sys

        sys.stderr.write(f"mesobox: {line}\n")


def _char_nodes(dev: str, names: list[str]) -> list[tuple[str, str]]:
    return [(f"{dev}/{n}", f"/dev/{n}") for n in names if probe.node_type(f"{dev}/{n}") == "c"]


def _node_mount(src: str, dst: str, allowed: tuple[str, ...]) -> S.Mount:
    real = probe.realpath(src)
    require_allowed(real, allowed, f"GPU file {real}")
    return device_bind(real, dst)


# --- libraries and tools ---------------------------------------------------------------


def _ld_cache(config: Config) -> list[tuple[str, str, str]]:
    """(soname, tags, path) of each ``ldconfig -p`` line; ``gpu_ld_cache`` names another
    cache file (``ldconfig -C FILE -p``: the tests' fake driver)."""
    import subprocess

    argv = ["ldconfig", "-p"] if not config.gpu_ld_cache else ["ldconfig", "-C", config.gpu_ld_cache, "-p"]
    for program in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        if program == "ldconfig" or probe.isfile(program):
            argv[0] = program
            break
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot read the ldconfig cache: {err}", hint="--nv and --rocm need ldconfig") from None
    if done.returncode != 0:
        raise UsageError(f"cannot read the ldconfig cache: {done.stderr.strip() or done.returncode}")
    return parse_ld_cache(done.stdout)


def parse_ld_cache(text: str) -> list[tuple[str, str, str]]:
    """``\\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1`` lines."""
    out = []
    for line in text.splitlines():
        left, sep, path = line.strip().partition(" => ")
        name, _, tags = left.partition(" (")
        if sep and name and path.startswith("/"):
            out.append((name, tags.rstrip(")"), path))
    return out


def libraries(cache: list[tuple[str, str, str]], wanted: tuple[str, ...]) -> list[tuple[str, str]]:
    """(soname, host path) of each cached library a ``wanted`` name matches, one per
    soname: a 64-bit entry before a 32-bit one on a 64-bit host (the container's loader
    would skip the wrong class, but one directory holds one file per name)."""
    import sys

    wide = sys.maxsize > 2**32
    chosen: dict[str, str] = {}
    for name, _tags, path in sorted(cache, key=lambda e: ("64" in e[1]) != wide):
        if name not in chosen and "/" not in name and any(_matches(name, w) for w in wanted):
            chosen[name] = path
    return sorted(chosen.items())


def _matches(name: str, wanted: str) -> bool:
    """``libcuda.so`` matches libcuda.so and libcuda.so.1, not libcudart.so."""
    return name == wanted or name.startswith(wanted + ".")


def _on_path(name: str) -> str | None:
    for folder in (probe.environ("PATH") or "").split(":"):
        path = os.path.join(folder, name)
        if folder.startswith("/") and probe.isfile(path) and probe.access(path, os.X_OK):
            return path
    return None


def _file_mount(path: str, dst: str, allowed: tuple[str, ...]) -> S.Mount:
    real = probe.realpath(path)  # libcuda.so.1 is a link to libcuda.so.550.54: bind the file
    require_allowed(real, allowed, f"GPU file {real}")
    return S.Mount(destination=dst, type="bind", source=real, options=LIB_OPTIONS)


def _override_allowed(config: Config) -> tuple[str, ...]:
    """The site's allowed bind sources rule the GPU binds only where the device or
    cache location was moved (a user's own tree); the host's real driver is the site's."""
    if config.gpu_dev_dir or config.gpu_ld_cache:
        return tuple(config.allowed_bind_sources)
    return ()


def _environment(image_env: tuple[str, ...], libs: list[str], bins: list[str]) -> tuple[str, ...]:
    """The library directories first on the image's LD_LIBRARY_PATH (unset there: the
    host's is not kept, its paths mostly do not exist inside); the tool directories last
    on its PATH.  Entries after the image's Env: -e and --env-file still win."""
    from mesobox.launch.environ import DEFAULT_PATH

    if not libs:
        return ()
    image = dict(item.partition("=")[::2] for item in image_env)
    ld = ":".join(libs + [p for p in image.get("LD_LIBRARY_PATH", "").split(":") if p])
    out = [f"LD_LIBRARY_PATH={ld}"]
    if bins:
        out.append("PATH=" + ":".join([image.get("PATH") or DEFAULT_PATH, *bins]))
    return tuple(out)
