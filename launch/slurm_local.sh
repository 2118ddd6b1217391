#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages, for the SLURM tests and for trying
# `medfm launch --slurm` by hand (`make slurm-up` / `make slurm-down`).
#
#   launch/slurm_local.sh install   apt-get the packages when missing (root)
#   launch/slurm_local.sh up        start munged, slurmctld, slurmd (idempotent: a running cluster is left as is)
#   launch/slurm_local.sh down      cancel its jobs, stop the daemons by the PIDs in their pid files
#   launch/slurm_local.sh status    exit 0 when the cluster answers
#
# Everything lives in one directory (MEDFM_SLURM_DIR, default /tmp/medfm-slurm): the munge key and socket,
# slurm.conf, state, spool, logs, pid files. No systemd, no cgroups (proctrack/linuxproc, task/none). Default ports,
# so only one such cluster runs per machine. Clients need SLURM_CONF=$MEDFM_SLURM_DIR/slurm.conf unless
# /etc/slurm/slurm.conf is free, in which case `up` links it there (and `down` removes that link).
set -euo pipefail

DIR=${MEDFM_SLURM_DIR:-/tmp/medfm-slurm}
CONF=$DIR/slurm.conf
PKGS=(slurmd slurmctld slurm-client munge)
BINS=(munged slurmctld slurmd sbatch scontrol squeue sinfo scancel)
ETC_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF

say() { echo "medfm slurm: $*" >&2; }
die() { say "$*"; exit 1; }

missing_bins() {
    local b out=()
    for b in "${BINS[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
    echo "${out[*]}"
}

lock() {  # one up/down at a time (several test sessions may ask for the cluster at once); daemons get 9>&-
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$DIR.lock"
    flock -w 120 9 || die "another up/down still holds $DIR.lock after 120 s"
}

alive() {  # alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait, KILL — only the process the pid file names
    local f=$1 name=$2 pid i
    alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" || true; fi
    rm -f "$f"
}

cmd_install() {
    local miss
    miss=$(missing_bins)
    [ -z "$miss" ] && return 0
    [ "$(id -u)" = 0 ] || die "missing $miss; installing ${PKGS[*]} needs root (apt-get)"
    say "installing ${PKGS[*]} (missing: $miss)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PKGS[@]}" >"${TMPDIR:-/tmp}/medfm-slurm-apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"${TMPDIR:-/tmp}/medfm-slurm-apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PKGS[@]}" >>"${TMPDIR:-/tmp}/medfm-slurm-apt.log" 2>&1 ||
            die "apt-get install ${PKGS[*]} failed (log: ${TMPDIR:-/tmp}/medfm-slurm-apt.log)"
    fi
    miss=$(missing_bins)
    [ -z "$miss" ] || die "still missing after apt-get: $miss"
}

cmd_status() {
    alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munged.pid" &&
        scontrol ping >/dev/null 2>&1 &&
        [ -n "$(sinfo -h -N -o %T 2>/dev/null | grep -E '^(idle|mixed|allocated|completing)')" ]
}

write_conf() {
    local host node
    host=$(hostname -s)
    # slurmd -C prints this machine's node line (CPUs, sockets, cores, threads, RealMemory).
    node=$(slurmd -C | awk 'NR == 1')
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line"
    cat >"$CONF.tmp" <<EOF
# Written by launch/slurm_local.sh: a one-node cluster for medfm's tests.
ClusterName=medfm
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Jobs stay visible to scontrol/squeue for 10 minutes after they end (the tests read their final state).
MinJobAge=600
# SIGTERM -> SIGKILL grace at a time limit or cancel: long enough for a tiny run to checkpoint.
KillWait=30
InactiveLimit=0
Waittime=0
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

cmd_up() {
    local miss i
    miss=$(missing_bins)
    [ -z "$miss" ] || die "SLURM packages missing ($miss): run 'launch/slurm_local.sh install' as root (apt-get install ${PKGS[*]})"
    [ "$(id -u)" = 0 ] || die "starting slurmd/munged needs root"
    lock
    if cmd_status; then say "already up ($DIR)"; echo "export SLURM_CONF=$CONF"; return 0; fi
    # A half-started cluster of ours (some daemon died): stop what is left, then start fresh.
    stop_pid "$DIR/slurmd.pid" slurmd; stop_pid "$DIR/slurmctld.pid" slurmctld; stop_pid "$DIR/munged.pid" munged
    mkdir -p "$DIR"/{state,spool,log,munge}
    # (0755: clients reach the socket in here; the key itself is 0400 munge)
    chown munge:munge "$DIR/munge"; chmod 0755 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$DIR/munge/munge.key"; chmod 0400 "$DIR/munge/munge.key"
    # munged as the munge user; it daemonises and writes its pid file.
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- || die "munged failed to start (log: $DIR/munge/munged.log)"
    for i in $(seq 50); do [ -s "$DIR/munge/munged.pid" ] && break; sleep 0.1; done
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
    write_conf
    if [ ! -e "$ETC_CONF" ] && [ -d "$(dirname "$ETC_CONF")" ]; then ln -s "$CONF" "$ETC_CONF"; fi
    # -c: no state from an earlier cluster in this directory (its jobs are gone).
    # (daemons get no stdio of ours: a caller reading our output to EOF must not wait for them to exit)
    slurmctld -c -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- || die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
    for i in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    slurmd -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&- || die "slurmd failed to start (log: $DIR/log/slurmd.log)"
    for i in $(seq 150); do
        if cmd_status; then say "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T') ($DIR)"; echo "export SLURM_CONF=$CONF"; return 0; fi
        sleep 0.2
    done
    die "the node did not come up within 30 s: $(sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ' ') (logs: $DIR/log)"
}

cmd_down() {
    local i
    [ "$(id -u)" = 0 ] || die "stopping the cluster's daemons needs root"
    lock
    if alive "$DIR/slurmctld.pid"; then
        scancel --quiet --full --user=root 2>/dev/null || true
        for i in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
    stop_pid "$DIR/munged.pid" munged
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
    say "down ($DIR)"
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status   (MEDFM_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
