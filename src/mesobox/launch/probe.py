"""Probe room: the questions a launch asks the host, answered — and written down while
a launch program is being recorded (plancache.py).

A launch program (execute.py) is a function of the command line and of the answers to
a few questions about the host: is this bind source a directory, what is its real
path, does the image have /home, what does its /etc/passwd say, who is the caller,
what is the working directory, which config files are there.  The spec builder
(specbuild.py), the mount planner (mountplan.py) and the launcher ask them through this
module only.  While ``journal`` is a list, each question is appended to it with its answer;
plancache.py stores the journal beside the program and runs the program again only
when every question gets the same answer again (``unchanged``).

What cannot be recorded is decided here, by two rules, and nowhere else; such a launch
records nothing (``untracked``) and the next one compiles its own program:

- A file whose identity (device, inode, size, mtime, ctime) stands for its content is
  trusted only once it is ``settled``: not written since its last status change (its
  mtime older than its ctime: a later write would move the mtime to at least that
  ctime), or changed long enough ago that no write can share its timestamp
  (paths.racy, git's "racy" rule).  This holds for the files a question reads (an
  image's /etc/passwd, a squashfs file, a store record, a seccomp profile) and for
  those a plan's key stands for (config files, mesobox's own modules: ``record``).
  The image store writes every file so (image/store.py, ``Store.settle``): a launch
  right after a pull is recorded.
- A compile that runs a host program or opens a connection (``--mpi host`` runs
  ompi_info and ldd; a ``docker://`` reference is pulled from its registry): no
  question can ask again what came back.  An audit hook sees them (``_watch``), so no
  call site has to remember.

The environment's *values* are not a question: the container's environment is merged
anew at every launch from the recipe ``note_environment`` keeps (environ.compose).
"""

from __future__ import annotations

import os

from mesobox import paths
from mesobox.paths import racy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, TypeVar

    T = TypeVar("T")
    Entry = tuple[str, tuple[Any, ...], Any]  # (question, its arguments, the answer)

journal: list[Entry] | None = None  # recording when a list
_asked: set[tuple[str, tuple[Any, ...]]] = set()
_pinned: set[str] = set()  # image roots whose content a recorded file identity fixes
environment: tuple[Any, ...] | None = None  # environ.compose's recipe of this launch
_watching = False  # _audit is installed (once per process)
# Audit events (sys.audit) of a program started or a connection opened while compiling.
# Not os.posix_spawn nor os.fork: squashmount.py mounts with them, an action (not a
# read) that a saved program repeats at each launch (squashmount.attach).
_OUTSIDE = frozenset(("subprocess.Popen", "os.system", "socket.connect"))


def _note(question: str, args: tuple[Any, ...], answer: T) -> T:
    if question.startswith("image_") and args[0] in _pinned:
        return answer  # a squashfs mount: its file's identity answers for it (pin)
    if journal is not None and (question, args) not in _asked:
        _asked.add((question, args))  # the same question twice is asked again once
        journal.append((question, args, answer))
    return answer


def record(key_files: Iterable[tuple[Any, ...] | None] = ()) -> None:
    """Start writing the answers down (plancache.launch_cached), unless a file the
    plan's key stands for is not ``settled``: each entry of ``key_files`` ends with the
    file's mtime and ctime in ns (None: no such file)."""
    global journal, environment
    journal, environment = [], None
    _asked.clear()
    _pinned.clear()
    _watch()
    if not all(entry is None or settled(entry[-2], entry[-1]) for entry in key_files):
        untracked()


def finish() -> tuple[list[Entry] | None, tuple[Any, ...] | None]:
    """Stop recording: (journal, environment recipe) of this launch; the journal is
    None when the launch read something that cannot be recorded."""
    global journal
    written, journal = journal, None
    return written, environment


