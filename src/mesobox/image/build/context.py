"""The build context: a directory, less what ``.dockerignore`` excludes.

.dockerignore (Docker's rules): one pattern a line, ``#`` comments, blank lines
skipped; a pattern is cleaned (``./a/../b`` is ``b``, a leading ``/`` dropped);
``*`` and ``?`` never match ``/``, ``**`` matches any number of directories, ``[…]``
classes and ``\\`` escapes as in Go's filepath.Match; ``!`` re-includes.  A path is
excluded when the last pattern that matches it, or one of its parent directories, is not
a ``!`` pattern.

COPY/ADD sources are paths below the context (``..`` may not leave it); a source with
``*``, ``?`` or ``[`` is a pattern matched against the context's paths.  A source that
is a symlink is followed, inside the context only; symlinks within a copied directory
stay symlinks.  ``digest`` hashes what a COPY would copy (names, types, modes, content,
link targets; not times), which is the cache key's input.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat

from mesobox.errors import UsageError

GLOB_CHARS = "*?["
MAX_LINKS = 40


def pattern_regex(pattern: str, double_star: bool = True) -> re.Pattern[str]:
    """A cleaned pattern as a regex over a whole relative path."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if double_star and pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                if body.startswith(("!", "^")):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def clean(path: str) -> str:
    """Go's filepath.Clean of a relative path ("" for the top)."""
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


class Ignore:
    """The patterns of a .dockerignore."""

    def __init__(self, text: str = "") -> None:
        self.patterns: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            body = clean(line[1:].strip() if negate else line)
            if body:
                self.patterns.append((negate, pattern_regex(body)))

    @property
    def negations(self) -> bool:
        return any(negate for negate, _ in self.patterns)

    def excluded(self, rel: str) -> bool:
        if not rel or not self.patterns:
            return False
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negate, rx in self.patterns:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result


class Context:
    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise UsageError(f"build context {root} is not a directory")
        self.root = os.path.realpath(root)
        try:
            with open(os.path.join(self.root, ".dockerignore"), encoding="utf-8", errors="replace") as f:
                self.ignore = Ignore(f.read())
        except FileNotFoundError:
            self.ignore = Ignore()
        self._listing: list[str] | None = None

    def listing(self) -> list[str]:
        """Every path of the context that is not excluded, sorted."""
        if self._listing is None:
            out: list[str] = []
            self._walk("", out)
            self._listing = sorted(out)
        return self._listing

    def _walk(self, rel: str, out: list[str]) -> None:
        try:
            entries = sorted(os.scandir(os.path.join(self.root, rel)), key=lambda e: e.name)
        except OSError as err:
            raise UsageError(f"cannot read the build context at {rel or '.'}: {err.strerror}") from None
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            skip = self.ignore.excluded(path)
            if not skip:
                out.append(path)
            if entry.is_dir(follow_symlinks=False) and (not skip or self.ignore.negations):
                self._walk(path, out)

    def sources(self, text: str) -> list[str]:
        """The context paths (relative, "" for the top) that COPY source ``text`` names."""
        rel = clean(text)
        if posixpath.normpath("/" + text).startswith("/..") or text.startswith("../") or text == "..":
            raise UsageError(f"{text!r} is outside the build context")
        if any(c in rel for c in GLOB_CHARS):
            rx = pattern_regex(rel, double_star=False)
            found = [p for p in self.listing() if rx.match(p)]
            if not found:
                raise UsageError(f"no file in the build context matches {text!r}",
                                 hint="or every match is excluded by .dockerignore")
            return [p for p in found if not any(p.startswith(q + "/") for q in found)]
        if rel and self.ignore.excluded(rel):
            raise UsageError(f"{text!r} is excluded by .dockerignore")
        real = resolve(self.root, rel)
        if not os.path.lexists(os.path.join(self.root, real)) and real:
            raise UsageError(f"{text!r} is not in the build context")
        return [real]

    def digest(self, rels: list[str]) -> str:
        """The hash of what copying ``rels`` copies (the cache's input)."""
        sha = hashlib.sha256()
        for rel in rels:
            self._hash(rel, sha, top=True)
        return "sha256:" + sha.hexdigest()

    def _hash(self, rel: str, sha: hashlib._Hash, top: bool = False) -> None:
        path = os.path.join(self.root, rel) if rel else self.root
        st = os.lstat(path)
        sha.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode)}\0".encode(errors="surrogateescape"))
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
        elif stat.S_ISLNK(st.st_mode):
            sha.update(os.readlink(path).encode(errors="surrogateescape"))
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                child = f"{rel}/{name}" if rel else name
                if not self.ignore.excluded(child):
                    self._hash(child, sha)
        sha.update(b"\n")


def resolve(root: str, rel: str, follow_last: bool = True) -> str:
    """``rel`` inside ``root`` with its symlinks resolved as if ``root`` were ``/`` (a
    chroot's view): never a path outside it.  Returns a cleaned relative path."""
    parts = [p for p in rel.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/".join([*done, part])
        full = os.path.join(root, here)
        if (parts or follow_last) and os.path.islink(full):
            hops += 1
            if hops > MAX_LINKS:
                raise UsageError(f"too many levels of symbolic links at /{here}")
            target = os.readlink(full)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(part)
    return "/".join(done)
