"""Digests: parsing content addresses and verifying content while it streams.

Room: image/digest.  Invariants:
- A digest accepted by ``parse_digest`` is ``ALGO:HEX`` with ALGO in {sha256, sha512} and
  HEX lowercase of exactly the algorithm's length, so ``HEX`` is safe as a file name
  (no ``/``, no ``..``: CVE-2024-3727 used unvalidated digests as paths).
- A ``Verifier`` says "ok" only when both the byte count and the hash match.
Stdlib only.
"""

from __future__ import annotations

from mesobox.errors import DigestMismatch, InvalidReference

# OCI image-spec descriptor.md "Registered algorithms": hex lengths of the encodings.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = frozenset("0123456789abcdef")


def parse_digest(text: str) -> tuple[str, str]:
    """Split ``sha256:HEX`` into ``("sha256", HEX)`` after validating both parts."""
    algorithm, sep, hexpart = text.partition(":")
    if not sep:
        raise InvalidReference(f"bad digest {text!r}: expected ALGORITHM:HEX",
                               hint="for example sha256:<64 lowercase hex digits>")
    length = _HEX_LENGTH.get(algorithm)
    if length is None:
        raise InvalidReference(f"bad digest {text!r}: unsupported algorithm {algorithm!r}",
                               hint="only sha256 and sha512 digests are accepted")
    if len(hexpart) != length or not _HEX.issuperset(hexpart):
        raise InvalidReference(f"bad digest {text!r}: expected {length} lowercase hex digits",
                               hint=f"a {algorithm} digest is {length} characters of 0-9a-f")
    return algorithm, hexpart


def sha256_digest(data: bytes) -> str:
    import hashlib  # lazily: parse_digest is on the `mesobox run` path, hashing is not

    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_bytes(data: bytes, expected: str, what: str = "content") -> None:
    """Raise DigestMismatch unless ``data`` hashes to ``expected``."""
    verifier = Verifier(expected, None, what)
    verifier.update(data)
    verifier.verify()


class Verifier:
    """Incremental hash and size check of content named by ``expected`` digest.

    ``size`` None means the size is not known in advance (only the hash is checked).
    ``update`` raises as soon as more bytes than ``size`` arrive, so a hostile server
    cannot make us write an endless blob to disk.
    """

    def __init__(self, expected: str, size: int | None = None, what: str = "blob") -> None:
        algorithm, self._hex = parse_digest(expected)
        self.expected = expected
        self.size = size
        self.what = what
        self._algorithm = algorithm
        self.reset()

    def reset(self) -> None:
        """Forget everything seen (a download starts over from byte 0)."""
        self.count = 0
        import hashlib

        self._hash = hashlib.new(self._algorithm)

    def update(self, data: bytes) -> None:
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise DigestMismatch(
                f"{self.what} {self.expected}: more than the expected {self.size} bytes",
                hint="the source serves different content than the manifest describes",
            )
        self._hash.update(data)

    def verify(self) -> None:
        if self.size is not None and self.count != self.size:
            raise DigestMismatch(
                f"{self.what} {self.expected}: expected {self.size} bytes, got {self.count}",
                hint="the download was truncated or the source is corrupt; try again",
            )
        got = self._hash.hexdigest()
        if got != self._hex:
            algorithm = self.expected.partition(":")[0]
            raise DigestMismatch(
                f"{self.what} digest mismatch: expected {self.expected}, got {algorithm}:{got}",
                hint="the content was corrupted or tampered with; it was not used",
            )
