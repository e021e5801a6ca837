"""Plan cache: a command line's launch program, run again while nothing it depends on
has changed.

Every rank of an MPI job starts the same container with the same command line, and
compiling the launch program — parsing options and config, building the spec,
planning the mounts, writing passwd/group, reading the seccomp filter — costs more
imports and work than running it.  So a launch records the questions it asks the host
while compiling (probe.py), and an unsupervised launch saves program, questions and
answers under a key: the verb and its arguments, the caller's ids, the machine and
kernel, mesobox itself (``_package``), the configuration (probe.config_files: its files
and the MESOBOX_*/XDG_* variables) and the working directory.  The next launch with
that key asks the same questions again (a few dozen stat(2)s and lookups) and, if every
answer is the same, executes the saved program with the environment composed anew
from its own (environ.compose) — importing neither the spec builder, the planner, the
config parser nor libseccomp's compiler.  A changed answer (a bind source gone, an
image whose /etc/passwd changed, a home directory moved) only means compiling again,
and saving the new program.

mesobox itself is its version, the Python running it, and every one of its files,
whatever it holds: a saved program is made by their code.  An installed copy is known
by the RECORD file that pip writes beside it (``mesobox-VERSION.dist-info/RECORD``:
every file with its hash) at each install, upgrade or reinstall — two stat(2)s per
launch, the RECORD's and the package directory's (the RECORD must be its owner's).  A
source tree (PYTHONPATH, ``pip install -e``) has no RECORD: there the size, mtime and
ctime of each ``*.py`` file are the key (≈0.25 ms for 70 files), so that an edit is
seen even when made in place, which no directory mtime shows.  A file changed in the
last seconds makes the launch record nothing (probe.settled).  An installed copy
edited by hand, behind pip's back, keeps its RECORD: remove the plans then.

A squashfs image is recorded by its file's identity (device, inode, size, mtime,
ctime: the same file is the same tree), and a saved program first attaches to the
node's shared mount of it, as any launch does (squashmount.py).

A stored image is recorded by the identity of the record file that names it in each
store searched (specbuild._note_record) and by its rootfs or squashfs file.

Not recorded (each such launch compiles its own program), as probe.py's rules decide:
a launch that reads a file changed in the last seconds, and one that runs a host
program or opens a connection (--mpi host; a docker:// reference pulled by that
launch: the next one is recorded).  Nor --debug, nor launches that need a supervisor
(real root, cgroup limits, slirp, sub-id maps — --fakeroot where the caller has a
range —, squashfs_linger = 0).  ``plan_cache = false`` (or MESOBOX_PLAN_CACHE=0)
turns it off.

Plans live in ``<runtime dir>/plans`` (paths.cache_root), private to the user
(paths.py says why a user who edits their own plans gains nothing), at most
``MAX_PLANS`` of them: the oldest go first.
"""

from __future__ import annotations

import os
import sys

from mesobox import paths
from mesobox.launch import probe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config
    from mesobox.launch.program import Program

FORMAT = 2
MAX_PLANS = 64
_pending: tuple[tuple[Any, ...], str] | None = None  # key and name of the launch being recorded


def launch_cached(verb: str, args: list[str]) -> None:
    """Execute the saved program of this command line when every recorded answer still
    holds (never returns then); otherwise start recording, for ``save``."""
    global _pending
    if os.getuid() == 0:
        return  # root's launches are supervised (root isolation): never saved, never run from here
    config = probe.config_files()
    code = _package()
    if code is None:
        return  # mesobox's own files cannot be listed: no key can stand for them
    key = _key(verb, args, config, code)
    name = _name(key)
    saved = paths.load_cached(_directory(), name, FORMAT, key)
    if isinstance(saved, dict) and probe.unchanged(saved["journal"]):
        try:
            _run(saved)  # returns only when the saved program cannot run as it is
        except BaseException:
            # A saved program that fails is not trusted twice: the next launch compiles.
            _forget(name)
            raise
    # The files the key stands for must hold still for the key to prove anything.
    probe.record((*config[1], *code[3]))
    _pending = key, name


