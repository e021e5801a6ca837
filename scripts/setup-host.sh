#!/bin/bash
# Install what mesobox and its tests need on a fresh Debian 12 machine (run as root).
#   - Debian packages: the system tools mesobox builds on, the peers the benches
#     compare with, and the real services the tests talk to;
#   - /opt/mesobox/venv: a venv on Debian's /usr/bin/python3, which every user can
#     execute (a python3 built under a mode-700 /root would not be);
#   - /dev/fuse and /dev/net/tun usable by ordinary users, as on a normal distribution.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    python3 python3-venv python3-pip
    squashfs-tools squashfuse fuse3 fuse-overlayfs slirp4netns uidmap
    docker-registry skopeo umoci busybox-static debootstrap zstd
    iproute2 util-linux e2fsprogs libseccomp2 procps psmisc openssl hostname curl tar criu
    runc podman charliecloud-runtime charliecloud-builders python3-lark python3-requests hyperfine
    slurm-wlm munge libpmix-dev openmpi-bin libopenmpi-dev
    gcc libc6-dev   # mpicc (tests build MPI programs); a fresh Debian 12 has no compiler
    libmpich12   # --mpi host with the MPICH ABI (the library only: mpich/libmpich-dev would take the mpicc/mpirun alternatives)
    groff-base man-db zsh   # tests render the generated man pages and parse the zsh completion
    fuse2fs   # an ordinary user's --overlay FILE: the ext4 image served in user space (launch/fuseoverlay.py)
    chromium   # tests render the HTML reports of matrix/bench headless (screenshot, DOM)
    rpm   # tests build a real sqlite rpmdb and cross-check rpm's version order (mesobox scan)
    apache2-utils   # htpasswd: tests/test_login.py's registry with Basic auth (bcrypt)
    tinyproxy   # a real forward proxy for tests/test_registry_proxy.py (HTTPS_PROXY, NO_PROXY)
)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The packages' own services are not wanted: tests start their own instances.
for svc in docker-registry slurmctld slurmd munge tinyproxy; do
    (systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1) || true
done

[ -e /dev/fuse ] && chmod 666 /dev/fuse
[ -e /dev/net/tun ] && chmod 666 /dev/net/tun

VENV=/opt/mesobox/venv
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/pip" install -q ".[test]"
chmod -R a+rX /opt/mesobox
# A start-up-lean entry point: `python -IS` (one shebang argument) skips site processing (≈5 ms per rank);
# the venv's site-packages is put on sys.path by hand.  `$VENV/bin/mesobox` (the script
# pip installs from bin/mesobox) stays as the ordinary entry point.
PURELIB=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f /usr/local/bin/mesobox
cat > /usr/local/bin/mesobox <<PY
#!$VENV/bin/python -IS
import sys
sys.path.append("$PURELIB")
from mesobox.cli import main
sys.exit(main())
PY
chmod 755 /usr/local/bin/mesobox
# Shell completion and man pages, generated from the option table (src/mesobox/cli/table.py).
install -d /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions /usr/share/man/man1
/usr/local/bin/mesobox completion bash > /usr/share/bash-completion/completions/mesobox
/usr/local/bin/mesobox completion zsh > /usr/share/zsh/vendor-completions/_mesobox
/usr/local/bin/mesobox manpage > /usr/share/man/man1/mesobox.1
for verb in $(/usr/local/bin/mesobox manpage --list); do
    /usr/local/bin/mesobox manpage "$verb" > "/usr/share/man/man1/mesobox-$verb.1"
done
echo "setup-host: ok ($(/usr/local/bin/mesobox --version))"
