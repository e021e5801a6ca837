"""The launch program: every decision of a launch, taken before the first namespace.

``compile_program`` turns a validated Spec into a ``Program``: plain data (str, int,
bytes, tuples) that execute.py runs without deciding anything, and that the plan
cache (plancache.py) can save with ``marshal`` and replay for the next identical
command line.  Compiling reads the host only through probe.py (bind sources, the
image's /etc files), so a recording plan cache sees every question asked; it changes
nothing anywhere but the per-user seccomp cache.

``Program`` is a TypedDict for the type checker only: at run time it is a plain dict
(importing ``typing`` would cost ≈3 ms of every launch).
"""

from __future__ import annotations

import os
import sys

from mesobox.launch import probe
from mesobox.launch import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypedDict

    from mesobox.config import Config
    from mesobox.launch.mountops import MountStep
    from mesobox.oci.spec import IdMap, Spec

    HookStep = tuple[str, tuple[str, ...], tuple[str, ...], int]  # (path, argv, env, timeout s or 0)
    # (bundle directory, config.json text around its process.env list, createContainer
    # hooks, startContainer hooks, the state JSON of each: "\0" where the pid goes)
    HookPlan = tuple[str, tuple[str, str], tuple[HookStep, ...], tuple[HookStep, ...], tuple[str, str]]

    class Program(TypedDict):
        squashfs: str | None  # the image file whose shared mount image_dir is (plancache attaches to it)
        private_squashfs: tuple[str, bool] | None  # (image file, check modes): mounted on image_dir in the
        # container's user namespace (--fakeroot: fusemount.py)
        image_dir: str  # the image's root directory: the lower layer of every root step
        image_lock: str | None  # the store's in-use lock of a stored image, held shared (execute.hold_image)
        flags: int  # unshare(2) flags; without CLONE_NEWUSER when the user namespace is entered last
        uid_map: str  # text for /proc/PID/uid_map
        gid_map: str  # text for /proc/PID/gid_map
        pid: bool  # a new pid namespace: a minimal init forks the workload
        workspace: str  # the private tmpfs directory (root/, etc/, rw/ below it)
        scratch: int | None  # --writable-tmpfs size in bytes (0: the tmpfs default), or None
        persistent: str | None  # --overlay directory (upper/ and work/ are made in it)
        overlay_image: str | None  # ext4 image loop-mounted on workspace/ovl (real root only)
        files: tuple[tuple[str, str], ...]  # (name, text) written to workspace/etc: passwd, group
        steps: tuple[MountStep, ...]  # mount steps (mountops.py), applied in order below workspace/root
        loopback: bool  # bring up lo (a new network namespace)
        hostname: str | None  # set after pivot_root
        cwd: str  # chdir'd to after pivot_root
        enter_userns: tuple[tuple[IdMap, ...], tuple[IdMap, ...]] | None  # (uid, gid maps): real root, last
        share_userns: str | None  # the record directory of the node's shared user namespace (sharedns.py)
        cma_env: tuple[str, ...]  # "K=V" keeping MPI off CMA, for when the namespace could not be shared
        provenance: str | None  # the image, REFERENCE@DIGEST or a path, escaped for the launch record
        keep_caps: tuple[int, ...] | None  # capabilities left in the bounding set; None: leave them
        cap_sets: tuple[int, int, int, int] | None  # (effective, permitted, inheritable, ambient) masks
        # set after the user switch (OCI process.capabilities); None: what execve makes of them
        switch_always: bool  # real root: always set uid, gid and exactly the container's groups
        join: tuple[tuple[int, str], ...]  # (CLONE_NEW* type, path) of namespaces to setns(2) first
        pid_init: bool  # with a pid namespace: mesobox's minimal init is pid 1 (else the workload is)
        console: bool  # bind the terminal (stdin, a pty) on /dev/console
        sysctl: tuple[tuple[str, str], ...]  # (key, value) written below /proc/sys after pivot_root
        readonly_paths: tuple[str, ...]  # made read-only after pivot_root (linux.readonlyPaths)
        masked_paths: tuple[str, ...]  # covered after pivot_root (linux.maskedPaths)
        root_propagation: int  # mount(2) propagation flags of / after pivot_root; 0: leave it
        oom_score_adj: int | None  # written to /proc/self/oom_score_adj before the set-up
        umask: int | None
        exec_label: tuple[str, str] | None  # (/proc/self/attr file, text) an LSM switches to at execve
        user: tuple[int, int, tuple[int, ...]]  # (uid, gid, additional gids) inside
        no_new_privs: bool  # prctl(PR_SET_NO_NEW_PRIVS) before execve
        rlimits: tuple[tuple[str, int, int, int], ...]  # --ulimit: (name, RLIMIT_* number, soft, hard; -1: none)
        seccomp: bytes | None  # the compiled BPF filter
        hooks: HookPlan | None  # OCI createContainer/startContainer hooks (execute.run_hooks)
        start_fifo: tuple[int, int] | None  # mesobox-oci create: (FIFO fd read for "start", fd told
        # "created"), inherited fds; the workload waits on the FIFO right before execve
        container_id: str | None  # the OCI state's "id" for hooks (mesobox-oci); None: mesobox-PID
        args: tuple[str, ...]  # argv of the workload
        env: tuple[str, ...]  # its environment, "K=V"