def pin(root: str) -> None:
    """``root`` is the mount of a squashfs image whose file_identity is recorded: the
    same file is the same tree, so questions about the tree are not written down (at
    the next launch the mount may not even be there yet to ask them)."""
    _pinned.add(root)


def untracked() -> None:
    """This launch read something no question can ask again: record nothing (the rules
    of the module docstring call it)."""
    global journal
    journal = None


def settled(mtime_ns: int, ctime_ns: int) -> bool:
    """Whether a file with these times cannot change without changing them: any write
    sets mtime and ctime to now, so a file whose mtime is older than its ctime was not
    written since its last status change, and a later write must move its mtime;
    otherwise only time settles it (paths.racy)."""
    return mtime_ns < ctime_ns or not racy(mtime_ns)


def _watch() -> None:
    """Install ``_audit`` once (an audit hook stays for the life of the process; while
    nothing is recorded it costs one comparison per audited event)."""
    global _watching
    if not _watching:
        import sys

        sys.addaudithook(_audit)
        _watching = True


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if journal is not None and event in _OUTSIDE:
        untracked()  # a program's output or a peer's answer: no question can ask it again


def note_environment(recipe: tuple[Any, ...]) -> None:
    global environment
    environment = recipe


# --- the questions ---------------------------------------------------------------------


def isdir(path: str) -> bool:
    return _note("isdir", (path,), os.path.isdir(path))


def isfile(path: str) -> bool:
    return _note("isfile", (path,), os.path.isfile(path))


def exists(path: str) -> bool:
    return _note("exists", (path,), os.path.exists(path))


def node_type(path: str) -> str:
    """What ``path`` is, symlinks followed: "c", "b" (character, block device), "d", "f",
    "other" (a FIFO, a socket), or "" when stat(2) fails."""
    return _note("node_type", (path,), _node_type(path))


def lexists(path: str) -> bool:
    return _note("lexists", (path,), os.path.lexists(path))


def stat_error(path: str) -> str | None:
    """Why stat(2) of ``path`` fails ("ENOENT", "EACCES", …), None when it works: a
    path that exists but cannot be reached is not "missing" (docs/running.md)."""
    return _note("stat_error", (path,), _stat_error(path))


def access(path: str, mode: int) -> bool:
    return _note("access", (path, mode), os.access(path, mode))


def realpath(path: str) -> str:
    return _note("realpath", (path,), os.path.realpath(path))


def abspath(path: str) -> str:
    return _note("abspath", (path,), os.path.abspath(path))


def getcwd() -> str:
    """The working directory, "" when it is gone."""
    try:
        here = os.getcwd()
    except OSError:
        here = ""
    return _note("getcwd", (), here)


def file_identity(path: str) -> tuple[int, ...] | None:
    """Device, inode, size, mtime and ctime of the regular file at ``path`` (symlinks
    followed), None for anything else: asked before a host file is read whole, it
    stands for the content (the same identity is the same content once the file is
    ``settled``; until then the launch records nothing)."""
    try:
        identity = _identity(os.stat(path))
    except OSError:
        identity = None
    if identity is not None and not settled(identity[3], identity[4]):
        untracked()
    return _note("file_identity", (path,), identity)


def environ(name: str) -> str | None:
    return _note("environ", (name,), os.environ.get(name))


def squashfs_trailer(path: str) -> dict[str, Any] | None:
    """The image config a portable squashfs file carries after its filesystem, checked
    (image/portable.py), None for a plain squashfs.  The question written down is the
    file's identity, asked before the tail is read: the same identity is the same
    trailer, and a file replaced in between fails that question at the next launch."""
    file_identity(path)
    from mesobox.image.portable import read_file

    return read_file(path)[0]


def listdir(path: str) -> tuple[str, ...]:
    """The names in directory ``path``, sorted; () when it cannot be listed (absent,
    not a directory, not readable): the CDI spec directories (cdi.py)."""
    return _note("listdir", (path,), _listdir(path))


