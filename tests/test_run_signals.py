"""Launcher signal handling and shared-mount hygiene, with real processes and signals.

- A signal arriving while mesobox is still building the container (Slurm's early
  ``--signal=USR1@T``) must reach the workload's trap, never kill mesobox.
- ^C typed at a terminal reaches a supervised workload once, not twice.
- A SIGKILLed launcher's shared squashfs mount is reaped by the next launch.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, wait_until
from run_support import make_squashfs, mesobox_argv, squashfuse_state

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    rootfs = make_busybox_rootfs(shared_tmp / "sig-rootfs")
    return rootfs, make_squashfs(rootfs, shared_tmp / "sig-rootfs.sqfs")


USR1 = 1 << (signal.SIGUSR1 - 1)


@pytest.fixture
def runtime(world_tmp: Path) -> Iterator[Path]:
    """The user's runtime dir; any mount a failing run left in it is removed after."""
    path = world_tmp / "rt"
    yield path
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if str(path) + "/" in line.split(" - ")[0]]
    for point in points:
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _state(pid: int) -> tuple[bool, int, int]:
    """(is it mesobox's Python (not setpriv, not the vfork of subprocess, which blocks
    everything, not the exec'd workload), SigBlk, SigCgt) of ``pid``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/status") as f:
            lines = [line.split(":\t") for line in f if line.startswith(("SigBlk", "SigCgt"))]
        masks = {k: int(v, 16) for k, v in lines}
    except (OSError, ValueError):
        return False, 0, 0
    ours = not cmdline.startswith(b"setpriv") and b"\0-m\0mesobox\0" in cmdline
    return ours, masks.get("SigBlk", 0), masks.get("SigCgt", 0)


def _usr1_train(proc: subprocess.Popen[bytes], started: threading.Event, sent: list[bool], trapped: Path,
                go: Path) -> None:
    """USR1 every 2 ms, from the moment mesobox is inside its launcher (it has blocked
    USR1 (fixed) or printed its first --debug mount line (either version: the container
    is then half-built)) until the workload's trap has counted one: the train spans the
    set-up, the exec and the workload, however long each takes.  A tick is skipped only
    while the pid is the bare workload between its execve and its trap, where a signal
    kills any process.  Then the workload may end (``go``)."""
    try:
        while proc.poll() is None:
            ours, blocked, _ = _state(proc.pid)
            if ours and (started.is_set() or blocked & USR1):
                break
            time.sleep(0.0002)
        ceiling = time.monotonic() + 60  # against a hang only
        while proc.poll() is None and not trapped.exists() and time.monotonic() < ceiling:
            ours, blocked, caught = _state(proc.pid)
            if ours or caught & USR1:
                proc.send_signal(signal.SIGUSR1)
                sent.append(ours and not caught & USR1)  # True: mesobox had it, not a trap
            time.sleep(0.002)
    finally:
        go.touch()


@pytest.mark.userns
@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_signals_during_setup_reach_the_workload(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path, world_tmp: Path, fmt: str
) -> None:
    image = images[0] if fmt == "dir" else images[1]
    trapped, go = world_tmp / "trapped", world_tmp / "go"
    script = (f"n=0; trap 'n=$((n+1)); echo $n > {trapped}' USR1; "
              f"while [ ! -e {go} ]; do sleep 0.02; done; echo traps=$n")
    argv, env = mesobox_argv(mesobox, user, ["exec", "--debug", str(image), "sh", "-c", script],
                             env={"MESOBOX_RUNTIME_DIR": str(runtime)})
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    started, sent = threading.Event(), list[bool]()
    train = threading.Thread(target=_usr1_train, args=(proc, started, sent, trapped, go))
    train.start()
    err = b""
    for line in proc.stderr:
        err += line
        if line.startswith(b"mesobox: mount:"):
            started.set()
    out = proc.stdout.read() if proc.stdout else b""
    proc.wait(timeout=30)
    train.join()
    assert proc.returncode == 0, (proc.returncode, len(sent), err.decode()[-500:])
    assert sent and sent[0], f"the signal train did not start during set-up: {sent[:5]}"
    traps = int(out.decode().split("traps=")[1])
    assert traps >= 1, out
    assert b"Traceback" not in err


@pytest.mark.userns
def test_a_signal_before_the_runtime_is_imported_waits_for_the_workload(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path, world_tmp: Path
) -> None:
    """The CLI holds the signals as soon as it reads a launching verb, before loading the
    config and importing the runtime.  A FIFO as the user's config file stops mesobox
    exactly there (open(2) waits for a writer): a SIGTERM sent then must wait for the
    workload's trap instead of killing mesobox."""
    fifo = world_tmp / "config.toml"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    script = "trap 'echo got-term; exit 7' TERM; i=0; while [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done"
    argv, env = mesobox_argv(mesobox, user, ["exec", str(images[0]), "sh", "-c", script],
                             env={"MESOBOX_RUNTIME_DIR": str(runtime), "MESOBOX_CONFIG": str(fifo)})
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    term = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ours, blocked, _ = _state(proc.pid)
        if ours and blocked & term and _waits_on_fifo(proc.pid):
            break
        time.sleep(0.005)
    else:
        proc.kill()
        raise AssertionError(f"mesobox never waited on its config FIFO: {proc.communicate()}")
    proc.send_signal(signal.SIGTERM)  # mesobox is stuck in open(config.toml), TERM held
    with open(fifo, "w"):
        pass  # an empty config file: mesobox goes on
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (7, b"got-term\n"), err.decode()[-500:]


