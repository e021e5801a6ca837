"""Site trust policy: which images may be pulled and launched, in the syntax of
containers-policy.json(5) (podman, skopeo, CRI-O).

Room: image/policy.  The file (``policy_file``: /etc/mesobox/policy.json unless the
site file names another; users cannot) holds ``default`` (a list of requirements) and
``transports`` → transport → scope → requirements.  The most specific scope present
wins: for ``docker``, ``REGISTRY/REPO@DIGEST`` or ``REGISTRY/REPO:TAG``, then
``REGISTRY/REPO``, each shorter namespace down to ``REGISTRY``, the ``*.DOMAIN``
wildcards, then ``""`` (the transport's own default), then ``default``.  Images
pulled from archives use the transports ``oci``, ``oci-archive``, ``docker-archive``;
a directory or squashfs file launched by path uses ``dir``; their scopes are the path
and each directory above it.  Every requirement of the winning list must hold:

- ``insecureAcceptAnything``; ``reject``;
- ``sigstoreSigned`` with ``keyPath``, ``keyPaths`` or ``keyData`` (base64 of a PEM
  public key) and an optional ``signedIdentity`` (``matchRepoDigestOrExact``, the
  default; ``matchRepository``, ``matchExact``, ``exactReference``,
  ``exactRepository``): some stored cosign signature verifies with one of the keys,
  names the image's manifest (or index) digest and an identity that matches;
- ``signedBy`` (GPG) and keyless ``sigstoreSigned`` (Fulcio) are understood and refuse
  with a line saying mesobox does not support them.

When: at pull, before anything is fetched beyond the manifest and the signatures; and
at every launch, from the signatures the pull kept in the store (offline: a compute
node needs no registry).  No policy file: everything is accepted.  A policy that cannot
be read or parsed refuses everything (fail closed).  A refusal is one PolicyError line
that names the rule: the file, the scope and the requirement.

The verdict cache: an accepted launch is remembered in the user's private runtime
directory (paths.save_cached) under (policy file and its identity, transport, image,
digests), with the identities of the files the verdict read (keys, the stored
signatures).  A launch that finds it, with the same identities, reads one small file
and imports neither ``json`` nor any cryptography.  Refusals are not cached.  A launch
replayed from a saved plan (launch/plancache.py) needs no check at all: the compile
that saved it asked every file identity above through probe.py, so a changed policy,
key or signature file makes the replay compile, and check, again.

Stdlib ``os`` and ``paths`` at import: imported on the launch path when a policy exists.
"""

from __future__ import annotations

import os

from mesobox import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from mesobox.config import Config
    from mesobox.image.reference import Reference
    from mesobox.image.sign import Signature

    Identity = Callable[[str], "tuple[int, ...] | None"]

FORMAT = 1
DOCKER = "docker"
PATH_TRANSPORT = "dir"
_REQUIREMENT_FIELDS = {
    "insecureAcceptAnything": set(),
    "reject": set(),
    "signedBy": {"keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"},
    "sigstoreSigned": {"keyPath", "keyPaths", "keyData", "fulcio", "rekorPublicKeyPath", "rekorPublicKeyData",
                       "signedIdentity"},
}
_IDENTITY_FIELDS = {
    "matchRepoDigestOrExact": set(),
    "matchRepository": set(),
    "matchExact": set(),
    "exactReference": {"dockerReference"},
    "exactRepository": {"dockerRepository"},
    "remapIdentity": {"prefix", "signedPrefix"},
}
TRUST_HINT = "see docs/trust.md, or ask the site admins which images are allowed"


class Target:
    """What is checked: an image by its transport, its name and its candidate scopes."""

    __slots__ = ("digests", "ref", "scopes", "text", "transport")

    def __init__(self, transport: str, text: str, scopes: tuple[str, ...], ref: Reference | None = None,
                 digests: tuple[str, ...] = ()) -> None:
        self.transport, self.text, self.scopes, self.ref, self.digests = transport, text, scopes, ref, digests


def reference_target(text: str, digests: tuple[str, ...] = ()) -> Target:
    """The target of a stored or pulled reference (``docker://…`` or an archive's)."""
    from mesobox.image.reference import parse_reference

    ref = parse_reference(text)
    if ref.transport != DOCKER:
        tagged = (f"{ref.path}:{ref.tag}",) if ref.tag else ()
        return Target(ref.transport, str(ref), (*tagged, *_path_scopes(ref.path)), ref, digests)
    return Target(DOCKER, str(ref), _docker_scopes(ref), ref, digests)


