"""Registry authentication: credential files, credential helpers, WWW-Authenticate
challenges, bearer tokens; and the files ``mesobox login``/``logout`` write.

Room: image/auth.  Invariants:
- Credentials are read from the files podman and docker use, in this order, the first
  file with an answer for the registry winning (containers-auth.json(5)):
  ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json`` (where ``podman
  login`` and ``mesobox login`` write), ``$XDG_CONFIG_HOME/containers/auth.json``,
  mesobox's older ``$XDG_CONFIG_HOME/mesobox/auth.json`` and ``~/.docker/config.json``.
  In each: ``credHelpers[registry]``, then ``auths`` (base64 ``user:password`` in
  ``auth``; the most specific ``registry/namespace`` key first), then ``credsStore``.
  Docker Hub's keys (``https://index.docker.io/v1/``, ``docker.io``…) are one.
- A file is read only when it is a regular file owned by the caller and writable by
  no one else: a file another user planted (a shared ``$REGISTRY_AUTH_FILE``, a home
  read by root) must not choose the credentials or the helper program.  Such a file
  is one warning and is skipped.
- A credential helper is ``docker-credential-NAME get`` (NAME without a slash, found
  on PATH), given the server on stdin, answering ``{"Username", "Secret"}``.  A helper
  that is missing, fails, hangs or answers nonsense is one warning and anonymous
  access, never a crash; "credentials not found" is simply no credentials.
- A token is cached per scope and never sent to another host than the one it was
  issued for (the caller drops Authorization on cross-host redirects).
- Secrets never appear in error messages or warnings.
- ``store_credentials``/``remove_credentials`` change only the ``auths`` entry of one
  registry, keep everything else in the file, and replace it atomically, mode 0600 in a
  0700 directory.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesobox.errors import AuthError, ConfigError

HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
HUB_SERVER = "https://index.docker.io/v1/"  # what docker hands a credential helper for Docker Hub
AUTH_HINT = "log in with `mesobox login REGISTRY` (or put credentials in ~/.docker/config.json or $REGISTRY_AUTH_FILE)"
HELPER_TIMEOUT = 30.0  # seconds a credential helper may take (a keyring may ask for a passphrase)
HELPER_PREFIX = "docker-credential-"

# fetch(url, basic_header_or_None) -> (status, body bytes)
TokenFetcher = Callable[[str, "str | None"], tuple[int, bytes]]


def auth_files(env: dict[str, str] | None = None) -> list[Path]:
    """Where credentials are looked for, in order (module docstring)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        files.append(Path(runtime) / "containers" / "auth.json")
    config_home = _config_home(env, home)
    files.append(config_home / "containers" / "auth.json")
    files.append(config_home / "mesobox" / "auth.json")
    files.append(home / ".docker" / "config.json")
    return files


def _config_home(env: dict[str, str], home: Path) -> Path:
    xdg = env.get("XDG_CONFIG_HOME")
    return Path(xdg) if xdg and os.path.isabs(xdg) else home / ".config"


def login_file(env: dict[str, str] | None = None, authfile: str | None = None) -> Path:
    """Where ``mesobox login`` writes (and ``logout`` removes): ``--authfile``, else
    ``$REGISTRY_AUTH_FILE``, else podman's ``$XDG_RUNTIME_DIR/containers/auth.json``, else
    (no runtime directory: a batch node) ``$XDG_CONFIG_HOME/containers/auth.json``."""
    env = dict(os.environ) if env is None else env
    if authfile:
        return Path(authfile).absolute()
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"]).absolute()
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "containers" / "auth.json"
    return _config_home(env, Path(env.get("HOME") or os.path.expanduser("~"))) / "containers" / "auth.json"


def registry_key(text: str) -> str:
    """The key a registry's credentials are stored and found under: ``host[:port][/namespace]``,
    without a scheme or a trailing slash; every name of Docker Hub is ``docker.io``."""
    key = text.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    host, sep, rest = key.partition("/")
    host = host.lower()
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = "docker.io"
    return host + sep + rest


_normalise_key = registry_key


def _entry_credentials(entry: object, path: Path) -> tuple[str, str] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str) or not entry["auth"]:
        return None
    try:
        user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path}: an \"auth\" entry is not base64 of user:password") from None
    return (user, password) if sep else None


