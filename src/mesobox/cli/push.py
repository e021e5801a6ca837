"""Publishing verbs: ``push`` (a stored image to a registry, an OCI layout or an OCI
archive) and ``tag`` (one more name for a stored image).

Wiring only: parse options (the option table's parser), call image/push.py, print.
The image room is imported inside the verbs.
"""

from __future__ import annotations

import sys

from mesobox.cli import print_json
from mesobox.cli.usage import parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config


def main_push(argv: list[str], config: Config) -> int:
    parsed = parse("push", argv)
    if parsed is None:
        return 0
    values, (source, destination) = parsed
    from mesobox.image.push import push_image
    from mesobox.sizes import parse_size

    chunk_size = parse_size(values["chunk_size"], "--chunk-size") if "chunk_size" in values else None
    quiet = bool(values.get("quiet") or values.get("json"))

    def report(digest: str, size: int, action: str) -> None:
        if not quiet:  # one write per line: blobs go up in parallel
            sys.stderr.write(f"{action:<8} {digest[:19]}  {size} bytes\n")

    pushed = push_image(config, source, destination, insecure=bool(values.get("insecure")), chunk_size=chunk_size,
                        report=report)
    if values.get("json"):
        print_json({"destination": pushed.destination, "digest": pushed.digest,
                    "blobs": [{"digest": d, "size": s, "action": a} for d, s, a in pushed.blobs]})
        return 0
    sys.stdout.write(pushed.digest + "\n")
    return 0


def main_tag(argv: list[str], config: Config) -> int:
    parsed = parse("tag", argv)
    if parsed is None:
        return 0
    _, (source, new_name) = parsed
    from mesobox.image.push import tag_image

    record, new = tag_image(config, source, new_name)
    sys.stdout.write(f"tagged {record.reference} ({record.digest[:19]}) as {new.reference}\n")
    return 0
