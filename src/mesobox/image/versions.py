"""Version ordering of each package ecosystem (room: image, the scan and the diff).

Every comparison here answers "is this installed version older than the fixed one?"
with the ordering of the ecosystem that made the package, never string order:

- **dpkg** (deb-version(7)): ``[epoch:]upstream[-revision]``.  Epochs compare as
  numbers; upstream and revision are each split into alternating runs of non-digits
  and digits; digit runs compare as numbers, non-digit runs character by character
  with every letter before every non-letter, and ``~`` before anything, even the end
  of the run (so ``1.0~rc1`` is older than ``1.0``).  A missing revision is ``0``.
- **rpm** (rpm's "version comparison" rules, rpmvercmp): epoch as a number, then
  version, then release.  Each is split into alphabetic and numeric segments at any
  other character (separators carry no weight); numeric segments compare as numbers
  and are newer than alphabetic ones; ``~`` sorts before anything (pre-releases),
  ``^`` after the end but before any further segment (post-release snapshots); when
  one string runs out, the longer one is newer.
- **apk** (Alpine's pkgver rules, which follow Gentoo's): ``digits{.digits}[letter]
  {_suffix[N]}[~hash][-rN]``.  The first number compares as a number; a later one as a
  number too, unless either side starts with ``0``: then as text, trailing zeros
  dropped (``1.01`` < ``1.1``).  More numbers are newer; a letter is newer than none;
  suffixes rank ``_alpha < _beta < _pre < _rc < (none) < _cvs < _svn < _git < _hg <
  _p``, each with its number; an extra pre-release suffix is older and an extra
  post-release one newer; ``-rN`` last.
- **PEP 440** for PyPI, through the ``packaging`` library.

``compare(kind, a, b)`` returns -1, 0 or 1, and raises ``ValueError`` for a version its
ecosystem would not accept (the caller decides: the scan reports it, never guesses).
Written from the documents named above; no code was copied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

KINDS = ("deb", "rpm", "apk", "pypi")


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


# --- dpkg ------------------------------------------------------------------------------------


def _deb_order(ch: str) -> int:
    """Weight of one character of a non-digit run: ``~`` first, then the run's end
    (weight 0), then letters, then every other character."""
    if ch == "~":
        return -1
    if ch.isascii() and ch.isalpha():
        return ord(ch)
    return ord(ch) + 256


def _deb_part(a: str, b: str) -> int:
    """Compare one upstream version or one revision (deb-version(7), "Sorting")."""
    i = j = 0
    while i < len(a) or j < len(b):
        # the non-digit runs, character by character; a run's end weighs 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            wa = _deb_order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            wb = _deb_order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if wa != wb:
                return _sign(wa - wb)
            i += 1
            j += 1
        # the digit runs, as numbers (an empty run is 0)
        si = i
        while i < len(a) and a[i].isdigit():
            i += 1
        sj = j
        while j < len(b) and b[j].isdigit():
            j += 1
        na = int(a[si:i] or "0")
        nb = int(b[sj:j] or "0")
        if na != nb:
            return _sign(na - nb)
    return 0


_DEB_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-~:")


def parse_deb(version: str) -> tuple[int, str, str]:
    """``[epoch:]upstream[-revision]`` → (epoch, upstream, revision)."""
    text = version.strip()
    if not text or any(ch not in _DEB_ALLOWED for ch in text):
        raise ValueError(f"not a Debian version: {version!r}")
    epoch = 0
    if ":" in text:
        head, text = text.split(":", 1)
        if not head.isdigit():
            raise ValueError(f"not a Debian version (epoch {head!r}): {version!r}")
        epoch = int(head)
    upstream, _, revision = text.rpartition("-") if "-" in text else (text, "", "")
    if not upstream or not upstream[0].isdigit():
        raise ValueError(f"not a Debian version (the upstream part must start with a digit): {version!r}")
    return epoch, upstream, revision


def compare_deb(a: str, b: str) -> int:
    ea, ua, ra = parse_deb(a)
    eb, ub, rb = parse_deb(b)
    if ea != eb:
        return _sign(ea - eb)
    return _deb_part(ua, ub) or _deb_part(ra, rb)


# --- rpm -------------------------------------------------------------------------------------


def _is_rpm_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def rpmvercmp(a: str, b: str) -> int:
    """Compare one rpm version or release string (rpm's documented rules, above)."""
    if a == b:
        return 0
    i = j = 0
    while i < len(a) or j < len(b):
        while i < len(a) and not _is_rpm_alnum(a[i]) and a[i] not in "~^":
            i += 1
        while j < len(b) and not _is_rpm_alnum(b[j]) and b[j] not in "~^":
            j += 1
        at_a = a[i] if i < len(a) else ""
        at_b = b[j] if j < len(b) else ""
        if at_a == "~" or at_b == "~":  # a pre-release: older than anything, the end included
            if at_a != "~":
                return 1
            if at_b != "~":
                return -1
            i += 1
            j += 1
            continue
        if at_a == "^" or at_b == "^":  # a snapshot after a release: newer than the end only
            if not at_a:
                return -1
            if not at_b:
                return 1
            if at_a != "^":
                return 1
            if at_b != "^":
                return -1
            i += 1
            j += 1
            continue
        if not at_a or not at_b:
            break
        numeric = at_a.isdigit()
        si, sj = i, j
        if numeric:
            while i < len(a) and a[i].isascii() and a[i].isdigit():
                i += 1
            while j < len(b) and b[j].isascii() and b[j].isdigit():
                j += 1
        else:
            while i < len(a) and a[i].isascii() and a[i].isalpha():
                i += 1
            while j < len(b) and b[j].isascii() and b[j].isalpha():
                j += 1
        seg_a, seg_b = a[si:i], b[sj:j]
        if not seg_b:  # different kinds of segment: the numeric one is newer
            return 1 if numeric else -1
        if numeric:
            seg_a, seg_b = seg_a.lstrip("0"), seg_b.lstrip("0")
            if len(seg_a) != len(seg_b):
                return 1 if len(seg_a) > len(seg_b) else -1
        if seg_a != seg_b:
            return 1 if seg_a > seg_b else -1
    rest_a, rest_b = i < len(a), j < len(b)
    if not rest_a and not rest_b:
        return 0
    return 1 if rest_a else -1


def parse_rpm(version: str) -> tuple[int, str, str]:
    """``[epoch:]version[-release]`` → (epoch, version, release)."""
    text = version.strip()
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"not an rpm version: {version!r}")
    epoch = 0
    if ":" in text:
        head, text = text.split(":", 1)
        if not head.isdigit():
            raise ValueError(f"not an rpm version (epoch {head!r}): {version!r}")
        epoch = int(head)
    ver, _, release = text.rpartition("-") if "-" in text else (text, "", "")
    if not ver:
        raise ValueError(f"not an rpm version: {version!r}")
    return epoch, ver, release


