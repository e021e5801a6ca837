"""Which source serves a reference: the registry client or an archive reader.

Kept out of source.py (the types every source shares) so that the sources can import
those types without importing each other.  Only the transport asked for is imported:
the registry client never loads for an ``oci-archive:`` file.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config
    from mesobox.image.reference import Reference
    from mesobox.image.source import ImageSource


def open_source(ref: Reference, config: Config, insecure: bool = False) -> ImageSource:
    """The source for ``ref``'s transport (lazily imported)."""
    if ref.transport == "docker":
        from mesobox.image.registry import RegistrySource

        return RegistrySource(ref, config, insecure=insecure)
    from mesobox.image.archive import open_archive

    return open_archive(ref)
