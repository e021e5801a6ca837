"""Layer application: OCI/Docker layer blobs → one flattened rootfs directory (room: image/layers).

Semantics follow the OCI image-spec ``layer.md``: layers apply base first; ``.wh.NAME``
deletes NAME from *lower* layers; ``.wh..wh..opq`` empties its directory of lower-layer
content, keeping entries of the same layer; other ``.wh..wh.*`` names are reserved and
ignored.  Later entries win (duplicates, file↔directory changes).

Invariants, each against a known family of extractor attacks (docs/security.md, "Known
attacks, by CVE", lists them with the tests that play them): ``..`` and absolute names;
a symlink planted and then written through, in one layer or across layers; a symlink
replacing the rootfs itself; hardlinks to outside targets; chmod/chown through a
symlink; whiteouts naming outside paths; decompression bombs and tar-parser denial of
service:

- Nothing outside ``rootfs`` is ever created, changed or deleted: every path goes through
  :class:`mesobox.image.fstree.Tree` (directory fds, never following a symlink); tarfile is
  used only to parse headers, never to extract (its ``data`` filter is CVE-2025-4517-prone
  on this Python).
- Setuid/setgid bits are dropped unless root pulls with ``keep_setuid``.  When a setuid
  or setgid bit is kept, the rootfs directory itself ends with no group/other access:
  a setuid-root binary in a store other users can traverse would be a root shell for
  any of them (they could exec it directly on the host, outside any container).
- Character and block device nodes are never created, root or not (counted, warned
  about and skipped; the runtime provides /dev): a ``brw-rw-rw- 7,0`` from an image
  would let any local user read and write the host's disk through the store.  FIFOs
  are made, without group/other write like everything else.
- No xattr is ever applied (so no ``security.capability``).
- Nothing the extractor creates is group- or other-writable: ``mode & ~0o022`` for every
  file, FIFO and directory, sticky directories (``/tmp``'s 1777) included.  Rootless, the
  caller owns every file anyway, so nothing it could do is lost; in root-made or shared
  stores a world-writable directory or file of an image would let any other user
  replace a binary the image's users then run.
- Unprivileged, everything belongs to the invoking user; as root, tar uid/gid are kept.
  Unprivileged, the tar's owners are still *recorded* (``apply_layers(owners=…)``: every
  path whose final owner is not 0:0), so a squashfs can store exactly the owners root's
  would (squashfs.py): the same image, the same bytes, whoever flattened it.
  Modes are otherwise the tar's; directory modes and mtimes are set in a final pass,
  deepest first, so a 0555 directory never blocks a later entry.
- The uncompressed tar stream of all layers together is bounded by ``max_bytes``, and
  so is the logical size of their regular files (the sum of the members' sizes, which
  for a sparse member is its expanded size): a 10 KB tar holding a 1 TiB sparse file is
  refused before anything of it is written.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from mesobox.errors import LayerError, StoreError
from mesobox.files import source_date_epoch
from mesobox.image.fstree import O_DIR, Path_, Tree, show
from mesobox.image.tarsafe import (
    CHUNK,
    MAX_NAME_BYTES,
    NEGATIVE,
    CorruptLayer,
    LayerProblem,
    OverBudget,
    TarStream,
    UnsafeMember,
    layer_label,
    open_raw,
    split_name,
)

MAX_ENTRIES = 10_000_000  # per layer; Debian's full archive is < 2 M files
_SUID = stat.S_ISUID | stat.S_ISGID
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH  # never in an extracted image (module docstring)
_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class LayerPolicy:
    keep_setuid: bool = False  # site policy for root pulls; never for users
    max_bytes: int = 64 * 1024**3  # budget of uncompressed bytes for the whole apply_layers call
    unprivileged: bool = True  # True: no chown; False (root): keep the tar's uid/gid
    warn: Callable[[str], None] | None = None  # one-line warnings (skipped devices, dropped setuid…)


@dataclass
class LayerStats:
    entries: int = 0
    bytes_written: int = 0  # file contents written
    skipped_devices: int = 0
    dropped_setuid: int = 0
    kept_setuid: int = 0  # entries left setuid/setgid (root with keep_setuid only)
    neutralised: int = 0  # absolute names made relative, symlinks replaced by directories
    whiteouts: int = 0  # entries deleted by whiteouts and opaque directories
    hardlinks: int = 0
    tar_bytes: int = 0  # uncompressed tar stream read (what max_bytes bounds)
    file_bytes: int = 0  # logical size of regular files, sparse ones expanded (bounded by max_bytes too)

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _DirAttrs:
    mode: int
    mtime_ns: int | None
    owner: tuple[int, int] | None  # None: leave as is
    ino: int


@dataclass
class _Layer:
    """State of the layer being applied."""

    label: str
    stream: TarStream
    file_budget: int  # what this layer's regular files may add up to (logical size)
    stats: LayerStats = field(default_factory=LayerStats)
    created: set[str] = field(default_factory=set)  # paths this layer wrote ("a/b") and their parents
    opaque: list[Path_] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    setuid: list[str] = field(default_factory=list)
    skipped_devices: set[Path_] = field(default_factory=set)
    member: str | None = None


def apply_layers(rootfs: Path, blobs: Sequence[Path], policy: LayerPolicy,
                 owners: dict[Path_, tuple[int, int]] | None = None) -> LayerStats:
    """Apply ``blobs`` (base first) onto ``rootfs``; ``policy.max_bytes`` bounds them all.
    Unprivileged, ``owners`` receives the tar owner of every path not owned by 0:0 (a
    path deleted later may still be listed: check that it exists)."""
    total = LayerStats()
    with _Extractor(rootfs, policy) as ex:
        for blob in blobs:
            total.add(ex.layer(blob, policy.max_bytes - total.tar_bytes, policy.max_bytes - total.file_bytes))
        ex.finish()
        if owners is not None:
            owners.update(ex.owners)
    return total


def apply_layer(rootfs: Path, blob: Path, policy: LayerPolicy, budget: int | None = None) -> LayerStats:
    """Apply one layer blob onto ``rootfs`` (``budget`` defaults to ``policy.max_bytes``)."""
    limit = policy.max_bytes if budget is None else budget
    with _Extractor(rootfs, policy) as ex:
        stats = ex.layer(blob, limit, limit)
        ex.finish()
    return stats


def _umask() -> int:
    """The process umask without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _ns(mtime: float) -> int | None:
    """Tar mtime (int, or float from pax) in ns; None when absurd (nan, inf, beyond 64 bits)."""
    try:
        ns = int(mtime) * 1_000_000_000 if float(mtime).is_integer() else round(mtime * 1e9)
    except (OverflowError, ValueError):
        return None
    return ns if -(2**63) < ns < 2**63 else None