def _waits_on_fifo(pid: int) -> bool:
    """Is ``pid`` blocked in open(2) of a FIFO that has no writer yet (fifo(7))?"""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() == "wait_for_partner"
    except OSError:
        return False


# The supervisor's forwarding loop (forwarding.wait_forwarding) under a real pty: a child
# in the same foreground process group counts the SIGINTs it gets and who sent them,
# until the batch system's USR1, which the test sends last (60 s: a ceiling on a hang).
PTY_SCRIPT = r"""
import os, signal, sys
from mesobox.launch import forwarding
pid = os.fork()
if pid == 0:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGUSR1})
    os.write(1, b"ready\n")
    got = []
    while (info := signal.sigtimedwait({signal.SIGINT, signal.SIGUSR1}, 60)) is not None:
        got.append(f"{info.si_signo}/{info.si_code}")
        os.write(1, f"took {info.si_signo}\n".encode())
        if info.si_signo == signal.SIGUSR1:
            break
    os.write(1, ("got " + " ".join(got) + "\n").encode())
    os._exit(0)
sys.exit(forwarding.wait_forwarding(pid))
"""


def _waits_for_signals(pid: int) -> bool:
    """Is ``pid`` asleep in sigwaitinfo(2), with no signal pending (so it has taken, and
    dealt with, every one sent to it so far)?"""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            waiting = f.read().startswith("do_sigtimedwait")
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd", "ShdPnd"))]
    except OSError:
        return False
    return waiting and not any(pending)


def test_ctrl_c_reaches_a_supervised_workload_once() -> None:
    child, master = pty.fork()
    if child == 0:  # a new session whose controlling terminal is the pty
        os.environ["PYTHONPATH"] = SRC
        os.execv(sys.executable, [sys.executable, "-c", PTY_SCRIPT])
    out = b""
    try:
        out = _read_until(master, b"ready", 60)
        wait_until(lambda: _waits_for_signals(child), "the supervisor waits for signals")
        os.write(master, b"\x03")  # ^C: the tty signals the whole foreground group
        out += _read_until(master, b"took 2", 60)  # the workload has the tty's SIGINT …
        # … and the supervisor has taken its own and waits again: had it passed one on,
        # that one would be queued now, and taken before the USR1
        wait_until(lambda: _waits_for_signals(child), "the supervisor deals with the SIGINT")
        os.kill(child, signal.SIGUSR1)  # a batch system's signal: forwarded
        out += _read_until(master, b"\n", 60, after=b"got ")
    finally:
        _pid, status = os.waitpid(child, 0)
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, out
    got = out.split(b"got ", 1)[1].split()
    assert [g.split(b"/")[0] for g in got] == [b"2", b"10"], out  # one SIGINT, then USR1
    assert got[0] == b"2/128", out  # the SIGINT is the tty's own (SI_KERNEL)


def _read_until(fd: int, token: bytes, timeout: float, after: bytes = b"") -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if after and after in buf and token in buf.split(after, 1)[1]:
            return buf
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        if not after and token in buf:
            return buf
    raise AssertionError(f"no {token!r} from the pty: {buf!r}")


@pytest.mark.userns
def test_sigkilled_launchers_mount_is_reaped_by_the_next_launch(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path, runtime: Path
) -> None:
    env = {"MESOBOX_RUNTIME_DIR": str(runtime), "MESOBOX_SQUASHFS_LINGER": "0"}  # no linger: reaped at once
    ready = world_tmp / "ready"
    argv, full = mesobox_argv(mesobox, user, ["exec", str(images[1]), "sh", "-c", f"echo > {ready}; sleep 60"],
                              env=env)
    proc = subprocess.Popen(argv, env=full, cwd="/", stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate(timeout=5)
    proc.kill()  # SIGKILL: no release, the container follows by PR_SET_PDEATHSIG
    proc.wait(timeout=10)
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # left behind
    # The next launch, of another image (a directory), reaps it.
    done = mesobox("exec", str(images[0]), "true", as_user=user, env=env)
    assert done.returncode == 0, done.stderr
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert not list((runtime / "mnt").glob("*.refs"))