def save(program: Program, config: Config) -> None:
    """Keep the program of an unsupervised launch that recorded every question it asked."""
    global _pending
    pending, _pending = _pending, None
    journal, recipe = probe.finish()
    if pending is None or journal is None or recipe is None or config.debug or not config.plan_cache:
        return
    key, name = pending
    payload = {"journal": journal, "program": {**program, "env": ()}, "environment": recipe,
               "runtime_dir": config.runtime_dir_str, "linger": config.squashfs_linger}
    directory = _directory()
    if paths.save_cached(directory, name, FORMAT, key, payload):
        _trim(directory)


def _run(saved: dict[str, Any]) -> None:
    """Execute a saved program (never returns), or return when its squashfs mount
    cannot be had as when it was saved: watched, at the same place."""
    from mesobox.launch import environ, execute

    program: Program = saved["program"]  # a fresh dict: paths.load_cached unmarshalled it
    program["env"] = environ.compose(dict(os.environ), saved["environment"])
    environ.check(program["env"])
    execute.check_ids()  # never setuid: real == effective == saved
    execute.reap_stale_mounts(saved["runtime_dir"], saved["linger"])
    if program["squashfs"] is not None:
        from mesobox.launch import squashmount

        # As launcher.launch does: the node's shared mount, made before unshare.
        lease = squashmount.attach(saved["runtime_dir"], saved["linger"], program["squashfs"])
        if not lease.watched or lease.mountpoint != program["image_dir"]:
            lease.release()  # someone must supervise it, or it moved: compile afresh
            return
    execute.hold_image(program)
    execute.run(program)


def _key(verb: str, args: list[str], config: tuple[Any, ...], code: tuple[Any, ...]) -> tuple[Any, ...]:
    machine = os.uname()
    # What differs between users, sites and sessions but not between the ranks of a
    # job is part of the key, so that each has its own plan (no two plans evicting
    # each other): the configuration and the working directory.
    return (verb, tuple(args), os.getuid(), os.getgid(), machine.machine, machine.release, code, config,
            probe.getcwd())


def _package() -> tuple[Any, ...] | None:
    """mesobox itself (module docstring): (version, Python, its directory, its files);
    None when its files cannot be listed."""
    from mesobox import __version__

    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = _files(top, __version__)
    return None if files is None else (__version__, sys.hexversion, top, files)


def _files(top: str, version: str) -> tuple[tuple[Any, ...], ...] | None:
    """The RECORD pip wrote beside the package ``top``, else every module file of the
    source tree; each entry ends with mtime and ctime (probe.record).  A RECORD that is
    not the package's owner's is not pip's: another user may create names in a shared
    (sticky) directory that holds a source tree, and freeze its key so."""
    try:
        st = os.stat(os.path.join(os.path.dirname(top), f"mesobox-{version}.dist-info", "RECORD"))
        if st.st_uid == os.stat(top).st_uid:
            return (("RECORD", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),)
    except OSError:
        pass  # not installed by pip: a source tree
    try:
        return _modules(top)
    except OSError:
        return None


def _modules(top: str) -> tuple[tuple[str, int, int, int], ...]:
    """(path below ``top``, size, mtime, ctime) of every ``*.py`` file of a source tree."""
    found = []
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(top, rel)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # no module's name (an editor's lock or swap file)
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    found.append((rel + entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    todo.append(rel + entry.name + "/")
    found.sort()
    return tuple(found)


def _name(key: tuple[Any, ...]) -> str:
    # A short name; the whole key is stored in the file and compared (paths.load_cached).
    # The hash of a tuple of ints is the same in every process (only str and bytes
    # hashes are salted), and needs no zlib or hashlib import.  Module files count by
    # their numbers here (their names would make the text to hash ten times longer).
    code = key[6]
    numbers = hash(tuple(n for entry in code[3] for n in entry[1:]))
    short = (*key[:6], code[:3], len(code[3]), numbers, *key[7:])
    return f"{hash(tuple(repr(short).encode())) & 0xFFFFFFFF:08x}.plan"


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