def find_credentials(registry: str, repository: str = "", env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for ``registry`` (module docstring: files, keys and helpers in order)."""
    wanted = [f"{registry}/{repository}"] if repository else []
    parts = repository.split("/")
    wanted += [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts) - 1, 0, -1)]
    wanted.append(registry)
    wanted = [registry_key(key) for key in wanted]
    for path in auth_files(env):
        doc = read_auth_file(path, env)
        if not doc:
            continue
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            by_key = {registry_key(k): v for k, v in helpers.items()}
            name = by_key.get(registry_key(registry))
            if isinstance(name, str) and name:
                return helper_credentials(name, registry, path, env)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            by_key = {registry_key(k): v for k, v in auths.items()}
            for key in wanted:
                creds = _entry_credentials(by_key.get(key), path)
                if creds:
                    return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            creds = helper_credentials(store, registry, path, env)
            if creds:
                return creds
    return None


def read_auth_file(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object in an auth file; {} when there is none, or (with one warning) when
    it is not the caller's own (module docstring).  ConfigError when it is not JSON."""
    data = _own_file_bytes(path)
    if data is None:
        return {}
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    return doc if isinstance(doc, dict) else {}


def _own_file_bytes(path: Path) -> bytes | None:
    """The bytes of ``path`` when it is a regular file owned by the caller that no one else
    may write; None when it is missing or (with a warning) not trusted."""
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the pull
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            _distrust(path, "it is not a regular file")
            return None
        if st.st_uid != os.geteuid():
            _distrust(path, f"it belongs to uid {st.st_uid}, not to you")
            return None
        if st.st_mode & 0o022:
            _distrust(path, "others may write it (chmod go-w it)")
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 16 << 20:
                raise ConfigError(f"{path}: over 16 MiB, not an auth file")
        return b"".join(chunks)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    finally:
        os.close(fd)


def _distrust(path: Path, why: str) -> None:
    from mesobox.console import warn

    warn(f"ignoring the credentials in {path}: {why}")


def helper_server(registry: str) -> str:
    """The server name a credential helper is asked about (docker's convention)."""
    return HUB_SERVER if registry_key(registry) == "docker.io" else registry_key(registry)


def helper_credentials(name: str, registry: str, path: Path, env: dict[str, str] | None = None,
                       ) -> tuple[str, str] | None:
    """``docker-credential-NAME get`` for ``registry``: (user, secret), or None (with a
    warning when the helper is missing or fails; silently when it has no credentials)."""
    import shutil
    import subprocess

    from mesobox.console import warn

    anonymous = f"going on without credentials for {registry_key(registry)}"
    if "/" in name or "\x00" in name or name.startswith(".") or len(name) > 100:
        warn(f"{path}: credential helper name {name[:40]!r} is not a program name; {anonymous}")
        return None
    program = HELPER_PREFIX + name
    search = (env or os.environ).get("PATH", os.defpath)
    found = shutil.which(program, path=search)
    if found is None:
        warn(f"credential helper {program} (named in {path}) is not on PATH; {anonymous}")
        return None
    try:
        proc = subprocess.run([found, "get"], input=helper_server(registry).encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        warn(f"credential helper {program} gave no answer within {HELPER_TIMEOUT:.0f} s; {anonymous}")
        return None
    except OSError as err:
        warn(f"credential helper {program} could not run: {err.strerror}; {anonymous}")
        return None
    said = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        if "credentials not found" in said.lower():
            return None
        first = (said.strip().splitlines() or ["no message"])[0][:200]
        warn(f"credential helper {program} failed (exit {proc.returncode}: {first}); {anonymous}")
        return None
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        warn(f"credential helper {program} answered something other than {{\"Username\", \"Secret\"}}; "
             f"{anonymous}")
        return None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        warn(f"credential helper {program} answered no usable Username and Secret; {anonymous}")
        return None
    if user == "<token>":
        warn(f"credential helper {program} holds an identity token, which mesobox cannot use; {anonymous}")
        return None
    return user, secret


# --- mesobox login / logout ------------------------------------------------------------


def store_credentials(path: Path, key: str, creds: tuple[str, str]) -> None:
    """Put ``creds`` for ``key`` into the auth file ``path`` (made, mode 0600, with its
    directory 0700 when missing), keeping every other entry."""
    doc = _writable_doc(path, create=True)
    auths = doc.get("auths")
    auths = dict(auths) if isinstance(auths, dict) else {}
    for old in [k for k in auths if registry_key(k) == key]:
        del auths[old]
    auths[key] = {"auth": base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()}
    doc["auths"] = auths
    _write_doc(path, doc)


def remove_credentials(path: Path, key: str | None) -> list[str]:
    """Remove the entries of ``key`` (None: every registry's) from ``auths`` in ``path``;
    returns the keys removed."""
    doc = _writable_doc(path, create=False)
    auths = doc.get("auths")
    auths = dict(auths) if isinstance(auths, dict) else {}
    gone = [k for k in auths if key is None or registry_key(k) == key]
    if gone:
        for old in gone:
            del auths[old]
        doc["auths"] = auths
        _write_doc(path, doc)
    return gone


def _writable_doc(path: Path, create: bool) -> dict[str, Any]:
    """The auth file's JSON object to update; ConfigError when it is not the caller's own
    or not JSON (it is never replaced then: nothing of it is lost)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if create:
            _make_private_parents(path.parent)
        return {}
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"{path} is not a file of your own that only you may write: not changing it",
                          hint="remove it, or name another file with --authfile")
    data = _own_file_bytes(path) or b"{}"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON: {err}", hint="fix or remove the file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a JSON object", hint="fix or remove the file")
    return doc


def _make_private_parents(directory: Path) -> None:
    """Make the missing directories down to ``directory``, mode 0700 (credentials live there)."""
    missing = []
    here = directory
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    for path in reversed(missing):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # past the umask


def _write_doc(path: Path, doc: dict[str, Any]) -> None:
    from mesobox.files import write_atomic

    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600, durable=True)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="a,b"`` → ("bearer", {...}) (RFC 7235 §2.1)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().strip(",").strip().lower()
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            end = i + 1
            value = []
            while end < len(rest) and rest[end] != '"':
                if rest[end] == "\\" and end + 1 < len(rest):
                    end += 1
                value.append(rest[end])
                end += 1
            params[key] = "".join(value)
            i = end + 1
        else:
            end = rest.find(",", i)
            end = len(rest) if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
        while i < len(rest) and rest[i] in ", ":
            i += 1
    return scheme.lower(), params


def basic_header(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


class Authenticator:
    """Answers 401 challenges for one registry and remembers the result per scope."""

    def __init__(self, registry: str, repository: str, fetch: TokenFetcher,
                 env: dict[str, str] | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self._fetch = fetch
        self._env = env
        self._creds: tuple[str, str] | None = credentials
        self._creds_loaded = credentials is not None  # given: `mesobox login` checks them
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def credentials(self) -> tuple[str, str] | None:
        if not self._creds_loaded:
            self._creds = find_credentials(self.registry, self.repository, self._env)
            self._creds_loaded = True
        return self._creds

    def header(self, scope: str) -> str | None:
        """The Authorization value to send for ``scope`` now, if any is known."""
        with self._lock:
            if self._basic and self._creds:
                return basic_header(self._creds)
            token = self._tokens.get(scope)
            if token and token[1] > time.monotonic():
                return "Bearer " + token[0]
        return None

    def answer(self, challenge: str | None, scope: str) -> None:
        """Obtain what ``challenge`` asks for; AuthError when that is impossible."""
        scheme, params = parse_challenge(challenge or "")
        with self._lock:
            if scheme == "basic":
                if self.credentials() is None:
                    raise AuthError(f"{self.registry} requires a login (Basic auth) and no credentials were found",
                                    hint=AUTH_HINT)
                self._basic = True
                return
            if scheme != "bearer" or not params.get("realm"):
                raise AuthError(f"{self.registry} answered 401 without a usable challenge ({scheme or 'none'})",
                                hint=AUTH_HINT)
            self._tokens[scope] = self._token(params, scope)

    def _token(self, params: dict[str, str], scope: str) -> tuple[str, float]:
        from urllib.parse import urlencode

        query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope") or scope)) if v}
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        creds = self.credentials()
        status, body = self._fetch(url, basic_header(creds) if creds else None)
        if status in (401, 403):
            raise AuthError(f"token service of {self.registry} refused the credentials (HTTP {status})",
                            hint=AUTH_HINT)
        if status != 200:
            raise AuthError(f"token service of {self.registry} answered HTTP {status}", hint=AUTH_HINT)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"token service of {self.registry} sent no JSON token") from None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token service of {self.registry} sent no token")
        # distribution token spec: expires_in defaults to 60 s; renew a little early.
        return token, time.monotonic() + max(lifetime - 5, 1)