class _Extractor:
    def __init__(self, rootfs: Path, policy: LayerPolicy) -> None:
        self.policy = policy
        self.keep_setuid = policy.keep_setuid and not policy.unprivileged
        self.umask = _umask()
        self.ids = (os.geteuid(), os.getegid())
        self.dirs: dict[Path_, _DirAttrs] = {}
        self.owners: dict[Path_, tuple[int, int]] = {}  # unprivileged: tar owners other than 0:0
        self.kept_setuid = 0
        try:
            root_fd = os.open(rootfs, O_DIR)
        except OSError as err:
            raise StoreError(f"cannot open rootfs directory {rootfs}: {err.strerror}") from None
        self.tree = Tree(root_fd, policy.unprivileged, self._opened_up)

    def __enter__(self) -> _Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tree.close()
        os.close(self.tree.root_fd)

    def _opened_up(self, path: Path_, st: os.stat_result) -> None:
        """A directory from an earlier call had to be made writable: restore it at the end."""
        if path not in self.dirs:
            self.dirs[path] = _DirAttrs(stat.S_IMODE(st.st_mode), st.st_mtime_ns, None, st.st_ino)

    # -- one layer -------------------------------------------------------------------
    def layer(self, blob: Path, budget: int, file_budget: int) -> LayerStats:
        """Apply one blob: its tar stream may be ``budget`` bytes long, its regular files
        ``file_budget`` bytes large (logical sizes)."""
        label = layer_label(blob)
        try:
            raw = open_raw(blob)
        except OSError as err:
            raise LayerError(f"cannot read layer {label}: {err.strerror}") from None
        stream = TarStream(raw, max(budget, 0))
        st = _Layer(label, stream, max(file_budget, 0))
        try:
            self._run(st)
        except OverBudget as err:
            raise LayerError(
                f"layer {label}: {_where(st)}{err}; raise max_image_bytes if the image is legitimately this large",
                hint="set max_image_bytes in mesobox.toml or MESOBOX_MAX_IMAGE_BYTES (bytes)",
            ) from None
        except LayerProblem as err:
            raise LayerError(f"layer {label}: {_where(st)}{err}") from None
        except tarfile.TarError as err:
            if "invalid offset" in str(err):  # tarfile's own negative-size check (CVE-2025-8194 fix)
                raise LayerError(f"layer {label}: {_where(st)}{NEGATIVE}") from None
            raise LayerError(f"layer {label}: not a valid tar archive: {err}") from None
        except OSError as err:
            raise _os_error(err, st) from None
        finally:
            stream.close()
            raw.close()
        st.stats.tar_bytes = stream.pos
        self._warn_summary(st)
        return st.stats

    def _run(self, st: _Layer) -> None:
        tar = tarfile.TarFile(fileobj=st.stream, mode="r")  # type: ignore[arg-type]
        self.tree.on_mkdir = lambda path, made: self._made_dir(path, made, st)
        members: list[tarfile.TarInfo] = tar.members  # type: ignore[attr-defined]
        while True:
            member = tar.next()
            if member is None:
                break
            members.clear()  # tarfile keeps every header otherwise: O(entries) memory
            st.stats.entries += 1
            if st.stats.entries > MAX_ENTRIES:
                raise CorruptLayer(f"more than {MAX_ENTRIES} entries")
            st.member = member.name
            self._member(member, st)
        st.member = None
        if not st.stream.ended_cleanly:
            raise CorruptLayer("truncated or corrupt tar (no end-of-archive marker)")
        st.stream.drain()
        self._apply_opaque(st)

    def _member(self, m: tarfile.TarInfo, st: _Layer) -> None:
        path = split_name(m.name)
        if m.size < 0:
            raise CorruptLayer(NEGATIVE)
        if m.name.startswith("/"):
            st.stats.neutralised += 1
        if any(p.startswith(".wh..wh.") for p in path[:-1]):
            return  # inside AUFS metadata directories (.wh..wh.plnk…), reserved by layer.md
        if path and path[-1].startswith(".wh."):
            self._whiteout(path, st)
            return
        if not path:
            if not m.isdir():
                raise UnsafeMember("would replace the rootfs directory itself")
            self.dirs[()] = self._dir_attrs(m, st, (), os.fstat(self.tree.root_fd).st_ino)
            self._note_owner((), m)
            return
        if m.isdir():
            self._dir(path, m, st)
        elif m.isreg():
            self._count_file(m, st)
            self._file(path, m, st)
        elif m.issym():
            self._symlink(path, m, st)
        elif m.islnk():
            self._hardlink(path, m, st)
        elif m.isfifo() or m.ischr() or m.isblk():
            self._special(path, m, st)
        else:
            self._warn(f"layer {st.label}: skipped {show(path)!r} of unknown tar type {m.type!r}")
            return
        _mark(st.created, path)

    def _made_dir(self, path: Path_, made: os.stat_result, st: _Layer) -> None:
        """A new directory at ``path``: attributes recorded for an earlier one there are
        stale (its inode number may even be reused by this one).  Until the layer's own
        entry for it (if any) says otherwise, it is dated SOURCE_DATE_EPOCH (else 0),
        not now: the same layers give the same tree, and the same squashfs bytes."""
        self.dirs[path] = _DirAttrs(stat.S_IMODE(made.st_mode), source_date_epoch() * 1_000_000_000, None,
                                    made.st_ino)
        self.owners.pop(path, None)  # root's mkdir: 0:0
        _mark(st.created, path)

    # -- entry kinds -----------------------------------------------------------------
    def _count_file(self, m: tarfile.TarInfo, st: _Layer) -> None:
        """Charge a regular file's logical size (a sparse member's expanded size) to the
        budget before any of it is written."""
        st.stats.file_bytes += m.size
        if st.stats.file_bytes > st.file_budget:
            raise OverBudget(st.file_budget, "total size of the files exceeds the limit of {limit} bytes "
                                             "(sparse files count at their full size)")

    def _mode(self, m: tarfile.TarInfo, st: _Layer, path: Path_) -> int:
        mode = m.mode & 0o7777 & ~_GROUP_OTHER_WRITE
        if mode & _SUID:
            if self.keep_setuid:
                st.stats.kept_setuid += 1
                self.kept_setuid += 1
            else:
                mode &= ~_SUID
                st.stats.dropped_setuid += 1
                st.setuid.append(show(path))
        return mode

    def _owner(self, m: tarfile.TarInfo) -> tuple[int, int] | None:
        if self.policy.unprivileged or (m.uid, m.gid) == self.ids:
            return None
        return (m.uid, m.gid)

    def _note_owner(self, path: Path_, m: tarfile.TarInfo) -> None:
        """Unprivileged: remember the owner root would have given ``path`` (ids chown(2)
        could not take are left out, as root's flatten would fail on them)."""
        if not self.policy.unprivileged:
            return
        if (m.uid, m.gid) == (0, 0) or not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
            self.owners.pop(path, None)
        else:
            self.owners[path] = (m.uid, m.gid)

    def _dir_attrs(self, m: tarfile.TarInfo, st: _Layer, path: Path_, ino: int) -> _DirAttrs:
        return _DirAttrs(self._mode(m, st, path), _ns(m.mtime), self._owner(m), ino)

    def _create(self, parent: int, path: Path_, op: Callable[[], int | None]) -> int | None:
        """Create entry ``path`` with ``op``; whatever was there before is removed first."""
        try:
            return self.tree.retry(parent, path[:-1], op)
        except FileExistsError:
            self.tree.remove(parent, path)
            return self.tree.retry(parent, path[:-1], op)

    def _dir(self, path: Path_, m: tarfile.TarInfo, st: _Layer) -> None:
        parent = self._parent(path)
        try:
            existing = os.stat(path[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            # A directory entry for a path that is a symlink (or file): the directory
            # replaces it; its mode is never applied through the link (CVE-2021-32760).
            if stat.S_ISLNK(existing.st_mode):
                st.stats.neutralised += 1
            self.tree.remove(parent, path)
        fd = self.tree.dir_fd(path, create=True)
        assert fd is not None
        self.dirs[path] = self._dir_attrs(m, st, path, os.fstat(fd).st_ino)
        self._note_owner(path, m)

    def _parent(self, path: Path_) -> int:
        fd = self.tree.dir_fd(path[:-1], create=True)
        assert fd is not None
        return fd

    def _file(self, path: Path_, m: tarfile.TarInfo, st: _Layer) -> None:
        mode = self._mode(m, st, path)
        parent = self._parent(path)
        name = path[-1]
        fd = self._create(parent, path, lambda: os.open(name, _EXCL, mode & 0o777, dir_fd=parent))
        assert fd is not None
        try:
            st.stats.bytes_written += self._copy(fd, m, st.stream)
            self._note_owner(path, m)
            owner = self._owner(m)
            if owner is not None:
                os.fchown(fd, *owner)  # before chmod: chown clears setuid bits (chown(2))
            if owner is not None or mode != mode & 0o777 & ~self.umask:
                os.fchmod(fd, mode)
            _utime(lambda ns: os.utime(fd, ns=ns), _ns(m.mtime))
        finally:
            os.close(fd)

    def _copy(self, fd: int, m: tarfile.TarInfo, stream: TarStream) -> int:
        stream.seek(m.offset_data)
        sparse: list[tuple[int, int]] | None = m.sparse  # type: ignore[assignment]
        if sparse is None:
            return _copy_range(fd, stream, 0, m.size)
        written = 0
        for offset, length in sparse:
            if offset < 0 or length < 0 or offset + length > m.size:
                raise CorruptLayer("sparse map points outside the file")
            written += _copy_range(fd, stream, offset, length)
        os.ftruncate(fd, m.size)  # holes stay holes (lseek(2) SEEK_HOLE friendly)
        return written

    def _symlink(self, path: Path_, m: tarfile.TarInfo, st: _Layer) -> None:
        # The target is only stored, never followed by us: any text is fine ("../lib", "/etc").
        if "\x00" in m.linkname or len(m.linkname.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise UnsafeMember("symlink target is too long or contains a NUL byte")
        parent = self._parent(path)
        name = path[-1]
        self._create(parent, path, lambda: os.symlink(m.linkname, name, dir_fd=parent))
        self._note_owner(path, m)
        owner = self._owner(m)
        if owner is not None:
            os.chown(name, *owner, dir_fd=parent, follow_symlinks=False)
        _utime(lambda ns: os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False), _ns(m.mtime))

    def _hardlink(self, path: Path_, m: tarfile.TarInfo, st: _Layer) -> None:
        target = split_name(m.linkname, "hardlink target")
        if not target:
            raise UnsafeMember("hardlink to the rootfs directory")
        if target == path:
            return
        if target in st.skipped_devices:
            st.skipped_devices.add(path)
            return
        tparent = self.tree.dir_fd(target[:-1], create=False)
        if tparent is None:
            raise UnsafeMember(f"hardlink target {show(target)!r} does not exist in the rootfs")
        src = os.dup(tparent)  # the stack may close it while resolving the link's own parent
        try:
            parent = self._parent(path)
            name = path[-1]

            def link() -> None:
                os.link(target[-1], name, src_dir_fd=src, dst_dir_fd=parent, follow_symlinks=False)

            try:
                self._create(parent, path, link)
            except FileNotFoundError:
                raise UnsafeMember(f"hardlink target {show(target)!r} does not exist in the rootfs") from None
            except PermissionError:
                if not stat.S_ISDIR(os.stat(target[-1], dir_fd=src, follow_symlinks=False).st_mode):
                    raise
                raise UnsafeMember(f"hardlink target {show(target)!r} is a directory") from None
        finally:
            os.close(src)
        shared = self.owners.get(target)  # one inode: the target's owner
        if shared is None:
            self.owners.pop(path, None)
        else:
            self.owners[path] = shared
        st.stats.hardlinks += 1

    def _special(self, path: Path_, m: tarfile.TarInfo, st: _Layer) -> None:
        if not m.isfifo():
            self._skip_device(path, st)  # never a device node, root or not (module docstring)
            return
        mode = self._mode(m, st, path)
        parent = self._parent(path)
        name = path[-1]
        self._create(parent, path, lambda: os.mkfifo(name, mode & 0o777, dir_fd=parent))
        self._note_owner(path, m)
        owner = self._owner(m)
        if owner is not None:
            os.chown(name, *owner, dir_fd=parent, follow_symlinks=False)
        if owner is not None or mode != mode & 0o777 & ~self.umask:
            os.chmod(name, mode, dir_fd=parent)  # just made by mkfifo: not a symlink
        _utime(lambda ns: os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False), _ns(m.mtime))

    def _skip_device(self, path: Path_, st: _Layer) -> None:
        st.stats.skipped_devices += 1
        st.devices.append(show(path))
        st.skipped_devices.add(path)

    # -- whiteouts -------------------------------------------------------------------
    def _whiteout(self, path: Path_, st: _Layer) -> None:
        base = path[-1]
        if base == ".wh..wh..opq":
            if self.tree.dir_fd(path[:-1], create=False) is not None:
                st.opaque.append(path[:-1])
            return
        if base.startswith(".wh..wh."):
            return  # reserved for AUFS metadata (layer.md): nothing to delete
        victim = base[len(".wh.") :]
        if victim in ("", ".", ".."):
            raise UnsafeMember(f"whiteout {base!r} names no entry of its directory")
        target = (*path[:-1], victim)
        if "/".join(target) in st.created:
            return  # whiteouts hide lower layers only, never entries of their own layer
        parent = self.tree.dir_fd(path[:-1], create=False)
        if parent is not None and self.tree.remove(parent, target):
            st.stats.whiteouts += 1

    def _apply_opaque(self, st: _Layer) -> None:
        if not st.opaque:
            return
        for path in sorted(set(st.opaque)):
            self._prune(path, st.created, st)

    def _prune(self, path: Path_, keep: set[str], st: _Layer) -> None:
        fd = self.tree.dir_fd(path, create=False)
        if fd is None:
            return
        for name, is_dir in self.tree.listdir(fd):
            child = (*path, name)
            if "/".join(child) not in keep:
                self.tree.remove(fd, child)
                st.stats.whiteouts += 1
            elif is_dir:
                self._prune(child, keep, st)
                fd = self.tree.dir_fd(path, create=False)
                assert fd is not None

    # -- final pass ------------------------------------------------------------------
    def finish(self) -> None:
        """Directory owners, modes and mtimes, deepest first (a 0555 parent comes last)."""
        try:
            for path in sorted(self.dirs, key=lambda p: (-len(p), p)):
                attrs = self.dirs[path]
                try:
                    fd = self.tree.dir_fd(path, create=False)
                except UnsafeMember:
                    continue  # replaced by a symlink later: it is not our directory any more
                if fd is None or os.fstat(fd).st_ino != attrs.ino:
                    continue
                if attrs.owner is not None:
                    os.fchown(fd, *attrs.owner)
                os.fchmod(fd, attrs.mode & ~_GROUP_OTHER_WRITE)
                if attrs.mtime_ns is not None:
                    os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))
            if self.kept_setuid:
                self._seal_rootfs()
        except OSError as err:
            raise _os_error(err, None) from None
        finally:
            self.tree.close()

    def _seal_rootfs(self) -> None:
        """A setuid/setgid bit was kept: nobody but the owner may reach into the rootfs."""
        mode = stat.S_IMODE(os.fstat(self.tree.root_fd).st_mode)
        os.fchmod(self.tree.root_fd, mode & ~(stat.S_IRWXG | stat.S_IRWXO))

    def _warn(self, message: str) -> None:
        if self.policy.warn is not None:
            self.policy.warn(message)

    def _warn_summary(self, st: _Layer) -> None:
        if st.devices:
            self._warn(
                f"layer {st.label}: skipped {len(st.devices)} device node(s) ({_few(st.devices)}): "
                "mesobox never creates them in an image; the runtime provides /dev"
            )
        if st.setuid:
            self._warn(f"layer {st.label}: dropped setuid/setgid bits of {len(st.setuid)} entries ({_few(st.setuid)})")


