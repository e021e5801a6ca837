"""Network room: loopback in a fresh network namespace, and user-mode networking.

Invariants:
- ``--net none``: the container gets a new network namespace (CLONE_NEWNET) with only
  ``lo``, brought up by ``setup_loopback`` so local services inside still work, and
  nothing of the host's network, not even the host's loopback.
- ``--net slirp``: ``slirp4netns`` (run by the caller, outside the container) attaches
  a tap device inside the namespace and NATs it through ordinary sockets of the
  invoking user, so it needs no privilege beyond opening ``/dev/net/tun``.  The host's
  loopback is reachable from inside as the gateway 10.0.2.2 (slirp4netns default;
  ``--disable-host-loopback`` is not passed, on purpose: HPC jobs talk to licence
  servers and proxies on the node's loopback).
- Published ports (``-p HOST:CONTAINER``) are added through slirp4netns's API socket
  (``add_hostfwd``), and they go away with the slirp4netns process.
Stdlib only (socket, fcntl, struct, subprocess, json): this is on the ``run`` path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mesobox.errors import LaunchError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16

SLIRP_GATEWAY = "10.0.2.2"
SLIRP_GUEST = "10.0.2.100"
SLIRP_DNS = "10.0.2.3"


def setup_loopback() -> None:
    """Bring ``lo`` up in the current (fresh) network namespace: netdevice(7) ioctls."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # struct ifreq { char ifr_name[IFNAMSIZ]; short ifr_flags; ... } (40 bytes on 64-bit)
        request = struct.pack("16sH22x", b"lo", 0)
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request)
            flags = struct.unpack("16sH22x", answer)[1]
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
        except OSError as err:
            raise LaunchError(
                f"cannot bring up the loopback interface: {err.strerror}",
                hint="this needs CAP_NET_ADMIN in the container's network namespace (a user namespace owning it)",
            ) from None


def parse_publish(spec: str) -> tuple[int, int]:
    """``-p 8080:80`` → (8080, 80): host port, container port (TCP)."""
    host, sep, guest = spec.removesuffix("/tcp").partition(":")
    ports = []
    for text in (host, guest):
        if not sep or not text.isdigit() or not 1 <= int(text) <= 65535:
            raise UsageError(f"bad port mapping {spec!r}", hint="use -p HOSTPORT:CONTAINERPORT, e.g. -p 8080:80")
        ports.append(int(text))
    return ports[0], ports[1]


def _tun_hint() -> str:
    return (
        "slirp4netns needs /dev/net/tun readable and writable by you (mode 0666, as Debian and RHEL ship it); "
        "ask the admin to `chmod 666 /dev/net/tun`, or use --net none / --net host"
    )


class Slirp:
    """A running slirp4netns attached to a container's network namespace."""

    def __init__(self, process: subprocess.Popen[bytes], exit_fd: int, api_socket: Path, log: Path) -> None:
        self.process = process
        self._exit_fd = exit_fd
        self.api_socket = api_socket
        self.log = log

    @classmethod
    def start(
        cls,
        pid: int,
        port_maps: list[tuple[int, int]],
        *,
        state_dir: Path | None = None,
        mtu: int = 65520,
        host_addr: str = "0.0.0.0",  # noqa: S104 - Docker/Podman publish on all addresses
        timeout: float = 10.0,
    ) -> Slirp:
        """Run ``slirp4netns --configure`` for ``pid``'s namespaces and publish ports."""
        import shutil
        import subprocess
        import tempfile

        if shutil.which("slirp4netns") is None:
            raise LaunchError("--net slirp needs slirp4netns, which is not installed", hint="install slirp4netns")
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            # slirp4netns would only say "child failed(1)"; name the cause ourselves.
            raise LaunchError("--net slirp: /dev/net/tun is not accessible to you", hint=_tun_hint())
        workdir = Path(tempfile.mkdtemp(prefix="mesobox-slirp-", dir=state_dir))
        api, log = workdir / "api.sock", workdir / "slirp4netns.log"
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        argv = ["slirp4netns", "--configure", f"--mtu={mtu}", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}"]
        argv += [f"--api-socket={api}", str(pid), "tap0"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, pass_fds=(ready_w, exit_r), start_new_session=True)
        os.close(ready_w)
        os.close(exit_r)
        slirp = cls(proc, exit_w, api, log)
        try:
            slirp._wait_ready(ready_r, timeout)
            for host_port, guest_port in port_maps:
                slirp.add_hostfwd(host_port, guest_port, host_addr)
        except BaseException:
            slirp.stop()
            raise
        finally:
            os.close(ready_r)
        return slirp

    def _wait_ready(self, ready_r: int, timeout: float) -> None:
        import select

        # slirp4netns writes "1" to --ready-fd once tap0 is configured (slirp4netns(1)).
        readable, _, _ = select.select([ready_r], [], [], timeout)
        if readable and os.read(ready_r, 1) == b"1":
            return
        self.process.poll()
        detail = self.log.read_text(errors="replace").strip().splitlines()
        # The first line names the cause; the last is usually just "child failed(1)".
        reason = detail[0] if detail else f"no answer within {timeout:.0f} s"
        hint = _tun_hint() if "tun" in reason.lower() else "see the slirp4netns message above"
        raise LaunchError(f"slirp4netns failed: {reason}", hint=hint)

    def api(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request on slirp4netns's JSON API socket."""
        import json
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.api_socket))
            sock.sendall(json.dumps(request).encode())
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        answer: dict[str, Any] = json.loads(data or b"{}")
        return answer

    def add_hostfwd(self, host_port: int, guest_port: int, host_addr: str = "0.0.0.0") -> None:  # noqa: S104
        answer = self.api(
            {
                "execute": "add_hostfwd",
                "arguments": {"proto": "tcp", "host_addr": host_addr, "host_port": host_port, "guest_port": guest_port},
            }
        )
        if "error" in answer:
            message = answer["error"].get("desc", answer["error"]) if isinstance(answer["error"], dict) else answer
            raise LaunchError(
                f"cannot publish port {host_port}:{guest_port}: {message}",
                hint="the host port may be in use; pick another with -p",
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Closing the exit fd makes slirp4netns exit (slirp4netns(1), --exit-fd)."""
        if self._exit_fd >= 0:
            os.close(self._exit_fd)
            self._exit_fd = -1
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        import shutil

        shutil.rmtree(self.api_socket.parent, ignore_errors=True)
