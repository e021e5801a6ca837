"""Plan cache: a command line's launch program, run again while nothing it depends on
has changed.

Every rank of an MPI job starts the same container with the same command line, and
compiling the launch program — parsing options and config, building the spec,
planning the mounts, writing passwd/group, reading the seccomp filter — costs more
imports and work than running it.  So a launch records the questions it asks the host
while compiling (probe.py), and an unsupervised launch saves program, questions and
answers under a key: the verb and its arguments, the caller's ids, the machine and
kernel, the size and mtime of mesobox's own source files, the configuration
(probe.config_files: its files and the MESOBOX_*/XDG_* variables) and the working
directory.  The next launch with that key asks the same questions again (a few dozen
stat(2)s and lookups) and, if every answer is the same, executes the saved program
with the environment composed anew from its own (environ.compose) — importing neither
the spec builder, the planner, the config parser nor libseccomp's compiler.  A
changed answer (a bind source gone, an image whose /etc/passwd changed, a home
directory moved) only means compiling again, and saving the new program.

A squashfs image is recorded by its file's identity (device, inode, size, mtime,
ctime: the same file is the same tree), and a saved program first attaches to the
node's shared mount of it, as any launch does (squashmount.py).

A stored image is recorded by the identity of the record file that names it in each
store searched (build._note_record) and by its rootfs or squashfs file.

Not recorded (each such launch compiles its own program): a docker:// reference pulled
by that launch (the next one is recorded), --fakeroot (sub-id files), --overlay,
seccomp profile files, --mpi, --debug, and launches that need a supervisor (real root,
cgroup limits, slirp, sub-id maps, squashfs_linger = 0).  ``plan_cache = false``
(or MESOBOX_PLAN_CACHE=0) turns it off.

Plans live in ``<runtime dir>/plans`` (paths.cache_root), private to the user
(paths.py says why a user who edits their own plans gains nothing), at most
``MAX_PLANS`` of them: the oldest go first.
"""

from __future__ import annotations

import os

from mesobox import paths
from mesobox.launch import probe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config
    from mesobox.launch.program import Program

FORMAT = 1
MAX_PLANS = 64
# The modules whose code shapes a program: any change to them is another key.
_SOURCES = ("cli/run.py", "config.py", "paths.py", "runtime/__init__.py", "launch/specbuild.py",
            "isolation/caps.py", "launch/environ.py", "launch/execute.py", "launch/identity.py",
            "launch/launcher.py", "launch/mountops.py", "launch/mountplan.py", "launch/plancache.py",
            "launch/probe.py", "isolation/seccomp.py", "oci/spec.py")
_pending: tuple[Any, ...] | None = None  # the key of the launch being recorded


def launch_cached(verb: str, args: list[str]) -> None:
    """Execute the saved program of this command line when every recorded answer still
    holds (never returns then); otherwise start recording, for ``save``."""
    global _pending
    if os.getuid() == 0:
        return  # root's launches are supervised (root isolation): never saved, never run from here
    config = probe.config_files()
    key = _key(verb, args, config)
    saved = paths.load_cached(_directory(), _name(key), FORMAT, key)
    if isinstance(saved, dict) and probe.unchanged(saved["journal"]):
        try:
            _run(saved)  # returns only when the saved program cannot run as it is
        except BaseException:
            # A saved program that fails is not trusted twice: the next launch compiles.
            _forget(_name(key))
            raise
    probe.record()
    if probe.recently_changed(config):
        probe.untracked()  # a config file edited seconds ago may change again unseen
    _pending = key


def save(program: Program, config: Config) -> None:
    """Keep the program of an unsupervised launch that recorded every question it asked."""
    global _pending
    key, journal, recipe = _pending, probe.journal, probe.environment
    _pending = None
    probe.untracked()
    if key is None or journal is None or recipe is None or config.debug or not config.plan_cache:
        return
    payload = {"journal": journal, "program": {**program, "env": ()}, "environment": recipe,
               "runtime_dir": config.runtime_dir_str, "linger": config.squashfs_linger}
    directory = _directory()
    if paths.save_cached(directory, _name(key), FORMAT, key, payload):
        _trim(directory)


def _run(saved: dict[str, Any]) -> None:
    """Execute a saved program (never returns), or return when its squashfs mount
    cannot be had as when it was saved: watched, at the same place."""
    from mesobox.launch import environ, execute, reaping

    program: Program = saved["program"]  # a fresh dict: paths.load_cached unmarshalled it
    program["env"] = environ.compose(dict(os.environ), saved["environment"])
    environ.check(program["env"])
    execute.check_ids()  # never setuid: real == effective == saved
    reaping.reap_stale_mounts(saved["runtime_dir"], saved["linger"])
    if program["squashfs"] is not None:
        from mesobox.launch import squashmount

        # As launcher.launch does: the node's shared mount, made before unshare.
        lease = squashmount.attach(saved["runtime_dir"], saved["linger"], program["squashfs"])
        if not lease.watched or lease.mountpoint != program["image_dir"]:
            lease.release()  # someone must supervise it, or it moved: compile afresh
            return
    execute.hold_image(program)
    execute.run(program)


def _key(verb: str, args: list[str], config: tuple[Any, ...]) -> tuple[Any, ...]:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code: list[tuple[int, int] | None] = []
    for rel in _SOURCES:
        try:
            st = os.stat(os.path.join(package, rel))
            code.append((st.st_size, st.st_mtime_ns))
        except OSError:
            code.append(None)
    machine = os.uname()
    # What differs between users, sites and sessions but not between the ranks of a
    # job is part of the key, so that each has its own plan (no two plans evicting
    # each other): the configuration and the working directory.
    return (verb, tuple(args), os.getuid(), os.getgid(), machine.machine, machine.release, tuple(code),
            config, probe.getcwd())


def _name(key: tuple[Any, ...]) -> str:
    # A short name; the whole key is stored in the file and compared (paths.load_cached).
    # The hash of a tuple of ints is the same in every process (only str and bytes
    # hashes are salted), and needs no zlib or hashlib import.
    return f"{hash(tuple(repr(key).encode())) & 0xFFFFFFFF:08x}.plan"


def _directory() -> str:
    return os.path.join(paths.cache_root(os.environ), "plans")


def _forget(name: str) -> None:
    try:  # noqa: SIM105 - contextlib costs an import on the launch path
        os.unlink(os.path.join(_directory(), name))
    except OSError:
        pass


def _trim(directory: str) -> None:
    """Keep the newest MAX_PLANS plans (one per distinct command line)."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".plan")]
        if len(names) <= MAX_PLANS:
            return
        dated = sorted((os.stat(os.path.join(directory, n)).st_mtime_ns, n) for n in names)
        for _, name in dated[:len(names) - MAX_PLANS]:
            os.unlink(os.path.join(directory, name))
    except OSError:
        pass  # another launch trimmed meanwhile