def image_exists(root: str, rel: str) -> bool:
    """Whether ``root/rel`` exists with no symlink on the way (a symlink counts as
    existing: beneath.open_beneath will refuse it with a clear message)."""
    return _note("image_exists", (root, rel), _image_exists(root, rel))


def image_text(root: str, rel: str) -> str:
    """Text of ``root/rel`` read without following symlinks; "" when absent or a link
    (an image's /etc/passwd -> /etc/shadow must not make mesobox read the host's).
    The question written down is the file's identity, not its text: the same device,
    inode, size, mtime and ctime is the same text once the file is ``settled`` (until
    then the launch records nothing)."""
    text, identity = _image_text(root, rel)
    if identity is not None and not settled(identity[3], identity[4]) and root not in _pinned:
        untracked()
    _note("image_file", (root, rel), identity)
    return text


def host_names(uid: int, gid: int) -> tuple[str, str, str, str]:
    """(user name, group name, home, shell) from the host, with fallbacks for batch
    nodes whose NSS (LDAP/SSSD) does not answer."""
    return _note("host_names", (uid, gid), _host_names(uid, gid))


def env_file(path: str) -> tuple[tuple[str, str], ...]:
    """The KEY=VALUE pairs of an --env-file (environ.read_env_file)."""
    from mesobox.launch.environ import read_env_file

    return _note("env_file", (path,), tuple(read_env_file(path)))


def subids() -> None:
    """What ``--fakeroot``'s id maps are made of (identity.id_maps): whether newuidmap
    and newgidmap may be run, and /etc/subuid and /etc/subgid, by identity."""
    for tool in ("newuidmap", "newgidmap"):
        access(f"/usr/bin/{tool}", os.X_OK)
    for path in ("/etc/subuid", "/etc/subgid"):
        file_identity(path)


def overlay(path: str) -> None:
    """What ``--overlay PATH`` is, as specbuild checks it: an image file (by identity), a
    directory, or a place in one (the directory is made at launch)."""
    file_identity(path)
    isdir(path)
    isdir(os.path.dirname(abspath(path)))


def config_files() -> tuple[Any, ...]:
    """What the Config of this launch is made of: every MESOBOX_* and XDG_* variable,
    HOME and USER, the identity of the site and user files, the default runtime dir.
    Part of a saved program's key (plancache.py) rather than a question."""
    env = os.environ
    names = tuple(sorted((k, v) for k, v in env.items() if k.startswith(("MESOBOX_", "XDG_"))
                         or k in ("HOME", "USER")))
    files = tuple(_signature(path) for path in (paths.site_config(env), paths.user_config(env)))
    return (names, files, paths.default_runtime_dir(env))


def unchanged(entries: list[Entry]) -> bool:
    """Whether every recorded question gets the same answer now."""
    from mesobox.launch import syscalls as sc

    try:
        for question, args, answer in entries:
            if question.startswith("image_"):
                sc.hold_root(args[0])  # one open(2) of the image for all its questions
            if _ASK[question](*args) != answer:
                return False
    except Exception:  # a question that fails now (an env file gone…): compile again
        return False
    finally:
        sc.release_roots()
    return True


# --- answers ----------------------------------------------------------------------------


def _node_type(path: str) -> str:
    try:
        fmt = os.stat(path).st_mode & 0o170000
    except OSError:
        return ""
    return {0o020000: "c", 0o060000: "b", 0o040000: "d", 0o100000: "f"}.get(fmt, "other")


def _image_exists(root: str, rel: str) -> bool:
    from mesobox.launch.syscalls import open_beneath

    try:
        os.close(open_beneath(root, rel))
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return True
    except Exception as err:
        if not _refused(err) or isinstance(err, OSError):
            raise
        return True  # a symlink on the way: open_beneath refuses it with its own message
    return True


def _stat_error(path: str) -> str | None:
    try:
        os.stat(path)
    except OSError as err:
        import errno

        return errno.errorcode.get(err.errno or 0, "EIO")
    return None