def compare_rpm(a: str, b: str) -> int:
    ea, va, ra = parse_rpm(a)
    eb, vb, rb = parse_rpm(b)
    if ea != eb:
        return _sign(ea - eb)
    # a release is compared only when both name one ("1.2" matches every 1.2-N)
    return rpmvercmp(va, vb) or (rpmvercmp(ra, rb) if ra and rb else 0)


# --- apk -------------------------------------------------------------------------------------

# suffix → rank; below 0: pre-releases (older than no suffix), above: post-releases
_APK_SUFFIXES = {"alpha": -4, "beta": -3, "pre": -2, "rc": -1, "cvs": 1, "svn": 2, "git": 3, "hg": 4, "p": 5}


class _Apk:
    __slots__ = ("letter", "numbers", "revision", "suffixes")

    def __init__(self, numbers: list[str], letter: str, suffixes: list[tuple[int, int]], revision: int) -> None:
        self.numbers = numbers
        self.letter = letter
        self.suffixes = suffixes
        self.revision = revision


def parse_apk(version: str) -> _Apk:
    text = version.strip()
    bad = ValueError(f"not an apk version: {version!r}")
    revision = 0
    if "-r" in text:
        text, _, rev = text.rpartition("-r")
        if not rev.isdigit():
            raise bad
        revision = int(rev)
    if "~" in text:  # a commit hash after the version: it orders nothing
        text, _, commit = text.partition("~")
        if not commit or not all(ch in "0123456789abcdef" for ch in commit):
            raise bad
    head, *suffix_texts = text.split("_")
    numbers_text = head.rstrip("abcdefghijklmnopqrstuvwxyz")
    letter = head[len(numbers_text):]
    numbers = numbers_text.split(".")
    if len(letter) > 1 or not all(n.isascii() and n.isdigit() for n in numbers):
        raise bad
    suffixes = []
    for item in suffix_texts:
        name = item.rstrip("0123456789")
        if name not in _APK_SUFFIXES:
            raise bad
        suffixes.append((_APK_SUFFIXES[name], int(item[len(name):] or "0")))
    return _Apk(numbers, letter, suffixes, revision)


def _apk_number(a: str, b: str, first: bool) -> int:
    if not first and (a.startswith("0") or b.startswith("0")):
        a, b = a.rstrip("0"), b.rstrip("0")
        return (a > b) - (a < b)
    return _sign(int(a) - int(b))


def compare_apk(a: str, b: str) -> int:
    pa, pb = parse_apk(a), parse_apk(b)
    for n, (x, y) in enumerate(zip(pa.numbers, pb.numbers, strict=False)):
        result = _apk_number(x, y, n == 0)
        if result:
            return result
    if len(pa.numbers) != len(pb.numbers):
        return 1 if len(pa.numbers) > len(pb.numbers) else -1
    if pa.letter != pb.letter:
        return 1 if pa.letter > pb.letter else -1
    for (ka, na), (kb, nb) in zip(pa.suffixes, pb.suffixes, strict=False):
        if ka != kb:
            return _sign(ka - kb)
        if na != nb:
            return _sign(na - nb)
    if len(pa.suffixes) != len(pb.suffixes):
        # the first extra suffix decides: a pre-release one is older, a post-release one newer
        if len(pa.suffixes) > len(pb.suffixes):
            return 1 if pa.suffixes[len(pb.suffixes)][0] > 0 else -1
        return -1 if pb.suffixes[len(pa.suffixes)][0] > 0 else 1
    return _sign(pa.revision - pb.revision)


# --- PEP 440 ---------------------------------------------------------------------------------


def compare_pypi(a: str, b: str) -> int:
    from packaging.version import Version  # InvalidVersion is a ValueError

    va, vb = Version(a), Version(b)
    return (va > vb) - (va < vb)


_COMPARE: dict[str, Callable[[str, str], int]] = {
    "deb": compare_deb,
    "rpm": compare_rpm,
    "apk": compare_apk,
    "pypi": compare_pypi,
}


def compare(kind: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, the same as, or newer than ``b`` in the ordering
    of ecosystem ``kind`` (one of KINDS); ValueError for a version it would not accept."""
    return _COMPARE[kind](a, b)


def sort_key(kind: str) -> Callable[[str], Any]:
    """A key for ``sorted`` in the ordering of ``kind``."""
    return functools.cmp_to_key(_COMPARE[kind])
