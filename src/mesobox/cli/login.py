"""Registry login verbs: login, logout.

Wiring only: read the user name and password (a prompt on a terminal, or stdin; never
the command line, which every user of the node sees in ps), check them against the
registry (image/registry.py), and store or remove them in the auth file podman uses
(image/auth.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mesobox.cli.usage import parse
from mesobox.config import Config
from mesobox.errors import AuthError, RegistryError, UsageError
from mesobox.image import auth


def main_login(argv: list[str], config: Config) -> int:
    parsed = parse("login", argv)
    if parsed is None:
        return 0
    values, (registry,) = parsed
    key = auth.registry_key(registry)
    if not key or key.startswith("/"):
        raise UsageError(f"bad registry {registry!r}", hint="give HOST[:PORT][/NAMESPACE], e.g. ghcr.io")
    creds = read_credentials(values)
    check_login(config, key, creds, bool(values.get("insecure")))
    path = auth.login_file(authfile=values.get("authfile"))
    auth.store_credentials(path, key, creds)
    sys.stdout.write(f"Login Succeeded: {key} (credentials in {path})\n")
    return 0


def read_credentials(values: dict[str, object]) -> tuple[str, str]:
    """(user, password) from -u and stdin, or asked for on the terminal."""
    if values.get("password") is not None:
        raise UsageError("a password on the command line is refused: every user of this node can read it in ps",
                         hint="type it at the prompt, or pipe it in with --password-stdin")
    user = str(values.get("username") or "")
    if values.get("password_stdin"):
        if not user:
            raise UsageError("--password-stdin needs -u USER")
        password = sys.stdin.read()
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not (sys.stdin.isatty() and os.isatty(sys.stderr.fileno())):
            raise UsageError("no terminal to ask for the password on",
                             hint="pipe it in: mesobox login -u USER --password-stdin REGISTRY")
        import getpass

        if not user:
            sys.stderr.write("Username: ")
            sys.stderr.flush()
            user = sys.stdin.readline().strip()
        password = getpass.getpass("Password: ")
    if not user or ":" in user:
        raise UsageError("the user name is empty or has a colon", hint="give it with -u USER")
    if not password:
        raise UsageError("the password is empty")
    return user, password


def check_login(config: Config, key: str, creds: tuple[str, str], insecure: bool) -> None:
    """GET /v2/ with the credentials, answering the registry's challenge as a pull does
    (Basic, or a token from its token service); AuthError when they are refused."""
    from mesobox.image.reference import parse_reference
    from mesobox.image.registry import RegistrySource

    host, _, namespace = key.partition("/")
    source = RegistrySource(parse_reference(f"{host}/{namespace or 'mesobox'}/login"), config,
                            insecure=insecure, credentials=creds)
    source.scope = ""  # /v2/ belongs to no repository: the token asked for names none
    try:
        resp = source.request("GET", "/v2/")
    except AuthError as err:
        raise AuthError(f"login to {key} failed: {err.message}",
                        hint="check the user name and password (or token)") from None
    status = resp.status
    resp.read_error()
    if status in (401, 403):
        raise AuthError(f"login to {key} failed: the registry refused the credentials (HTTP {status})",
                        hint="check the user name and password (or token)")
    if status != 200:
        raise RegistryError(f"{key}: /v2/ answered HTTP {status}: not a registry?")


def main_logout(argv: list[str], config: Config) -> int:
    parsed = parse("logout", argv)
    if parsed is None:
        return 0
    values, args = parsed
    everything = bool(values.get("all"))
    if everything == bool(args):
        raise UsageError("logout needs REGISTRY, or --all", hint="mesobox logout REGISTRY | mesobox logout --all")
    path = auth.login_file(authfile=values.get("authfile"))
    key = None if everything else auth.registry_key(args[0])
    gone = auth.remove_credentials(path, key)
    if everything:
        sys.stdout.write(f"removed the credentials of {len(gone)} registries from {path}\n")
        return 0
    if not gone:
        hint = None
        docker = auth.auth_files()[-1]
        if any(auth.registry_key(k) == key for k in _auths(docker)):
            hint = f"the credentials in {docker} are docker's: `docker logout {key}` removes them"
        raise UsageError(f"not logged in to {key} (in {path})", hint=hint)
    sys.stdout.write(f"Removed login credentials for {key} from {path}\n")
    return 0


def _auths(path: Path) -> dict[str, object]:
    auths = auth.read_auth_file(path).get("auths")
    return auths if isinstance(auths, dict) else {}