def _mark(created: set[str], path: Path_) -> None:
    """Record ``path`` and its ancestors as written by this layer (whiteouts spare them)."""
    created.add("/".join(path))
    for i in range(len(path) - 1, 0, -1):
        key = "/".join(path[:i])
        if key in created:
            break
        created.add(key)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _copy_range(fd: int, stream: TarStream, offset: int, length: int) -> int:
    done = stream.copy_to(fd, offset, length) if length else 0
    while done < length:
        data = stream.read_data(min(CHUNK, length - done))
        if not data:
            raise CorruptLayer("truncated file data")
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset + done)
            view = view[n:]
            done += n
    return done


def _utime(op: Callable[[tuple[int, int]], None], ns: int | None) -> None:
    """Set atime = mtime = the tar's mtime; an out-of-range mtime is not worth failing for."""
    if ns is None:
        return
    try:
        op((ns, ns))
    except (OverflowError, ValueError):
        pass
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise


def _where(st: _Layer) -> str:
    return "" if st.member is None else f"member {st.member!r}: "


def _os_error(err: OSError, st: _Layer | None) -> Exception:
    where = "" if st is None else f"layer {st.label}: {_where(st)}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"{where}no space left while unpacking",
            hint="free space (`mesobox prune`), or point MESOBOX_STORE at a larger filesystem",
        )
    return LayerError(f"{where}{err.strerror or err}")