_NS_FLAGS = {"user": sc.CLONE_NEWUSER, "mount": sc.CLONE_NEWNS, "pid": sc.CLONE_NEWPID,
             "ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS, "network": sc.CLONE_NEWNET,
             "cgroup": sc.CLONE_NEWCGROUP}


def compile_program(spec: Spec, config: Config, image_dir: str) -> Program:
    """Every decision of the launch, as plain data for execute.py: the mount plan,
    passwd/group, capabilities, the compiled seccomp filter.  Reads the host (bind
    sources, the image's /etc files) through probe.py, so a recording plan cache sees
    every question asked; makes no change anywhere but the per-user seccomp cache."""
    from mesobox.launch import identity
    from mesobox.launch import mountplan as plan

    real_root = identity.enters_userns_last()
    userns_last = real_root and "user" in spec.linux.namespaces
    joined = dict(spec.linux.namespace_paths)
    flags = 0
    for ns in spec.linux.namespaces:
        if ns not in joined:
            flags |= _NS_FLAGS.get(ns, 0)
    if real_root:
        flags &= ~sc.CLONE_NEWUSER  # entered last, in execute: set-up runs as real root
    workspace = os.path.join(config.runtime_dir_str, "ws")
    settings = spec.mesobox
    overlay_image = settings.overlay_image
    if overlay_image:  # disk-quota overlay: loop-mounted on ws/ovl by execute.setup_root
        spec = spec.replace(mesobox=settings.replace(overlay=os.path.join(workspace, "ovl")))
    ops = plan.mount_ops(spec, workspace, privileged=real_root and (not userns_last or settings.as_written))
    if settings.dns:  # --dns: the generated resolv.conf (_identity_files writes it) over the image's
        from mesobox.launch import mountops

        ops.append(mountops.bind(os.path.join(workspace, "etc", "resolv.conf"), "etc/resolv.conf", readonly=True,
                                 file=True, recursive=False))
    own_squashfs = settings.root_format == "squashfs" and not real_root
    squash = _squash_owners(spec) if own_squashfs else ""
    # Where every directory of a writable root may take new entries: the caller's own
    # flattened directory, a squashed or mapped squashfs, real root's set-up.
    points_in_overlay = bool(settings.overlay or overlay_image or not spec.root.readonly) and bool(
        squash or real_root or (own_squashfs and settings.subids)
        or (settings.root_format == "dir" and probe.access(image_dir, os.W_OK)))
    before, after = plan.root_ops(spec, image_dir, workspace, plan.skeletons(ops, image_dir), squash,
                                  points_in_overlay)
    ops = [*before, *ops, *after]
    if config.debug:
        for op in ops:
            sys.stderr.write(f"mesobox: mount: {op.describe()}\n")
    proc = spec.process
    keep_caps: tuple[int, ...] | None = None
    cap_sets: tuple[int, int, int, int] | None = None
    if proc.capabilities is not None:
        from mesobox.isolation.caps import masks

        bounding, *sets = masks(proc.capabilities)  # execute leaves out what this kernel lacks
        keep_caps = tuple(cap for cap in range(64) if bounding >> cap & 1)
        cap_sets = (sets[0], sets[1], sets[2], sets[3])
    return {
        "squashfs": spec.root.path if settings.root_format == "squashfs" else None,
        "private_squashfs": ((spec.root.path, settings.subids)
                             if own_squashfs and _inside_ids(spec)[0] == 0 else None),
        "image_lock": settings.image_lock,
        "image_dir": image_dir,
        "flags": flags,
        "uid_map": identity.map_text(spec.linux.uid_mappings),
        "gid_map": identity.map_text(spec.linux.gid_mappings),
        "pid": "pid" in spec.linux.namespaces,
        "workspace": workspace,
        "scratch": settings.writable_tmpfs,
        "persistent": None if overlay_image else settings.overlay,
        "overlay_image": overlay_image,
        "files": _identity_files(spec, image_dir),
        "steps": tuple(op.step() for op in ops),
        "loopback": "network" in spec.linux.namespaces and "network" not in joined,
        "hostname": spec.hostname,
        "cwd": proc.cwd,
        "enter_userns": (spec.linux.uid_mappings, spec.linux.gid_mappings) if userns_last else None,
        "share_userns": _shared_userns_dir(spec, config, flags),
        "cma_env": _cma_env(spec, config, flags),
        "provenance": _escaped(settings.image),
        "keep_caps": keep_caps,
        "cap_sets": cap_sets,
        "switch_always": real_root,
        "join": tuple((_NS_FLAGS[ns], path) for ns, path in spec.linux.namespace_paths),
        "pid_init": settings.start_fifo is None,
        "console": proc.terminal and settings.start_fifo is not None and any(
            m.destination.rstrip("/") == "/dev" for m in spec.mounts),
        "sysctl": spec.linux.sysctl,
        "readonly_paths": spec.linux.readonly_paths,
        "masked_paths": spec.linux.masked_paths,
        "root_propagation": plan.propagation(spec.linux.rootfs_propagation) if spec.linux.rootfs_propagation else 0,
        "oom_score_adj": proc.oom_score_adj,
        "umask": proc.umask,
        "exec_label": _exec_label(proc.apparmor_profile, proc.selinux_label),
        "user": (proc.user.uid, proc.user.gid, tuple(proc.user.additional_gids)),
        "no_new_privs": proc.no_new_privileges,
        "rlimits": _rlimits(spec),
        "seccomp": _seccomp_program(spec, config),
        "hooks": _hook_plan(spec, workspace),
        "start_fifo": settings.start_fifo,
        "container_id": settings.container_id,
        "args": tuple(proc.args),
        "env": tuple(proc.env),
    }


