"""Root isolation hardening, tried the way an attacker would, end to end.

- Real root's shifted container keeps none of the host root's supplementary groups: a
  ``root:G 0660`` file bound in stays unwritable although the launching root is in G.
- Every running root container has an id slice of its own (Podman's ``--userns=auto``):
  one cannot kill another's process; a slice is reused once its container ended, but
  not while a process it left behind still runs; killing the supervisor kills the
  container (PR_SET_PDEATHSIG re-armed after the credential change); an exhausted pool
  is one clear error; the lock directory is refused when it is not root's alone.
- Read-only binds are read-only all the way down: /sys/fs/cgroup/* under the built-in
  /sys, a user's submounts under ``-B DIR:DST:ro`` — with mount_setattr(2) and with the
  remount-per-mount fallback a kernel without it gets (ENOSYS from a seccomp filter).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from conftest import Mesobox, User, open_busybox_rootfs
from hostcaps import needs_cgroup, needs_mount_setattr
from isolation_support import wait_for
from mesobox.launch import identity

pytestmark = pytest.mark.root

SLICE_LOCKS = Path("/run/mesobox/idmap")

# Installs a seccomp filter answering mount_setattr(2) with ENOSYS, as a kernel older
# than 5.12 would, checks it took, then execs the rest of its command line.
NO_MOUNT_SETATTR = textwrap.dedent(
    """
    import ctypes, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[os.uname().machine]

    def ins(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)

    prog = b"".join([
        ins(0x20, 0, 0, 4),                  # A = seccomp_data.arch
        ins(0x15, 0, 3, arch),               # another ABI: allow
        ins(0x20, 0, 0, 0),                  # A = seccomp_data.nr
        ins(0x15, 0, 1, 442),                # mount_setattr?
        ins(0x06, 0, 0, 0x00050000 | 38),    # SECCOMP_RET_ERRNO | ENOSYS
        ins(0x06, 0, 0, 0x7FFF0000),         # SECCOMP_RET_ALLOW
    ])
    filters = ctypes.create_string_buffer(prog)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(filters)))
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fprog)), 0, 0):
        sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
    if libc.syscall(ctypes.c_long(442), -1, b"", 0, None, 0) != -1 or ctypes.get_errno() != 38:
        sys.exit("the filter did not hide mount_setattr")
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


@pytest.fixture(scope="module")
def rootfs(shared_tmp: Path) -> Path:
    return open_busybox_rootfs(shared_tmp / "root-hardening-rootfs")


@pytest.fixture(scope="module")
def no_mount_setattr(shared_tmp: Path) -> Path:
    path = shared_tmp / "no-mount-setattr.py"
    path.write_text(NO_MOUNT_SETATTR)
    os.chmod(path, 0o644)
    return path


def run(mesobox: Mesobox, *args: str, prefix: Sequence[str] = (), as_user: User | None = None,
        ) -> subprocess.CompletedProcess[bytes]:
    """``mesobox`` with a command in front (setpriv, the seccomp wrapper)."""
    env = {**mesobox.base_env(), "MESOBOX_STORE": str(mesobox.store_root / (as_user.name if as_user else "root")),
           **mesobox.runtime_env(as_user)}
    argv = [*prefix, mesobox.python, "-m", "mesobox", *args]
    if as_user is not None:
        return as_user.run(argv, env=env, timeout=120)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
    return subprocess.run(argv, env={**base, **env}, capture_output=True, timeout=120, cwd="/", check=False)


