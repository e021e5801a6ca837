"""Registry authentication: credential files, WWW-Authenticate challenges, bearer tokens.

Room: image/auth.  Invariants:
- Credentials are read, in order, from ``$REGISTRY_AUTH_FILE``, mesobox's own
  ``$XDG_CONFIG_HOME/mesobox/auth.json`` and ``~/.docker/config.json`` (the ``auths``
  map with base64 ``user:password`` in ``auth``, containers-auth.json(5)); the first
  file with an entry for the registry wins.  Docker Hub's key is
  ``https://index.docker.io/v1/``.
- A token is cached per scope and never sent to another host than the one it was
  issued for (the caller drops Authorization on cross-host redirects).
- Secrets never appear in error messages.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mesobox.errors import AuthError, ConfigError

HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
AUTH_HINT = "log in: put credentials for the registry in ~/.docker/config.json (\"auths\") or $REGISTRY_AUTH_FILE"

# fetch(url, basic_header_or_None) -> (status, body bytes)
TokenFetcher = Callable[[str, "str | None"], tuple[int, bytes]]


def auth_files(env: dict[str, str] | None = None) -> list[Path]:
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    xdg = env.get("XDG_CONFIG_HOME")
    config_home = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".config"
    files.append(config_home / "mesobox" / "auth.json")
    files.append(home / ".docker" / "config.json")
    return files


def _normalise_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    return "docker.io" if key in ("index.docker.io", "registry-1.docker.io") else key


def _entry_credentials(entry: object, path: Path) -> tuple[str, str] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str) or not entry["auth"]:
        return None
    try:
        user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path}: an \"auth\" entry is not base64 of user:password") from None
    return (user, password) if sep else None


def find_credentials(registry: str, repository: str = "", env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for ``registry`` (most specific ``registry/namespace`` key first)."""
    wanted = [f"{registry}/{repository}"] if repository else []
    parts = repository.split("/")
    wanted += [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts) - 1, 0, -1)]
    wanted.append(registry)
    for path in auth_files(env):
        auths = _read_auths(path)
        by_key = {_normalise_key(k): v for k, v in auths.items()}
        for key in wanted:
            creds = _entry_credentials(by_key.get(key), path)
            if creds:
                return creds
    return None


def _read_auths(path: Path) -> dict[str, object]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    return auths if isinstance(auths, dict) else {}


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
                 env: dict[str, str] | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self._fetch = fetch
        self._env = env
        self._creds: tuple[str, str] | None = None
        self._creds_loaded = False
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