def _exec_label(apparmor: str, selinux: str) -> tuple[str, str] | None:
    """Where and what to write so that execve enters the AppArmor profile or SELinux
    context the config names; UsageError where that security module is not active (a
    label that would silently not apply is refused, not ignored)."""
    from mesobox.errors import UsageError

    if apparmor and selinux:
        raise UsageError("process.apparmorProfile and process.selinuxLabel are both set: one security module runs")
    if apparmor:
        try:
            with open("/sys/module/apparmor/parameters/enabled") as f:
                enabled = f.read().strip() == "Y"
        except OSError:
            enabled = False
        if not enabled:
            raise UsageError(f"process.apparmorProfile {apparmor!r}: AppArmor is not enabled on this host",
                             hint="remove apparmorProfile from config.json")
        attr = "/proc/self/attr/apparmor/exec"
        return (attr if probe.lexists(attr) else "/proc/self/attr/exec"), f"exec {apparmor}"
    if selinux:
        if not probe.lexists("/sys/fs/selinux/enforce"):
            raise UsageError(f"process.selinuxLabel {selinux!r}: SELinux is not enabled on this host",
                             hint="remove selinuxLabel from config.json")
        return "/proc/self/attr/exec", selinux
    return None


def _inside_ids(spec: Spec) -> tuple[int, int]:
    """The caller's own (uid, gid) as the container's user namespace names them."""
    uid, gid = os.getuid(), os.getgid()
    inside_uid = next((m.container_id + uid - m.host_id for m in spec.linux.uid_mappings
                       if m.host_id <= uid < m.host_id + m.size), uid)
    inside_gid = next((m.container_id + gid - m.host_id for m in spec.linux.gid_mappings
                       if m.host_id <= gid < m.host_id + m.size), gid)
    return inside_uid, inside_gid


def _squash_owners(spec: Spec) -> str:
    """fuse-overlayfs options for a writable layer over a squashfs mounted by a user:
    without sub-ids the namespace cannot map the image's owners (its root is nobody),
    so every file shows as the caller's own; "" where they are mapped (fusemount.py)."""
    if spec.mesobox.subids:
        return ""
    uid, gid = _inside_ids(spec)
    return f"squash_to_uid={uid},squash_to_gid={gid}"


def _shared_userns_dir(spec: Spec, config: Config, flags: int) -> str | None:
    """Where the node's shared user namespace is recorded (sharedns.py), when it is shared."""
    if spec.mesobox.userns != "shared" or not flags & sc.CLONE_NEWUSER:
        return None
    return os.path.join(config.runtime_dir_str, "userns")


def _cma_env(spec: Spec, config: Config, flags: int) -> tuple[str, ...]:
    """What the MPI libraries are told if the namespace cannot be shared after all (a
    spec that does not share has them in its environment already)."""
    if _shared_userns_dir(spec, config, flags) is None:
        return ()
    from mesobox.launch.specbuild import MPI_SHM_DEFAULTS

    return tuple(f"{key}={value}" for key, value in MPI_SHM_DEFAULTS)


