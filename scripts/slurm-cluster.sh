#!/bin/bash
# A real two-node Slurm 22.05 cluster on one machine, for mesobox's tests and demos.
#
#   scripts/slurm-cluster.sh start|stop|status      (as root)
#
# Layout (all addresses live only in namespaces this script creates):
#   root namespace : bridge mb-br0 10.77.0.1/24, munged, slurmctld (submit host)
#   netns mb-n1    : veth 10.77.0.11/24, slurmd -N n1
#   netns mb-n2    : veth 10.77.0.12/24, slurmd -N n2
# slurmd enters only the node's network namespace (nsenter --net): `ip netns exec` would
# remount /sys and hide /sys/fs/cgroup, which slurmd's cgroup plugin needs.  Each slurmd
# also gets its own UTS namespace with hostname n1/n2: MPI libraries decide which ranks
# share a node by hostname, and two "nodes" both called $(hostname) make Open MPI hang.
# Each node has its own spool, TmpFS and log under $STATE/<node>.  The config is
# written to $STATE/slurm.conf and /etc/slurm/slurm.conf is a symlink to it, so every
# user (and every slurmd) sees the same file without SLURM_CONF.
# Recipe that works on one Debian 12 machine: SlurmUser=root, proctrack/linuxproc, task/none,
# cons_tres with CR_Core_Memory, ReturnToService=2.  `srun --mpi=pmix` needs
# libpmix-dev (slurm's mpi_pmix plugin dlopens libpmix.so; without it slurmd hangs).
# start is idempotent: a running, idle cluster with the same config is left alone.
set -euo pipefail
STATE=${MESOBOX_SLURM_STATE:-/tmp/mesobox-slurm}
NODES=(n1 n2)
declare -A ADDR=([n1]=10.77.0.11 [n2]=10.77.0.12)
CTL_ADDR=10.77.0.1
BRIDGE=mb-br0
PACKAGES=(slurm-wlm munge libpmix-dev iproute2)

log() { echo "slurm-cluster: $*" >&2; }

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages' own services would fight ours for the ports: stop them.
    for svc in slurmctld slurmd munge; do
        (systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1) || true
    done
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
        log "munged did not come up"; exit 1
    fi
}

setup_network() {
    # sysctl-free: a bridge in the root namespace and one veth pair per node.
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    [[ $(ip addr show dev "$BRIDGE") == *"$CTL_ADDR/"* ]] || ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local node
    for node in "${NODES[@]}"; do
        local ns=mb-$node host_if=mb-$node-h
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! ip link show "$host_if" >/dev/null 2>&1; then
            ip link add "$host_if" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$host_if" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        [[ $(ip -n "$ns" addr show dev eth0) == *"${ADDR[$node]}/"* ]] || ip -n "$ns" addr add "${ADDR[$node]}/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

write_config() {
    local host conf=$STATE/slurm.conf.new node
    host=$(hostname -s)
    mkdir -p "$STATE/ctld"
    for node in "${NODES[@]}"; do mkdir -p "$STATE/$node/spool" "$STATE/$node/tmp"; chmod 1777 "$STATE/$node/tmp"; done
    chmod 755 "$STATE"
    cat >"$conf" <<CONF
# Written by mesobox scripts/slurm-cluster.sh: a two-node test cluster.
ClusterName=mesobox
SlurmctldHost=$host($CTL_ADDR)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/ctld/slurmctld.pid
SlurmctldLogFile=$STATE/ctld/slurmctld.log
SlurmdSpoolDir=$STATE/%n/spool
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmdLogFile=$STATE/%n/slurmd.log
TmpFS=$STATE/%n/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
# Jobs take 100 MB per CPU unless they ask: without it a job gets the whole node's
# memory (CR_Core_Memory) and concurrent jobs serialize instead of sharing nodes.
DefMemPerCPU=100
# Walltime signals are tested with short limits: check them every few seconds.
MessageTimeout=10
NodeName=n1 NodeAddr=${ADDR[n1]} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=${ADDR[n2]} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=FORCE State=UP
CONF
    local changed=1
    if [ -f "$STATE/slurm.conf" ] && cmp -s "$conf" "$STATE/slurm.conf"; then changed=0; fi
    mv "$conf" "$STATE/slurm.conf"
    chmod 644 "$STATE/slurm.conf"
    mkdir -p /etc/slurm
    ln -sfn "$STATE/slurm.conf" /etc/slurm/slurm.conf
    return $changed
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
    pid_alive "$STATE/ctld/slurmctld.pid" || /usr/sbin/slurmctld
    local node
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/$node/slurmd.pid" || nsenter --net="/run/netns/mb-$node" \
            unshare --uts sh -c 'hostname "$1" && exec /usr/sbin/slurmd -N "$1"' slurmd "$node"
    done
}

wait_idle() {
    local _
    for _ in $(seq 100); do
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)" = "${#NODES[@]}" ]; then
            return 0
        fi
        sleep 0.2
    done
    log "nodes did not become idle:"; sinfo -N >&2 || true
    exit 1
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$STATE"/*/slurmd.pid "$STATE/ctld/slurmctld.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

cmd_start() {
    install_packages
    start_munge
    setup_network
    if ! write_config; then
        log "configuration changed: restarting the daemons"
        stop_daemons
    fi
    start_daemons
    wait_idle
    log "cluster up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')(state in $STATE)"
}

cmd_stop() {
    stop_daemons
    local node
    for node in "${NODES[@]}"; do
        [ -e "/run/netns/mb-$node" ] && ip netns delete "mb-$node"
        ip link show "mb-$node-h" >/dev/null 2>&1 && ip link delete "mb-$node-h"
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
    log "cluster stopped"
}

cmd_status() {
    local ok=0
    pid_alive "$STATE/ctld/slurmctld.pid" && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/$node/slurmd.pid" && echo "slurmd $node: running" || { echo "slurmd $node: stopped"; ok=1; }
    done
    sinfo -N 2>/dev/null || ok=1
    return $ok
}

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
