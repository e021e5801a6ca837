"""network: --net none isolates, --net slirp reaches the host through 10.0.2.2, -p publishes.

All namespace work happens in programs run as the ordinary test user (the rootless path);
the host services they try to reach are plain TCP servers on the host's loopback run by
the test itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, need_tool
from isolation_support import run_program, tcp_service, write_program
from mesobox.errors import UsageError
from mesobox.isolation.network import parse_publish

TUN = Path("/dev/net/tun")


@pytest.fixture()
def host_service() -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1 that answers b"host-service"."""
    with tcp_service(b"host-service") as port:
        yield port


@contextlib.contextmanager
def tun_mode(mode: int) -> Iterator[None]:
    """Set /dev/net/tun's mode for one test, then put it back."""
    before = stat.S_IMODE(os.stat(TUN).st_mode)
    os.chmod(TUN, mode)
    try:
        yield
    finally:
        os.chmod(TUN, before)


NET_NONE = """
import errno
host_port = int(sys.argv[1])
map_ids(0)
result = {}

def try_connect(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            return c.recv(100).decode()
    except OSError as e:
        return errno_name(e)

def errno_name(e):
        return errno.errorcode.get(e.errno, str(e))

early = socket.socket()
early.bind(("127.0.0.1", 0))
early.listen()
result["before_lo_up"] = try_connect(early.getsockname()[1])
from mesobox.isolation.network import setup_loopback
setup_loopback()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
inner_port = srv.getsockname()[1]
import threading
threading.Thread(target=lambda: srv.accept()[0].sendall(b"inside"), daemon=True).start()
result["inside"] = try_connect(inner_port)
result["host"] = try_connect(host_port)
print(json.dumps(result))
"""


@pytest.mark.userns
def test_net_none_has_working_lo_and_no_host(user, test_python, mesobox_src, world_tmp, host_service) -> None:  # type: ignore[no-untyped-def]
    program = write_program(world_tmp, "net_none.py", NET_NONE)
    proc, result = run_program(test_python, mesobox_src, program, str(host_service), user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    assert result["before_lo_up"] == "ENETUNREACH"  # lo starts down in a new netns
    assert result["inside"] == "inside"
    assert result["host"] == "ECONNREFUSED"  # the host's loopback service is not visible
    with socket.create_connection(("127.0.0.1", host_service), timeout=2) as c:
        assert c.recv(100) == b"host-service"  # …though it is up on the host


SLIRP = """
host_port, pub_port = int(sys.argv[1]), int(sys.argv[2])
to_parent_r, to_parent_w = os.pipe()
to_child_r, to_child_w = os.pipe()
pid = os.fork()
if pid == 0:
    map_ids(0)
    os.write(to_parent_w, b"n")          # namespaces exist
    os.read(to_child_r, 1)               # slirp4netns configured tap0
    srv = socket.socket()
    srv.bind(("0.0.0.0", 8080))
    srv.listen()
    try:
        with socket.create_connection(("10.0.2.2", host_port), timeout=5) as c:
            got = c.recv(100).decode()
    except OSError as e:
        got = "error " + str(e)
    os.write(to_parent_w, json.dumps(got).encode() + b"\\n")
    srv.settimeout(10)
    conn, _ = srv.accept()
    conn.sendall(b"published")
    conn.close()
    os._exit(0)
from mesobox.errors import LaunchError
from mesobox.isolation.network import Slirp
os.read(to_parent_r, 1)
try:
    slirp = Slirp.start(pid, [(pub_port, 8080)])
except LaunchError as err:
    os.kill(pid, 9)
    print(json.dumps({"error": err.message, "hint": err.hint}))
    sys.exit(0)
os.write(to_child_w, b"g")
reader = os.fdopen(to_parent_r)
result = {"gateway": json.loads(reader.readline())}
with socket.create_connection(("127.0.0.1", pub_port), timeout=5) as c:
    result["published"] = c.recv(100).decode()
result["child_status"] = os.waitpid(pid, 0)[1]
slirp.stop()
result["slirp_exit"] = slirp.process.returncode
result["socket_removed"] = not slirp.api_socket.exists()
print(json.dumps(result))
"""


def _run_slirp(test_python: str, mesobox_src: Path, world_tmp: Path, host_port: int, user: Any) -> dict[str, Any]:
    need_tool("slirp4netns")
    program = write_program(world_tmp, "slirp.py", SLIRP)
    proc, result = run_program(test_python, mesobox_src, program, str(host_port), str(free_port()), user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    return result


def _assert_slirp_works(result: dict[str, Any]) -> None:
    assert result.get("gateway") == "host-service", result  # host loopback via 10.0.2.2
    assert result["published"] == "published"  # -p HOSTPORT:8080 reaches the container
    assert result["child_status"] == 0
    assert result["slirp_exit"] == 0 and result["socket_removed"]


@pytest.mark.userns
def test_slirp_as_user_with_tun_0666(user, test_python, mesobox_src, world_tmp, host_service) -> None:  # type: ignore[no-untyped-def]
    with tun_mode(0o666):  # what Debian/RHEL ship; CI must do the same (.ci/run)
        _assert_slirp_works(_run_slirp(test_python, mesobox_src, world_tmp, host_service, user))


@pytest.mark.userns
def test_slirp_as_user_without_tun_access_says_why(user, test_python, mesobox_src, world_tmp, host_service) -> None:  # type: ignore[no-untyped-def]
    with tun_mode(0o600):  # as some hosts ship it: root-only
        result = _run_slirp(test_python, mesobox_src, world_tmp, host_service, user)
    assert result["error"] == "--net slirp: /dev/net/tun is not accessible to you"
    assert "chmod 666 /dev/net/tun" in result["hint"]


@pytest.mark.root
def test_slirp_as_root(test_python, mesobox_src, world_tmp, host_service) -> None:  # type: ignore[no-untyped-def]
    _assert_slirp_works(_run_slirp(test_python, mesobox_src, world_tmp, host_service, None))


def test_parse_publish() -> None:
    assert parse_publish("8080:80") == (8080, 80)
    assert parse_publish("8080:80/tcp") == (8080, 80)


@pytest.mark.parametrize("spec", ["80", "a:80", "8080:", "0:80", "8080:70000", "1.2.3.4:80:80", "8080:80/udp"])
def test_parse_publish_rejects(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_publish(spec)