RUN_HOOKS = ("createContainer", "startContainer")
_MARK = "\0"  # where execute.run_hooks puts the pid: json.dumps never writes a raw control character
_MARK_ID = "\1"  # where it puts the container's id (the same in every hook of a launch)


def _hook_plan(spec: Spec, workspace: str) -> HookPlan | None:
    """The createContainer and startContainer hooks as plain data, with the OCI state
    and the bundle's config.json they read, as JSON text made here: json is imported
    only for a spec with hooks (and at run time only to write process.env, which a
    saved program composes anew).  Compiling runs no hook.  A hook of another kind is
    refused: running it is issue 13's OCI lifecycle, and skipping it would leave a
    container that looks right and is not."""
    hooks = spec.hooks
    kinds = hooks.kinds()
    if not kinds:
        return None
    later = [kind for kind in kinds if kind not in RUN_HOOKS]
    if later:
        from mesobox.errors import UsageError

        raise UsageError(f"{later[0]} hooks are not run by mesobox run yet ({getattr(hooks, later[0])[0].path})",
                         hint="mesobox runs createContainer and startContainer hooks")
    import json

    from mesobox.oci.spec import hooks_json

    bundle = os.path.join(workspace, "bundle")
    doc = {"ociVersion": "1.0.2",
           # the root as the createContainer hooks see it: before pivot_root, in the
           # container's mount namespace (nvidia-ctk's hooks find it here)
           "root": {"path": os.path.join(workspace, "root"), "readonly": spec.root.readonly},
           "process": {"args": list(spec.process.args), "cwd": spec.process.cwd, "env": _MARK},
           "hooks": hooks_json(hooks), "annotations": dict(spec.annotations)}
    head, _, tail = json.dumps(doc).partition(json.dumps(_MARK))
    annotations = json.dumps(dict(spec.annotations))

    def state(status: str) -> str:
        return (f'{{"ociVersion": "1.0.2", "id": "{_MARK_ID}", "status": "{status}", "pid": {_MARK}, '
                f'"bundle": {json.dumps(bundle)}, "annotations": {annotations}}}')

    def steps(kind: str) -> tuple[HookStep, ...]:
        return tuple((h.path, h.args or (h.path,), h.env, h.timeout or 0) for h in getattr(hooks, kind))

    return bundle, (head, tail), steps("createContainer"), steps("startContainer"), (state("creating"),
                                                                                       state("created"))


def _escaped(text: str | None) -> str | None:
    """One field of one line: a path may hold tabs and newlines."""
    if text is None:
        return None
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _identity_files(spec: Spec, image: str) -> tuple[tuple[str, str], ...]:
    """/etc/passwd and /etc/group: the image's entries plus the caller's."""
    from mesobox.launch import identity, probe

    names = spec.mesobox
    user = spec.process.user
    passwd = identity.passwd_text(probe.image_text(image, "etc/passwd"), names.user_name, user.uid, user.gid,
                                  names.home, names.shell)
    group = identity.group_text(probe.image_text(image, "etc/group"), names.group_name, user.gid, names.user_name)
    if names.dns:  # --dns, as Apptainer's: the name servers given, and nothing of the host's file
        resolv = "".join(f"nameserver {server}\n" for server in names.dns)
        return (("passwd", passwd), ("group", group), ("resolv.conf", resolv))
    return (("passwd", passwd), ("group", group))


def _rlimits(spec: Spec) -> tuple[tuple[str, int, int, int], ...]:
    """process.rlimits as setrlimit(2) arguments: the resource's number on this host
    (RLIMIT_LOCKS is 10 everywhere, and missing from Python's resource module), and -1
    for RLIM_INFINITY (how the resource module spells it)."""
    if not spec.process.rlimits:
        return ()
    import resource

    from mesobox.oci.spec import RLIM_INFINITY

    def value(limit: int) -> int:
        return -1 if limit >= RLIM_INFINITY else limit

    return tuple((kind[7:].lower(), int(getattr(resource, kind, 10)), value(soft), value(hard))
                 for kind, soft, hard in spec.process.rlimits)


def _seccomp_program(spec: Spec, config: Config) -> bytes | None:
    """The compiled filter, read from the per-user cache or compiled with libseccomp
    and cached (seccomp.py)."""
    if spec.linux.seccomp is None:
        return None
    from mesobox.isolation.seccomp import prepare

    profile = None if spec.linux.seccomp.get("mesobox.builtin") else spec.linux.seccomp
    return prepare(profile, os.path.join(config.runtime_dir_str, "seccomp"))
