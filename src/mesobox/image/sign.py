"""Image signatures in cosign's format: keys, the simple-signing payload, signing,
verifying, and the signatures a registry holds for a manifest digest.

Room: image/sign.  The format (what cosign and the containers/image ``sigstoreSigned``
policy read and write):

- a signature of the manifest ``sha256:HEX`` of ``REGISTRY/REPO`` lives in the same
  repository, under the tag ``sha256-HEX.sig``: an OCI image manifest whose config is
  an (almost empty) ``application/vnd.oci.image.config.v1+json`` and whose every layer
  is one signature;
- each such layer is the payload, a simple-signing JSON document
  (``critical.identity.docker-reference``, ``critical.image.docker-manifest-digest``,
  ``critical.type`` = ``cosign container image signature``, ``optional``), of media
  type ``application/vnd.dev.cosign.simplesigning.v1+json``, and its annotation
  ``dev.cosignproject.cosign/signature`` holds the base64 of the DER ECDSA-SHA256
  signature of the payload's bytes;
- keys are ECDSA P-256 in PEM: the private key PKCS#8 (or SEC1 "EC PRIVATE KEY";
  PKCS#8 encrypted with a password), the public key SubjectPublicKeyInfo.  cosign's own
  encrypted key files (scrypt + NaCl secretbox) are refused with one line: the
  ``cryptography`` library has no secretbox, and mesobox writes no crypto of its own.

Invariants:
- All cryptography is the ``cryptography`` library's; it is imported only by the
  functions that sign or verify, never by a launch that finds a cached verdict
  (image/policy.py).
- A payload counts only when its signature verifies with the key *and* its type is
  cosign's *and* it names the digest asked about; what it names as docker-reference is
  the policy's business (``signedIdentity``).
- Signing keeps the signatures already under the tag and appends the new one, as cosign
  does; the same payload already signed with the same key is not signed twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesobox.errors import ImageNotFound, PolicyError, RegistryError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey

    from mesobox.config import Config
    from mesobox.image.reference import Reference
    from mesobox.image.registry import RegistrySource

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MAX_PAYLOAD = 64 * 1024  # a simple-signing payload is a few hundred bytes
MAX_SIGNATURES = 256  # layers of one .sig manifest that are looked at
_COSIGN_ENCRYPTED = (b"ENCRYPTED SIGSTORE PRIVATE KEY", b"ENCRYPTED COSIGN PRIVATE KEY")


@dataclass(frozen=True)
class Signature:
    """One signature as the registry holds it: the payload bytes and the annotation."""

    payload: bytes
    signature: str  # base64 of the DER signature

    def to_json(self) -> dict[str, str]:
        return {"payload": base64.b64encode(self.payload).decode(), "signature": self.signature}

    @classmethod
    def from_json(cls, raw: object) -> Signature | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("signature"), str):
            return None
        try:
            return cls(base64.b64decode(str(raw.get("payload")), validate=True), raw["signature"])
        except (binascii.Error, ValueError):
            return None


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-HEX.sig``."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}.sig"


def docker_reference(ref: Reference) -> str:
    """What a payload names: ``REGISTRY/REPO[:TAG]`` (the tag the user signed, as podman's
    sigstore signing writes it; cosign writes the repository alone)."""
    return f"{ref.registry}/{ref.repository}" + (f":{ref.tag}" if ref.tag else "")


def make_payload(reference: str, digest: str) -> bytes:
    """The simple-signing payload, as cosign marshals it (compact, these keys)."""
    doc = {"critical": {"identity": {"docker-reference": reference},
                        "image": {"docker-manifest-digest": digest},
                        "type": PAYLOAD_TYPE},
           "optional": {}}
    return json.dumps(doc, separators=(",", ":")).encode()


def read_payload(payload: bytes) -> tuple[str, str]:
    """(docker-reference, docker-manifest-digest) of a cosign payload; ValueError with
    the reason for anything else (another type, a missing field, not JSON)."""
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        kind, reference = critical["type"], critical["identity"]["docker-reference"]
        digest = critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a simple-signing payload ({type(err).__name__})") from None
    if kind != PAYLOAD_TYPE:
        raise ValueError(f"payload type {kind!r}, not {PAYLOAD_TYPE!r}")
    if not isinstance(reference, str) or not isinstance(digest, str):
        raise ValueError("payload names no reference or digest")
    return reference, digest


# --- keys ------------------------------------------------------------------------------------


def _password(env_var: str | None) -> bytes | None:
    if not env_var:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise UsageError(f"--password-env {env_var}: the variable is not set, or empty")
    return value.encode()


def generate_key_pair(prefix: str, password_env: str | None = None) -> tuple[str, str]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600, encrypted when a password is given) and
    PREFIX.pub (SubjectPublicKeyInfo PEM); an existing file is never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    password = _password(password_env)
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path, pub_path = prefix + ".key", prefix + ".pub"
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists already: not overwritten", hint="choose another --output PREFIX")
    _write_new(key_path, private, 0o600)
    _write_new(pub_path, public, 0o644)
    return key_path, pub_path


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        raise UsageError(f"cannot create {path}: {err.strerror}") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as err:
        raise UsageError(f"cannot read key {path}: {err.strerror}") from None


def load_private_key(path: str, password_env: str | None = None) -> EllipticCurvePrivateKey:
    """An ECDSA P-256 private key from PEM (PKCS#8, SEC1, or encrypted PKCS#8)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key_file(path)
    if any(b"-----BEGIN " + kind in data for kind in _COSIGN_ENCRYPTED):
        raise UsageError(f"{path} is in cosign's encrypted key format (scrypt + NaCl secretbox), "
                         "which mesobox cannot read",
                         hint="sign with a PKCS#8 PEM key (`mesobox key generate`, optionally with --password-env)")
    password = _password(password_env)
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:  # encrypted without a password, or a password for a plain key
        if password is None:
            raise UsageError(f"{path} is encrypted", hint="name the variable holding its password: "
                                                          "--password-env VAR") from None
        raise UsageError(f"{path} is not encrypted: drop --password-env") from None
    except ValueError as err:
        raise UsageError(f"{path} is not a usable PEM private key (or the password is wrong): "
                         f"{_first_line(err)}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError(f"{path} is not an ECDSA P-256 key", hint="cosign's keys are ECDSA P-256")
    return key


def load_public_key(data: bytes, where: str) -> EllipticCurvePublicKey:
    """An ECDSA P-256 public key from SubjectPublicKeyInfo PEM; PolicyError otherwise
    (a key the site named that cannot be used refuses every image it guards)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise PolicyError(f"{where} is not a PEM public key: {_first_line(err)}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PolicyError(f"{where} is not an ECDSA P-256 public key")
    return key


def public_key_file(path: str) -> EllipticCurvePublicKey:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as err:
        raise UsageError(f"cannot read key {path}: {err.strerror}") from None
    return load_public_key(data, path)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


# --- signing and verifying ---------------------------------------------------------------------


def sign_bytes(key: EllipticCurvePrivateKey, payload: bytes) -> str:
    """base64 of the DER ECDSA-SHA256 signature of ``payload``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def signature_valid(key: EllipticCurvePublicKey, payload: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def verified_references(signatures: list[Signature], keys: list[EllipticCurvePublicKey],
                        digests: tuple[str, ...]) -> tuple[list[str], str]:
    """The docker-references of the signatures that verify with one of ``keys`` and sign
    one of ``digests`` with cosign's payload type; and, when there is none, why."""
    if not signatures:
        return [], "it has no signatures"
    found: list[str] = []
    reasons: set[str] = set()
    for sig in signatures[:MAX_SIGNATURES]:
        if not any(signature_valid(key, sig.payload, sig.signature) for key in keys):
            reasons.add("none verifies with the key")
            continue
        try:
            reference, digest = read_payload(sig.payload)
        except ValueError as err:
            reasons.add(f"a verified payload is unusable: {err}")
            continue
        if digest not in digests:
            reasons.add(f"a verified signature is for another digest ({digest[:19]})")
            continue
        found.append(reference)
    count = len(signatures)
    why = f"{count} signature{'s' if count != 1 else ''}, " + "; ".join(sorted(reasons))
    return found, why


# --- the registry side ------------------------------------------------------------------------------


def open_registry(config: Config, text: str, insecure: bool = False, mirrors: bool = True) -> RegistrySource:
    """The registry client for a ``docker://`` (or bare) reference; archives are refused.
    ``mirrors=False``: the registry itself (signing must name the tag's digest there, not
    a lagging mirror's)."""
    from mesobox.image.reference import parse_reference
    from mesobox.image.registry import RegistrySource

    ref = parse_reference(text)
    if ref.transport != "docker":
        raise UsageError(f"{text}: signatures live in a registry; {ref.transport}: images cannot be signed",
                         hint="push the image to a registry, then sign docker://REGISTRY/REPO:TAG")
    return RegistrySource(ref, config, insecure=insecure, mirrors=mirrors)


def manifest_digest(source: RegistrySource) -> str:
    """The digest of what the reference names in the registry (an index or a manifest:
    what cosign signs)."""
    _data, _media_type, digest = source.get_manifest(source.ref.digest or source.ref.tag or "latest")
    return digest


def _signature_manifest(source: RegistrySource, digest: str) -> dict[str, Any] | None:
    from mesobox.image import manifest as mf

    try:
        data, _media_type, _digest = source.get_manifest(signature_tag(digest))
    except ImageNotFound:
        return None
    return mf.load_json(data, f"signature manifest {signature_tag(digest)}")


def fetch_signatures(source: RegistrySource, digest: str) -> list[Signature]:
    """The signatures the registry holds for ``digest`` (none: an empty list).  Each
    payload is checked against its layer's digest; nothing is verified here."""
    from mesobox.image import manifest as mf

    doc = _signature_manifest(source, digest)
    if doc is None:
        return []
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(f"signature manifest {signature_tag(digest)} has no layers list")
    found = []
    for i, raw in enumerate(layers[:MAX_SIGNATURES]):
        desc = mf.descriptor(raw, f"signature layer {i}")
        signature = desc.annotations.get(SIGNATURE_ANNOTATION)
        if desc.media_type != SIMPLESIGNING or not signature:
            continue  # not a key-based signature (a keyless bundle, an attestation)
        found.append(Signature(source.get_blob_bytes(desc, MAX_PAYLOAD), signature))
    return found


@dataclass(frozen=True)
class Signed:
    digest: str  # the manifest digest signed
    tag: str  # where the signature went: REGISTRY/REPO:sha256-HEX.sig
    added: bool  # False: the same payload was already signed with this key


def sign_image(config: Config, text: str, key_path: str, password_env: str | None = None,
               insecure: bool = False) -> Signed:
    """Sign what ``text`` names in its registry and push the signature (cosign's layout)."""
    from mesobox.image import upload

    key = load_private_key(key_path, password_env)
    source = open_registry(config, text, insecure, mirrors=False)
    digest = manifest_digest(source)
    payload = make_payload(docker_reference(source.ref), digest)
    tag = signature_tag(digest)
    where = f"{source.ref.registry}/{source.ref.repository}:{tag}"
    doc = _signature_manifest(source, digest)
    layers: list[Any] = list(doc.get("layers") or []) if doc is not None else []
    if any(sig.payload == payload and signature_valid(key.public_key(), sig.payload, sig.signature)
           for sig in fetch_signatures(source, digest)):
        return Signed(digest, where, False)
    payload_digest = upload.put_blob(source, payload)
    layers.append({"mediaType": SIMPLESIGNING, "size": len(payload), "digest": payload_digest,
                   "annotations": {SIGNATURE_ANNOTATION: sign_bytes(key, payload)}})
    config_blob = _signature_config(layers)
    config_digest = upload.put_blob(source, config_blob)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "size": len(config_blob), "digest": config_digest},
                "layers": layers}
    upload.put_manifest(source, tag, json.dumps(manifest, separators=(",", ":")).encode(), OCI_MANIFEST)
    return Signed(digest, where, True)


def _signature_config(layers: list[Any]) -> bytes:
    """The config cosign's signature images carry: no platform, the layers' digests as
    diff_ids (a payload is stored uncompressed), zero times."""
    zero = "0001-01-01T00:00:00Z"
    diff_ids = [layer.get("digest") if isinstance(layer, dict) else None for layer in layers]
    doc = {"architecture": "", "created": zero, "history": [{"created": zero} for _ in layers], "os": "",
           "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}
    return json.dumps(doc, separators=(",", ":")).encode()


def verify_image(config: Config, text: str, pub_path: str, insecure: bool = False) -> tuple[str, list[str]]:
    """(digest, docker-references of the verified signatures); PolicyError when none verifies."""
    key = public_key_file(pub_path)
    source = open_registry(config, text, insecure)
    digest = manifest_digest(source)
    found, why = verified_references(fetch_signatures(source, digest), [key], (digest,))
    if not found:
        raise PolicyError(f"no signature of {source.ref.registry}/{source.ref.repository}@{digest} verifies "
                          f"with {pub_path}: {why}",
                          hint=f"sign it: mesobox sign --key KEY {text}")
    return digest, found