def path_target(path: str) -> Target:
    """The target of a directory or squashfs file launched by its (real) path."""
    return Target(PATH_TRANSPORT, path, _path_scopes(path))


def _docker_scopes(ref: Reference) -> tuple[str, ...]:
    name = f"{ref.registry}/{ref.repository}"
    scopes = [f"{name}@{ref.digest}"] if ref.digest else []
    if ref.tag:
        scopes.append(f"{name}:{ref.tag}")
    parts = name.split("/")
    scopes += ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    host = ref.registry
    if ":" not in host and not host.replace(".", "").isdigit():
        labels = host.split(".")
        scopes += ["*." + ".".join(labels[n:]) for n in range(1, len(labels))]
    scopes.append("")
    return tuple(scopes)


def _path_scopes(path: str) -> tuple[str, ...]:
    scopes = []
    while path not in ("/", ""):
        scopes.append(path)
        path = os.path.dirname(path)
    scopes.append("")
    return tuple(scopes)


# --- reading the policy ----------------------------------------------------------------------------


def _identity(path: str) -> tuple[int, ...] | None:
    """As probe.file_identity, unrecorded: for pulls and the CLI."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mode & 0o170000 != 0o100000:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _refuse(message: str, hint: str = TRUST_HINT) -> Exception:
    from mesobox.errors import PolicyError

    return PolicyError(message, hint=hint)


def load_policy(path: str) -> dict[str, Any]:
    """The policy document, every requirement checked; PolicyError (refuse everything)
    when it cannot be read or is not the syntax above."""
    import json

    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except OSError as err:
        raise _refuse(f"site policy {path} cannot be read: {err.strerror}; every image is refused",
                      "ask the site admins to fix its permissions") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise _refuse(f"site policy {path} is not valid JSON ({err}); every image is refused",
                      "ask the site admins to fix it (docs/trust.md)") from None
    problem = _policy_problem(doc)
    if problem:
        raise _refuse(f"site policy {path} is invalid: {problem}; every image is refused",
                      "ask the site admins to fix it (docs/trust.md)")
    result: dict[str, Any] = doc
    return result


def _policy_problem(doc: object) -> str:
    if not isinstance(doc, dict):
        return "not a JSON object"
    unknown = set(doc) - {"default", "transports"}
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r}"
    if "default" not in doc:
        return "no \"default\" (containers-policy.json requires one)"
    problem = _requirements_problem(doc["default"], "default")
    transports = doc.get("transports", {})
    if not isinstance(transports, dict):
        return "\"transports\" is not an object"
    for transport, scopes in transports.items():
        if not isinstance(scopes, dict):
            return f"transports.{transport} is not an object of scopes"
        for scope, requirements in scopes.items():
            problem = problem or _requirements_problem(requirements, _rule(transport, scope))
    return problem


def _requirements_problem(requirements: object, where: str) -> str:
    if not isinstance(requirements, list) or not requirements:
        return f"{where} is not a non-empty list of requirements"
    for req in requirements:
        kind = req.get("type") if isinstance(req, dict) else None
        if not isinstance(req, dict) or kind not in _REQUIREMENT_FIELDS:
            return f"{where}: unknown requirement {kind if isinstance(kind, str) else repr(req)}"
        unknown = set(req) - _REQUIREMENT_FIELDS[kind] - {"type"}
        if unknown:
            return f"{where}: {kind} has unknown field {sorted(unknown)[0]!r}"
        if kind == "sigstoreSigned":
            keys = [k for k in ("keyPath", "keyPaths", "keyData", "fulcio") if k in req]
            if len(keys) != 1:
                return f"{where}: sigstoreSigned needs exactly one of keyPath, keyPaths, keyData (or fulcio)"
        identity = req.get("signedIdentity")
        if identity is not None:
            name = identity.get("type") if isinstance(identity, dict) else None
            if not isinstance(identity, dict) or name not in _IDENTITY_FIELDS:
                return f"{where}: unknown signedIdentity {name if isinstance(name, str) else repr(identity)}"
            if set(identity) - _IDENTITY_FIELDS[name] - {"type"}:
                return f"{where}: signedIdentity {name} has unknown fields"
    return ""


def _rule(transport: str, scope: str) -> str:
    return f"transports.{transport}[{scope!r}]".replace("'", '"')


def requirements_for(policy: dict[str, Any], target: Target) -> tuple[str, list[dict[str, Any]]]:
    """(the rule's name, its requirements): the most specific scope present."""
    scopes = (policy.get("transports") or {}).get(target.transport) or {}
    for scope in target.scopes:
        if scope in scopes:
            return _rule(target.transport, scope), scopes[scope]
    return "default", policy["default"]


# --- evaluating ---------------------------------------------------------------------------------------


class _Reads:
    """The files a verdict read, with their identities asked before each read."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.files: list[tuple[str, tuple[int, ...] | None]] = []

    def ask(self, path: str) -> tuple[int, ...] | None:
        found = self.identity(path)
        self.files.append((path, found))
        return found


def evaluate(path: str, target: Target, signatures: Callable[[_Reads], list[Signature]], reads: _Reads) -> None:
    """Raise PolicyError unless the policy at ``path`` accepts ``target``."""
    policy = load_policy(path)
    rule, requirements = requirements_for(policy, target)
    for req in requirements:
        _requirement(path, rule, req, target, signatures, reads)


def _requirement(path: str, rule: str, req: dict[str, Any], target: Target,
                 signatures: Callable[[_Reads], list[Signature]], reads: _Reads) -> None:
    kind = req["type"]
    said = f"site policy {path} refuses {target.text}: {rule} requires {kind}"
    if kind == "insecureAcceptAnything":
        return
    if kind == "reject":
        raise _refuse(f"site policy {path} refuses {target.text}: {rule} is reject")
    if kind == "signedBy":
        raise _refuse(f"{said}, and GPG signatures (signedBy) are not supported by mesobox",
                      "the site can use sigstoreSigned with a public key instead (docs/trust.md)")
    if "fulcio" in req:
        raise _refuse(f"{said} with fulcio: keyless signatures are not supported by mesobox",
                      "the site can use sigstoreSigned with keyPath instead (docs/trust.md)")
    if target.transport != DOCKER or target.ref is None:
        raise _refuse(f"{said}: only registry images carry signatures", TRUST_HINT)
    identity = req.get("signedIdentity") or {"type": "matchRepoDigestOrExact"}
    if identity["type"] == "remapIdentity":
        raise _refuse(f"{said}: signedIdentity remapIdentity is not supported by mesobox")
    from mesobox.image import sign

    keys = [sign.load_public_key(data, where) for where, data in _key_material(req, reads)]
    found, why = sign.verified_references(signatures(reads), keys, target.digests)
    shown = req.get("keyPath") or ", ".join(req.get("keyPaths") or ()) or "keyData"
    if not found:
        raise _refuse(f"{said} (key {shown}): {why}",
                      "the image must be signed with the site's key (mesobox sign), then pulled again")
    if not any(_identity_matches(identity, target.ref, signed) for signed in found):
        raise _refuse(f"{said} (key {shown}): signed, but for {found[0]!r}, which {identity['type']} does not "
                      "accept", "sign the image under the name it is pulled by")


def _key_material(req: dict[str, Any], reads: _Reads) -> list[tuple[str, bytes]]:
    import base64
    import binascii

    if "keyData" in req:
        try:
            return [("the policy's keyData", base64.b64decode(str(req["keyData"]), validate=True))]
        except (binascii.Error, ValueError):
            raise _refuse("site policy: keyData is not base64", "ask the site admins to fix it") from None
    found = []
    for key_path in ([req["keyPath"]] if "keyPath" in req else list(req.get("keyPaths") or ())):
        reads.ask(str(key_path))  # before the read: a later change shows as another identity
        try:
            with open(str(key_path), "rb") as f:
                found.append((str(key_path), f.read(1 << 20)))
        except OSError as err:
            raise _refuse(f"site policy key {key_path} cannot be read: {err.strerror}; its images are refused",
                          "ask the site admins") from None
    return found


def _split_signed(text: str) -> tuple[str, str, str] | None:
    """(REGISTRY/REPO normalised, tag or "", digest or "") of a docker-reference."""
    from mesobox.errors import InvalidReference
    from mesobox.image.reference import parse_docker_name

    remainder, _, digest = text.partition("@")
    head, sep, tag = remainder.rpartition(":")
    name = head if sep and "/" not in tag else remainder
    tag = tag if name == head and sep else ""
    try:
        ref = parse_docker_name(name)
    except InvalidReference:
        return None
    return f"{ref.registry}/{ref.repository}", tag, digest


def _identity_matches(identity: dict[str, Any], ref: Reference, signed: str) -> bool:
    got = _split_signed(signed)
    if got is None:
        return False
    image = (f"{ref.registry}/{ref.repository}", ref.tag or "", ref.digest or "")
    kind = identity["type"]
    if kind == "matchRepository":
        return got[0] == image[0]
    if kind == "exactRepository":
        wanted = _split_signed(str(identity.get("dockerRepository", "")))
        return wanted is not None and got[0] == wanted[0]
    if kind == "exactReference":
        return got == _split_signed(str(identity.get("dockerReference", "")))
    if kind == "matchExact":
        return got == image
    # matchRepoDigestOrExact: an image named by digest needs the repository only (the
    # digest is checked with the signature); one named by tag needs that very tag.
    if ref.digest:
        return got[0] == image[0]
    return got == image


# --- the entry points -----------------------------------------------------------------------------------


def check_pull(config: Config, text: str, digests: tuple[str, ...], signatures: list[Signature]) -> None:
    """At pull, before the layers are fetched: refuse what the policy refuses."""
    if _identity(config.policy_file) is None:
        return
    evaluate(config.policy_file, reference_target(text, digests), lambda _reads: signatures, _Reads(_identity))


def check_stored(config: Config, reference: str, digests: tuple[str, ...], signatures_path: str,
                 identity: Identity) -> None:
    """At launch of a stored image: its kept signatures, offline; ``identity`` is
    probe.file_identity, so a saved plan depends on every file read here."""
    def stored(reads: _Reads) -> list[Signature]:
        return read_signatures(signatures_path) if reads.ask(signatures_path) is not None else []

    _check_cached(config, reference_target(reference, digests), stored, identity)


def check_path(config: Config, path: str, identity: Identity) -> None:
    """At launch of a directory or squashfs file by path (transport ``dir``)."""
    _check_cached(config, path_target(path), lambda _reads: [], identity)


def _check_cached(config: Config, target: Target, signatures: Callable[[_Reads], list[Signature]],
                  identity: Identity) -> None:
    policy_id = identity(config.policy_file)
    if policy_id is None:
        return
    directory, name, key = verdict_place(config.policy_file, policy_id, target)
    files = paths.load_cached(directory, name, FORMAT, key)
    if isinstance(files, tuple) and all(identity(path) == known for path, known in files):
        return  # accepted before, on these very files
    reads = _Reads(identity)
    evaluate(config.policy_file, target, signatures, reads)
    read = tuple(reads.files)
    if all(_settled(found) for found in (policy_id, *(known for _path, known in read))):
        paths.save_cached(directory, name, FORMAT, key, read)


def verdict_place(policy_file: str, policy_id: tuple[int, ...], target: Target) -> tuple[str, str, tuple[Any, ...]]:
    """(directory, file name, key) of the cached verdict on ``target`` under this policy."""
    key = (policy_file, policy_id, target.transport, target.text, target.digests)
    directory = os.path.join(paths.cache_root(os.environ), "trust")
    # The hash of a tuple of ints is the same in every process (str hashes are salted).
    return directory, f"{hash(tuple(repr(key).encode())) & 0xFFFFFFFF:08x}.verdict", key


def _settled(found: tuple[int, ...] | None) -> bool:
    """probe.settled's rule: an identity that another write could keep is not cached."""
    return found is None or found[3] < found[4] or not paths.racy(found[3])


def read_signatures(path: str) -> list[Signature]:
    """The signatures a pull kept in the store (Store.write_signatures); none when the
    file is unreadable (then nothing verifies: refusal, never acceptance)."""
    import json

    from mesobox.image.sign import Signature

    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 22))
    except (OSError, ValueError):
        return []
    entries = doc.get("signatures") if isinstance(doc, dict) else None
    found = [Signature.from_json(raw) for raw in entries] if isinstance(entries, list) else []
    return [sig for sig in found if sig is not None]
