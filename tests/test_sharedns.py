"""The shared user namespace of a node's ranks (launch/sharedns.py), as an ordinary user.

Containers started one per MPI rank join one user namespace, so CMA works between
them (tests/test_mpi_intranode.py runs MPI over it); each keeps its own mount
namespace.  Here: who shares with whom, that the first rank may leave before the last
arrives, that a record naming anything else is never joined, and that where sharing is
impossible the workload is told to keep MPI off CMA.

Concurrent containers meet at a barrier of files (each writes its namespace, then waits
for a "go" file): nothing here depends on timing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, wait_until
from run_support import make_squashfs, mesobox_argv

pytestmark = pytest.mark.userns

CMA_OFF = "OMPI_MCA_btl_vader_single_copy_mechanism=none"
# Each member writes "<user ns> <mount ns>" to NAME, then waits for the go file.
MEET = ('echo "$(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)" > "$0/$1.tmp" && mv "$0/$1.tmp" "$0/$1"; '
        'while [ ! -e "$0/go-$1" ]; do sleep 0.05; done')


@pytest.fixture()
def meeting(world_tmp: Path, user: User) -> Path:
    place = world_tmp / "meet"
    place.mkdir()
    os.chown(place, user.uid, user.gid)
    return place


@pytest.fixture()
def image(busybox_rootfs: Path) -> str:
    return str(busybox_rootfs)


class Member:
    """One container waiting at the barrier."""

    def __init__(self, mesobox: Mesobox, user: User, image: str, place: Path, name: str, *options: str,
                 env: dict[str, str] | None = None) -> None:
        self.place, self.name = place, name
        argv, full = mesobox_argv(mesobox, user, ["exec", "-B", str(place), *options, image, "/bin/sh", "-c", MEET,
                                                  str(place), name], env)
        self.proc = subprocess.Popen(argv, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def namespaces(self) -> tuple[str, str]:
        """(user ns, mount ns) of the container, once it has reached the barrier."""
        path = self.place / self.name

        def arrived() -> bool:
            assert self.proc.poll() is None, self.proc.communicate()
            return path.exists()

        wait_until(arrived, f"{self.name} at the barrier", ceiling=120)
        user_ns, mount_ns = path.read_text().split()
        return user_ns, mount_ns

    def leave(self) -> None:
        (self.place / f"go-{self.name}").touch()
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, (out, err)


def _leave_all(members: list[Member]) -> None:
    for m in members:
        if m.proc.poll() is None:
            (m.place / f"go-{m.name}").touch()
    for m in members:
        m.proc.communicate(timeout=120)


def _runtime_dir(mesobox: Mesobox, user: User) -> Path:
    return Path(mesobox.runtime_env(user)["MESOBOX_RUNTIME_DIR"])


def test_containers_started_together_share_one_user_namespace_and_keep_their_own_mounts(
    mesobox: Mesobox, user: User, image: str, meeting: Path
) -> None:
    members = [Member(mesobox, user, image, meeting, f"rank{i}") for i in range(6)]
    try:
        seen = [m.namespaces() for m in members]
        assert len({user_ns for user_ns, _ in seen}) == 1, seen
        assert len({mount_ns for _, mount_ns in seen}) == 6, seen
        # Not the host's namespace: each is a container.
        assert seen[0][0] != os.readlink("/proc/self/ns/user")
    finally:
        _leave_all(members)
    for m in members:
        assert m.proc.returncode == 0, m.proc.stderr


def test_the_first_rank_may_leave_before_the_last_arrives(
    mesobox: Mesobox, user: User, image: str, meeting: Path
) -> None:
    first = Member(mesobox, user, image, meeting, "first")
    shared = first.namespaces()[0]
    second = Member(mesobox, user, image, meeting, "second")
    try:
        assert second.namespaces()[0] == shared
        first.leave()
        third = Member(mesobox, user, image, meeting, "third")
        try:
            assert third.namespaces()[0] == shared
        finally:
            third.leave()
    finally:
        _leave_all([first, second])


def test_other_jobs_and_private_containers_do_not_share(
    mesobox: Mesobox, user: User, image: str, meeting: Path
) -> None:
    job1 = Member(mesobox, user, image, meeting, "job1", env={"SLURM_JOB_ID": "101"})
    members = [job1]
    try:
        shared = job1.namespaces()[0]
        also = Member(mesobox, user, image, meeting, "job1b", env={"SLURM_JOB_ID": "101"})
        other_job = Member(mesobox, user, image, meeting, "job2", env={"SLURM_JOB_ID": "102"})
        private = Member(mesobox, user, image, meeting, "private", "--userns", "private",
                         env={"SLURM_JOB_ID": "101"})
        pid_ns = Member(mesobox, user, image, meeting, "pidns", "--pid", env={"SLURM_JOB_ID": "101"})
        members += [also, other_job, private, pid_ns]
        assert also.namespaces()[0] == shared
        assert len({shared, other_job.namespaces()[0], private.namespaces()[0], pid_ns.namespaces()[0]}) == 4
    finally:
        _leave_all(members)


def test_a_record_naming_any_other_namespace_is_never_joined(
    mesobox: Mesobox, user: User, attacker: User, image: str, meeting: Path
) -> None:
    """The record lives in the user's private runtime directory, but the processes it
    names may be gone and their pids reused (here the record names only such
    processes): by another user's process in its own user
    namespace, by one of the user's own processes outside any container, or in a user
    namespace with other id maps.  None of them is joined; the launch makes its own
    namespace and records itself."""
    first = Member(mesobox, user, image, meeting, "first")  # alive throughout: its ns number stays its own
    shared = first.namespaces()[0]
    records = _runtime_dir(mesobox, user) / "userns"
    (record,) = [p for p in records.iterdir() if not p.name.startswith(".")]

    decoys = [
        # another user's process in its own user namespace
        subprocess.Popen(["runuser", "-u", attacker.name, "--", "unshare", "-r", "sleep", "300"]),
        subprocess.Popen(["runuser", "-u", user.name, "--", "sleep", "300"]),  # the user's, in the host's namespace
        subprocess.Popen(["runuser", "-u", user.name, "--", "unshare", "-r", "sleep", "300"]),  # other maps
    ]
    try:
        pids = []
        for decoy in decoys:
            wait_until(lambda d=decoy: _sleeping(d.pid), "the decoy to exec sleep")
            pids.append(_sleeping(decoy.pid))
        text = "".join(f"{pid} {_start_time(pid)}\n" for pid in pids)
        record.write_text(text)
        os.chown(record, user.uid, user.gid)
        decoy_ns = {os.readlink(f"/proc/{pid}/ns/user") for pid in pids}

        second = Member(mesobox, user, image, meeting, "second")
        try:
            ns = second.namespaces()[0]
            assert ns not in decoy_ns and ns != shared
            assert record.read_text().split()[0] == str(second.proc.pid)  # setpriv execs: the same pid
        finally:
            second.leave()
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()
        _leave_all([first])


def _sleeping(pid: int) -> int:
    """The pid of the ``sleep`` below ``pid`` (runuser forks; unshare execs), or 0."""
    for candidate in [pid, *_children(pid)]:
        try:
            if Path(f"/proc/{candidate}/comm").read_text().strip() == "sleep":
                return candidate
        except OSError:
            pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start_time(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def test_mpi_is_kept_off_cma_exactly_where_the_namespace_is_not_shared(
    mesobox: Mesobox, user: User, image: str
) -> None:
    def env(*options: str) -> str:
        result = mesobox("exec", *options, image, "/bin/env", as_user=user)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    assert "OMPI_MCA" not in env()  # shared: CMA works
    assert CMA_OFF in env("--userns", "private")
    assert CMA_OFF in env("--pid")  # its own pid namespace: CMA would name the wrong peer
    assert "OMPI_MCA" not in env("--contain")  # a private /dev/shm: no intra-node MPI to tell
    assert CMA_OFF in env("--fakeroot")  # a root inside holds every capability of its namespace: its own
    refused = mesobox("exec", "--fakeroot", "--userns", "shared", image, "/bin/true", as_user=user)
    lines = refused.stderr.decode().splitlines()
    assert refused.returncode != 0 and lines[0].startswith("mesobox: error: --userns shared is not available"), lines
    # The record cannot be kept (a file where its directory goes): a private namespace,
    # and the workload is told.
    runtime = _runtime_dir(mesobox, user)
    shutil.rmtree(runtime / "userns")
    (runtime / "userns").write_text("")
    os.chown(runtime / "userns", user.uid, user.gid)
    assert CMA_OFF in env()
    assert "OMPI_MCA_btl_vader_single_copy_mechanism=cma" in env("-e", "OMPI_MCA_btl_vader_single_copy_mechanism=cma")


def test_supervised_containers_join_too(
    mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path, meeting: Path
) -> None:
    """A squashfs image without a lingering mount keeps a supervisor (it releases the
    mount): the child joins the namespace and the supervisor writes no maps for it."""
    sqfs = str(make_squashfs(busybox_rootfs, world_tmp / "bb.sqfs"))
    linger = {"MESOBOX_SQUASHFS_LINGER": "0"}
    first = Member(mesobox, user, sqfs, meeting, "first", env=linger)
    second = Member(mesobox, user, sqfs, meeting, "second", env=linger)
    try:
        assert first.namespaces()[0] == second.namespaces()[0]
    finally:
        _leave_all([first, second])
    assert first.proc.returncode == second.proc.returncode == 0


def test_launches_from_a_saved_plan_share_too(mesobox: Mesobox, user: User, image: str, meeting: Path) -> None:
    """The second and third identical command lines run the program the first one saved
    (plancache.py); the namespace is chosen when the program runs, not when it compiles."""
    script = ('readlink /proc/self/ns/user > "$0/$$.tmp" && mv "$0/$$.tmp" "$0/$$"; '
              'while [ ! -e "$0/go" ]; do sleep 0.05; done')
    args = ["exec", "-B", str(meeting), image, "/bin/sh", "-c", script, str(meeting)]
    (meeting / "go").touch()
    assert mesobox(*args, as_user=user).returncode == 0  # compiles and saves the plan
    (meeting / "go").unlink()
    for path in meeting.iterdir():
        path.unlink()
    procs = []
    for _ in range(2):
        argv, full = mesobox_argv(mesobox, user, args)
        procs.append(subprocess.Popen(argv, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        wait_until(lambda: len([p for p in meeting.iterdir() if p.name.isdigit()]) == 2, "both at the barrier",
                   ceiling=120)
        seen = {p.read_text() for p in meeting.iterdir() if p.name.isdigit()}
        assert len(seen) == 1, seen
    finally:
        (meeting / "go").touch()
        for proc in procs:
            proc.communicate(timeout=120)
    assert [proc.returncode for proc in procs] == [0, 0]


def test_a_nested_mesobox_never_takes_over_the_record(
    mesobox: Mesobox, user: User, image: str, meeting: Path, world_tmp: Path, test_python: str
) -> None:
    """A mesobox run inside a container (whose runtime directory is the host's: /tmp is
    bound) keeps its own record: the ranks outside still find each other afterwards."""
    outer = make_busybox_rootfs(world_tmp / "outer")
    for link in ("lib", "lib64"):
        (outer / link).symlink_to(f"usr/{link}")
    subprocess.run(["chmod", "-R", "a+rX", str(outer)], check=True)
    first = Member(mesobox, user, image, meeting, "first")
    try:
        shared = first.namespaces()[0]
        venv = Path(test_python).parents[1]
        nested = mesobox("exec", "-B", str(venv), "-B", "/usr", str(outer), test_python, "-m", "mesobox", "exec",
                         image, "readlink", "/proc/self/ns/user", as_user=user, timeout=120)
        assert nested.returncode == 0, nested.stderr.decode()
        assert nested.stdout.decode().strip() != shared
        second = Member(mesobox, user, image, meeting, "second")
        try:
            assert second.namespaces()[0] == shared
        finally:
            second.leave()
    finally:
        _leave_all([first])
