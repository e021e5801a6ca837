#!/bin/bash
# The README's main job, end to end on a fresh Debian 12 machine (run as root):
# install mesobox, build a small image locally (busybox + umoci), serve it from a
# real docker-registry on loopback, then — as an ordinary user, with no setuid helper
# and no daemon — pull it and run containers from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh

DEMO_USER=${DEMO_USER:-mbdemo}
id "$DEMO_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$DEMO_USER"
WORK=$(mktemp -d /tmp/mesobox-demo.XXXXXX)
chmod 755 "$WORK"
mkdir "$WORK/store" && chown "$DEMO_USER" "$WORK/store"
trap 'kill $REG_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "== building a busybox image with umoci"
umoci init --layout "$WORK/layout"
umoci new --image "$WORK/layout:latest"
umoci unpack --image "$WORK/layout:latest" "$WORK/bundle" >/dev/null
R="$WORK/bundle/rootfs"
mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/root" "$R/home"
cp /bin/busybox "$R/bin/busybox"
for applet in $(/bin/busybox --list); do [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
printf '#!/bin/sh\necho "hello from a mesobox container: $(uname -s) uid=$(id -u) image=$GREETING"\n' > "$R/bin/hello"
chmod 755 "$R/bin/hello"
umoci repack --image "$WORK/layout:latest" "$WORK/bundle" >/dev/null
umoci config --image "$WORK/layout:latest" --config.cmd=/bin/hello --config.env=GREETING=busybox-demo

echo "== serving it from a local docker-registry"
PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $WORK/registry}}
http: {addr: 127.0.0.1:$PORT}
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy -q --dest-tls-verify=false "oci:$WORK/layout:latest" "docker://127.0.0.1:$PORT/demo/busybox:latest"

# From the user's home: a checkout under /root is not reachable by them (mesobox would
# only warn and start the container in $HOME, but the demo shows the plain path).
DEMO_HOME=$(getent passwd "$DEMO_USER" | cut -d: -f6)
as_user() { runuser -u "$DEMO_USER" -- env -i -C "$DEMO_HOME" HOME="$DEMO_HOME" \
    USER="$DEMO_USER" PATH=/usr/local/bin:/usr/bin:/bin MESOBOX_STORE="$WORK/store" "$@"; }
IMAGE="127.0.0.1:$PORT/demo/busybox:latest"
echo "== as $DEMO_USER: mesobox pull $IMAGE"
as_user mesobox pull "$IMAGE"
as_user mesobox images
echo "== as $DEMO_USER: mesobox run $IMAGE"
as_user mesobox run "$IMAGE"
echo "== as $DEMO_USER: mesobox exec $IMAGE id"
as_user mesobox exec "$IMAGE" id
echo "== demo ok"
