"""The build cache: step key → the layer that step made.

A step's key is the sha256 of its parent's key (the base image's manifest digest, then
each step before it: so the config state, ENV, ARG values, USER, WORKDIR, SHELL are all
in it), the instruction as written after substitution, and its inputs (the content
hash of COPY/ADD sources; for ``COPY --from`` the key of that stage's last step).
An entry is a small JSON file in the store, ``build-cache/HEX.json``; its layer blob
lives in ``blobs/`` like any other, so ``mesobox prune`` may delete it, and an entry
whose blob is gone is a miss.  Entries are written whole (files.write_atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mesobox import files


def chain(parent: str, *parts: str) -> str:
    """The key of a step after ``parent``."""
    sha = hashlib.sha256(parent.encode())
    for part in parts:
        sha.update(b"\0" + part.encode(errors="surrogateescape"))
    return sha.hexdigest()


class Cache:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.root = Path(store.root) / "build-cache"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads((self.root / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict):
            return None
        layer = entry.get("layer")
        if layer is not None:
            if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
                return None
            try:
                blob = self.store.find_blob(layer["digest"])
            except Exception:  # a malformed digest: a miss, and the step runs again
                return None
            if blob is None or blob.stat().st_size != layer.get("size"):
                return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        os.makedirs(self.root, exist_ok=True)
        files.write_atomic(str(self.root / f"{key}.json"), json.dumps(entry, indent=1).encode())