def _refused(err: Exception) -> bool:
    """An OSError or open_beneath's LaunchError (mesobox.errors is imported only then)."""
    from mesobox.errors import LaunchError

    return isinstance(err, OSError | LaunchError)


def _image_text(root: str, rel: str, limit: int = 1 << 20) -> tuple[str, tuple[int, ...] | None]:
    """(text, identity) of a regular file beneath root; ("", None) for anything else."""
    from mesobox.launch.syscalls import open_beneath

    try:
        fd = open_beneath(root, rel)
    except Exception as err:
        if not _refused(err):
            raise
        return "", None
    try:
        identity = _identity(os.fstat(fd))
        if identity is None:
            return "", None
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "", None
    finally:
        os.close(fd)
    try:
        return os.read(rfd, limit).decode("utf-8", "replace"), identity
    finally:
        os.close(rfd)


def _image_file(root: str, rel: str) -> tuple[int, ...] | None:
    from mesobox.launch.syscalls import open_beneath

    try:
        fd = open_beneath(root, rel)
    except Exception as err:
        if not _refused(err):
            raise
        return None
    try:
        return _identity(os.fstat(fd))
    finally:
        os.close(fd)


def _file_identity(path: str) -> tuple[int, ...] | None:
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def _listdir(path: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(path)))
    except OSError:
        return ()


def _identity(st: os.stat_result) -> tuple[int, ...] | None:
    if st.st_mode & 0o170000 != 0o100000:  # not a regular file
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _host_names(uid: int, gid: int) -> tuple[str, str, str, str]:
    found = _files_names(uid, gid)
    if found is not None:
        return found
    import pwd

    try:
        entry = pwd.getpwuid(uid)
        name, home, shell = entry.pw_name, entry.pw_dir, entry.pw_shell
    except KeyError:
        name = os.environ.get("USER") or f"user{uid}"
        home, shell = os.environ.get("HOME", "/"), "/bin/sh"
    import grp

    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = f"group{gid}"
    return name, group, home, shell


def _files_names(uid: int, gid: int, etc: str = "/etc") -> tuple[str, str, str, str] | None:
    """What NSS answers when nsswitch.conf(5) puts "files" first for passwd and group
    and both entries are in /etc/passwd and /etc/group: those lines (glibc stops at the
    first source that finds an entry).  Read directly, it saves ≈0.4 ms of loading
    pwd, grp and the NSS modules on every launch.  None otherwise: ask NSS."""
    try:
        first = {}
        for line in _read(f"{etc}/nsswitch.conf").splitlines():
            database, sep, sources = line.partition("#")[0].partition(":")
            if sep and sources.split():
                first[database.strip()] = sources.split()[0]
        if first.get("passwd") != "files" or first.get("group") != "files":
            return None
        user = _entry(_read(f"{etc}/passwd"), str(uid))
        group = _entry(_read(f"{etc}/group"), str(gid))
    except OSError:
        return None
    if user is None or len(user) < 7 or group is None:
        return None
    return user[0], group[0], user[5], user[6]


def _entry(text: str, number: str) -> list[str] | None:
    """The first line of a passwd(5)/group(5) file whose third field is ``number``."""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[2] == number and not line.startswith(("+", "-")):
            return fields
    return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _signature(path: str) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)


_ASK: dict[str, Callable[..., Any]] = {
    "isdir": os.path.isdir, "isfile": os.path.isfile, "exists": os.path.exists, "lexists": os.path.lexists,
    "realpath": os.path.realpath, "abspath": os.path.abspath, "getcwd": getcwd,
    "environ": os.environ.get, "file_identity": _file_identity, "image_exists": _image_exists,
    "image_file": _image_file, "host_names": _host_names, "env_file": env_file,
    "stat_error": _stat_error, "access": os.access, "node_type": _node_type, "listdir": _listdir,
}
