"""Trust verbs: ``key generate``, ``sign``, ``verify`` (cosign's format, image/sign.py).

Wiring only: parse options (the option table's parser), call image/sign.py, print.
"""

from __future__ import annotations

import sys

from mesobox.cli.usage import parse, subverb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config


def main_key(argv: list[str], config: Config) -> int:
    chosen = subverb("key", argv)
    if chosen is None:
        return 0 if argv else 2
    parsed = parse("key generate", chosen[1])
    if parsed is None:
        return 0
    values, _ = parsed
    from mesobox.image.sign import generate_key_pair

    key_path, pub_path = generate_key_pair(values.get("output") or "cosign", values.get("password_env"))
    sys.stdout.write(f"private key: {key_path}\npublic key: {pub_path}\n")
    return 0


def main_sign(argv: list[str], config: Config) -> int:
    parsed = parse("sign", argv)
    if parsed is None:
        return 0
    values, (image,) = parsed
    from mesobox.image.sign import sign_image

    signed = sign_image(config, image, values["key"], values.get("password_env"), bool(values.get("insecure")))
    done = "pushed" if signed.added else "already there, signed with this key:"
    sys.stdout.write(f"signed {signed.digest}: {done} {signed.tag}\n")
    return 0


def main_verify(argv: list[str], config: Config) -> int:
    parsed = parse("verify", argv)
    if parsed is None:
        return 0
    values, (image,) = parsed
    from mesobox.image.sign import verify_image

    digest, references = verify_image(config, image, values["key"], bool(values.get("insecure")))
    for reference in references:
        sys.stdout.write(f"verified {digest}: signed for {reference}\n")
    return 0