def start(mesobox: Mesobox, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
    env.update(mesobox.base_env(), MESOBOX_STORE=str(mesobox.store_root / "root"), **mesobox.runtime_env(None))
    return subprocess.Popen([mesobox.python, "-m", "mesobox", *args], env=env, cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def host_uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of ``pid``, as the host sees them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def read_pid(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip().isdigit(), timeout=60), path
    return int(path.read_text())


def uid_map_start(text: bytes) -> tuple[int, int]:
    """(host start, size) of a single-line uid_map as printed inside."""
    inside, start, size = text.split()[:3]
    assert inside == b"0"
    return int(start), int(size)


def pool_starts() -> set[int]:
    return {uid for uid, _gid in identity.root_pool()}


@pytest.fixture()
def stopper() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test, whatever happened; waits until they are
    reaped too: a zombie still shows its uid, and keeps its slice out of use."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=30)


# --- 1. supplementary groups -----------------------------------------------------------------


@pytest.mark.parametrize("group", [4242, 0], ids=["other-group", "gid-0"])
def test_shifted_root_drops_the_host_roots_supplementary_groups(mesobox: Mesobox, rootfs: Path, world_tmp: Path,
                                                                group: int) -> None:
    victim = world_tmp / "group-writable"
    victim.write_text("original\n")
    os.chown(victim, 0, group)
    os.chmod(victim, 0o660)
    groups = ["setpriv", "--groups", str(group)]
    # The launching root really has the group: the host write check would pass with it.
    assert str(group) in subprocess.run([*groups, "id", "-G"], capture_output=True, text=True,
                                        check=True).stdout.split()
    script = "grep '^Groups:' /proc/self/status; echo broken >> /x/group-writable"
    proc = run(mesobox, "exec", "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c", script, prefix=groups)
    assert proc.returncode != 0 and b"Permission denied" in proc.stderr, proc.stderr
    assert proc.stdout.split() == [b"Groups:"]  # none at all inside
    assert victim.read_text() == "original\n"


def test_host_root_container_has_no_supplementary_groups_either(mesobox: Mesobox, rootfs: Path) -> None:
    proc = run(mesobox, "exec", "--host-root", str(rootfs), "grep", "^Groups:", "/proc/self/status",
               prefix=["setpriv", "--groups", "4242,0"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"Groups:"]


# --- 2. one id slice per running root container ------------------------------------------------


def test_concurrent_root_containers_have_distinct_ids_and_cannot_kill_each_other(
        mesobox: Mesobox, rootfs: Path, world_tmp: Path, stopper: list[int]) -> None:
    first = start(mesobox, "exec", "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c",
                  "echo $$ > /x/first.pid; exec sleep 600")
    stopper.append(first.pid)
    target = read_pid(world_tmp / "first.pid")
    stopper.append(target)
    first_uids = host_uids(target)
    proc = run(mesobox, "exec", str(rootfs), "sh", "-c", 'cat /proc/self/uid_map; kill -9 "$1"', "sh", str(target))
    start_b, size_b = uid_map_start(proc.stdout)
    assert proc.returncode != 0 and b"Operation not permitted" in proc.stderr, proc.stderr
    assert alive(target) and host_uids(target) == first_uids
    # Both are slices of root's pool, and the first container's ids are not the second's.
    assert size_b == identity.SLICE and start_b in pool_starts()
    assert any(s <= first_uids[0] < s + identity.SLICE for s in pool_starts()), first_uids
    assert not any(start_b <= uid < start_b + size_b for uid in first_uids), (first_uids, start_b)
    first.kill()
    first.wait()


def _locked_by_someone(uid: int, gid: int) -> bool:
    fd = os.open(SLICE_LOCKS / f"slice-{uid}-{gid}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


def test_a_slice_is_reused_once_its_container_ended(mesobox: Mesobox, rootfs: Path) -> None:
    pool = identity.root_pool()
    for _attempt in range(5):  # other root containers on this node may take slices meanwhile
        proc = run(mesobox, "exec", str(rootfs), "cat", "/proc/self/uid_map")
        assert proc.returncode == 0, proc.stderr
        used = uid_map_start(proc.stdout)[0]
        index = [uid for uid, _gid in pool].index(used)
        if _locked_by_someone(*pool[index]):
            continue  # released, and already taken by another root container
        # Hold every free slice before it, so the next launch can only take this one again.
        held = []
        for uid, gid in pool[:index]:
            fd = os.open(SLICE_LOCKS / f"slice-{uid}-{gid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(BlockingIOError):  # a running container's: busy anyway
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
        try:
            again = run(mesobox, "exec", str(rootfs), "cat", "/proc/self/uid_map")
        finally:
            for fd in held:
                os.close(fd)
        assert again.returncode == 0, again.stderr
        if uid_map_start(again.stdout)[0] == used:
            return
        assert _locked_by_someone(*pool[index]), "the ended container's slice was neither reused nor taken"
    pytest.fail("the slice was taken by other root containers in every attempt")


def test_a_slice_is_not_reused_while_a_process_left_behind_runs(mesobox: Mesobox, rootfs: Path, world_tmp: Path,
                                                                stopper: list[int]) -> None:
    script = "sleep 600 </dev/null >/dev/null 2>&1 & echo $! > /x/left.pid"
    proc = run(mesobox, "exec", "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    left = read_pid(world_tmp / "left.pid")
    stopper.append(left)
    assert alive(left)  # the container ended; its background process did not
    left_uid = host_uids(left)[0]
    after = run(mesobox, "exec", str(rootfs), "sh", "-c", 'cat /proc/self/uid_map; kill -9 "$1"', "sh", str(left))
    start_b, size_b = uid_map_start(after.stdout)
    assert not start_b <= left_uid < start_b + size_b, (left_uid, start_b)
    assert b"Operation not permitted" in after.stderr, after.stderr
    assert alive(left)


def test_killing_the_supervisor_kills_the_root_container(mesobox: Mesobox, rootfs: Path, world_tmp: Path,
                                                         stopper: list[int]) -> None:
    supervisor = start(mesobox, "exec", "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c",
                       "echo $$ > /x/pid; exec sleep 600")
    stopper.append(supervisor.pid)
    workload = read_pid(world_tmp / "pid")
    stopper.append(workload)
    assert host_uids(workload)[0] != 0  # shifted: the credential change that clears the death signal
    supervisor.kill()
    supervisor.wait()
    # Bounded wait for the kernel's SIGKILL to land, not a timing assertion.
    assert wait_for(lambda: not alive(workload), timeout=30), "the container outlived its supervisor"


PROGRAM = textwrap.dedent(
    """
    import json, os, sys, time
    from mesobox.errors import MesoboxError
    from mesobox.launch import identity
    top, start, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
    pool = [(start + i * identity.SLICE, start + i * identity.SLICE) for i in range(count)]
    try:
        got = identity.claim_slice(pool, top)
    except MesoboxError as err:
        print(json.dumps({"error": err.message, "hint": err.hint}), flush=True)
        sys.exit(1)
    print(json.dumps({"slice": got}), flush=True)
    if hold:
        sys.stdin.read()
    """
)


def _claim(src: Path, program: Path, top: Path, start_id: int, count: int,
           hold: bool = False) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen([sys.executable, str(program), str(top), str(start_id), str(count),
                             "hold" if hold else "once"], env={**os.environ, "PYTHONPATH": str(src)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result = json.loads(proc.stdout.readline())
    return proc, result


@pytest.fixture()
def slice_top(world_tmp: Path) -> Path:
    """A stand-in for / with a root-owned run/ below it."""
    top = world_tmp / "top"
    (top / "run").mkdir(parents=True)
    for path in (top, top / "run"):
        os.chmod(path, 0o755)
    os.chmod(world_tmp, 0o755)
    return top


def test_an_exhausted_pool_is_one_clear_error(mesobox_src: Path, world_tmp: Path, slice_top: Path) -> None:
    program = world_tmp / "claim.py"
    program.write_text(PROGRAM)
    base = 3_000_000_000  # ids no process on this node runs with
    holders = []
    try:
        for expected in (base, base + 65536):
            holder, got = _claim(mesobox_src, program, slice_top, base, 2, hold=True)
            holders.append(holder)
            assert got == {"slice": [expected, expected]}
        last, refused = _claim(mesobox_src, program, slice_top, base, 2)
        assert last.wait() == 1
        assert refused["error"] == ("no free id range for a root container: all 2 ranges of 65536 ids of root's "
                                    "pool are in use")
        assert "/etc/subuid" in str(refused["hint"])
        lock_dir = slice_top / "run" / "mesobox" / "idmap"
        st = lock_dir.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
        holders.pop(0).communicate("")  # the first container ends: its slice is free again
        again, got = _claim(mesobox_src, program, slice_top, base, 2)
        assert again.wait() == 0 and got == {"slice": [base, base]}
    finally:
        for holder in holders:
            holder.communicate("")


@pytest.mark.parametrize("plant", ["symlink-idmap", "user-owned-mesobox", "group-writable-idmap"])
def test_a_lock_directory_not_roots_alone_is_refused(mesobox_src: Path, world_tmp: Path, slice_top: Path,
                                                     user: User, plant: str) -> None:
    program = world_tmp / "claim.py"
    program.write_text(PROGRAM)
    planted = world_tmp / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, user.uid, user.gid)
    mesobox_dir = slice_top / "run" / "mesobox"
    mesobox_dir.mkdir(mode=0o700)
    if plant == "symlink-idmap":
        (mesobox_dir / "idmap").symlink_to(planted)
    elif plant == "user-owned-mesobox":
        os.chown(mesobox_dir, user.uid, user.gid)
    else:
        (mesobox_dir / "idmap").mkdir()
        os.chmod(mesobox_dir / "idmap", 0o770)
    proc, got = _claim(mesobox_src, program, slice_top, 3_000_000_000, 2)
    assert proc.wait() == 1
    assert "root's id ranges" in str(got["error"]), got
    assert list(planted.iterdir()) == []  # nothing was made where the attacker pointed


# --- 3. read-only binds, all the way down ------------------------------------------------------


def _sys_submount_file() -> str:
    """A writable file on a mount below /sys: a cgroup controller's cgroup.procs."""
    for candidate in [*sorted(glob.glob("/sys/fs/cgroup/*/cgroup.procs")), "/sys/fs/cgroup/cgroup.procs"]:
        if os.path.exists(candidate):
            return candidate
    pytest.skip("no cgroup filesystem below /sys on this host: no submount of /sys to try")


# "mount_setattr": this kernel's own path; "enosys": the remount fallback of a kernel
# without it (a seccomp filter answers ENOSYS), which runs on every host.
KERNELS = [pytest.param("mount_setattr", marks=needs_mount_setattr), "enosys"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("opts", [pytest.param(["--host-root", "--memory", "64m"], marks=needs_cgroup("memory")), []],
                         ids=["host-root", "shifted-root"])
def test_sys_submounts_are_read_only_for_root(mesobox: Mesobox, rootfs: Path, no_mount_setattr: Path,
                                              opts: list[str], kernel: str) -> None:
    target = _sys_submount_file()
    prefix = [mesobox.python, str(no_mount_setattr)] if kernel == "enosys" else []
    proc = run(mesobox, "exec", *opts, str(rootfs), "sh", "-c", f"echo $$ > {target}", prefix=prefix)
    assert proc.returncode != 0, proc.stderr
    assert b"Read-only file system" in proc.stderr, proc.stderr


@pytest.fixture()
def with_submounts(world_tmp: Path) -> Iterator[Path]:
    """DIR with a tmpfs on 'DIR/sub dir' and another on 'DIR/sub dir/inner' (a space:
    mountinfo escapes it), writable by everyone."""
    top = world_tmp / "tree"
    sub = top / "sub dir"
    sub.mkdir(parents=True)
    os.chmod(top, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1m", "tmpfs", str(sub)], check=True)
    try:
        (sub / "inner").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1m", "tmpfs", str(sub / "inner")], check=True)
        yield top
    finally:
        subprocess.run(["umount", "-R", "-l", str(sub)], check=False)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("who", ["user", "root"])
def test_readonly_bind_makes_its_submounts_read_only(mesobox: Mesobox, user: User, rootfs: Path,
                                                     with_submounts: Path, no_mount_setattr: Path,
                                                     who: str, kernel: str) -> None:
    as_user = user if who == "user" else None
    prefix = [mesobox.python, str(no_mount_setattr)] if kernel == "enosys" else []
    script = "for f in '/x/sub dir/file' '/x/sub dir/inner/file'; do echo hi > \"$f\" || echo refused; done"
    writable = run(mesobox, "exec", "-B", f"{with_submounts}:/x", str(rootfs), "sh", "-c", script,
                   prefix=prefix, as_user=as_user)
    assert writable.returncode == 0 and writable.stdout == b"", writable.stderr  # the tmpfs take writes
    readonly = run(mesobox, "exec", "-B", f"{with_submounts}:/x:ro", str(rootfs), "sh", "-c", script,
                   prefix=prefix, as_user=as_user)
    assert readonly.returncode == 0, readonly.stderr
    assert readonly.stdout.split() == [b"refused", b"refused"], readonly.stderr
    assert readonly.stderr.count(b"Read-only file system") == 2, readonly.stderr


# --- persistent state keeps its slice --------------------------------------------------------


def test_a_root_overlay_keeps_the_slice_its_files_belong_to(
        mesobox: Mesobox, rootfs: Path, world_tmp: Path, stopper: list[int]) -> None:
    """A quota overlay made while another root container runs gets a free slice, which its
    file carries; every launch with it takes that slice, so its files stay writable."""
    first = start(mesobox, "exec", "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c",
                  "echo $$ > /x/first.pid; exec sleep 600")
    stopper.append(first.pid)
    holder = read_pid(world_tmp / "first.pid")
    stopper.append(holder)
    taken = host_uids(holder)[0]
    image = world_tmp / "ovl.img"
    assert run(mesobox, "overlay", "create", str(image), "8m").returncode == 0
    owner = image.stat().st_uid
    assert owner in pool_starts() and owner != taken
    for round_ in ("1", "2"):
        proc = run(mesobox, "exec", "--overlay", str(image), str(rootfs), "sh", "-c",
                   f"echo {round_} >> /kept && cat /kept /proc/self/uid_map")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[:int(round_)] == [str(n).encode() for n in range(1, int(round_) + 1)]
        assert int(proc.stdout.split()[int(round_) + 1]) == owner
    # While a container holds that slice, a second one with the same overlay is refused.
    second = start(mesobox, "exec", "--overlay", str(image), "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c",
                   "echo $$ > /x/second.pid; exec sleep 600")
    stopper.append(second.pid)
    stopper.append(read_pid(world_tmp / "second.pid"))
    proc = run(mesobox, "exec", "--overlay", str(image), str(rootfs), "true")
    assert proc.returncode == 125 and b"in use by another root container" in proc.stderr, proc.stderr
    for launcher in (second, first):  # reaped here, or the stopper waits on their zombies
        launcher.kill()
        launcher.wait()


def test_a_root_overlay_directory_keeps_its_slice_too(
        mesobox: Mesobox, rootfs: Path, world_tmp: Path, stopper: list[int]) -> None:
    ovl = world_tmp / "ovl"
    proc = run(mesobox, "exec", "--overlay", str(ovl), str(rootfs), "sh", "-c", "echo 1 > /kept")
    assert proc.returncode == 0, proc.stderr
    owner = (ovl / "upper").stat().st_uid
    assert owner in pool_starts() and (ovl / "upper" / "kept").stat().st_uid == owner
    # Another root container now holds that slice? Then this overlay waits its turn (one
    # line); once it ends, the overlay's own slice is free again and its files writable.
    first = start(mesobox, "exec", "--overlay", str(ovl), "-B", f"{world_tmp}:/x", str(rootfs), "sh", "-c",
                  "echo $$ > /x/first.pid; exec sleep 600")
    stopper.append(first.pid)
    stopper.append(read_pid(world_tmp / "first.pid"))
    other = run(mesobox, "exec", str(rootfs), "cat", "/proc/self/uid_map")  # takes another slice
    assert other.returncode == 0 and uid_map_start(other.stdout)[0] != owner
    first.kill()
    first.wait()
    proc = run(mesobox, "exec", "--overlay", str(ovl), str(rootfs), "sh", "-c", "echo 2 >> /kept; cat /kept")
    assert proc.returncode == 0 and proc.stdout == b"1\n2\n", proc.stderr
