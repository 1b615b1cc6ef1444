#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the slurm tests: its own munged (own key and
# socket), slurmctld and slurmd, loopback only, every file (config, state, spool, logs, pid
# files) under one folder, so it touches nothing system-wide and several can coexist.
#
#   tests/slurm/localcluster.sh start DIR   # prints the SLURM_CONF to export; up in ~3 s
#   tests/slurm/localcluster.sh stop DIR    # stops the three daemons by their pid files
#
# Needs root (slurmd launches jobs as their user) and `apt-get install -y slurm-wlm munge`.
# Facts this relies on are in ENVIRONMENT.md: SlurmUser=root, proctrack/linuxproc,
# task/none, select/cons_tres with CR_Core, no cgroups, no accounting (submitit then logs
# "Bypassing sacct error" and reads job completion from its own result files).
set -euo pipefail

cmd=${1:?usage: localcluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: localcluster.sh start|stop DIR}")

free_port() {  # a TCP port nothing listens on now, on the loopback address
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

stop_pidfile() {  # SIGTERM, then SIGKILL after 10 s, the process named by a pid file
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2
    shift 2
    for _ in $(seq $((limit * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "localcluster: $what did not come up within ${limit}s; logs in $dir/log" >&2
    tail -n 20 "$dir"/log/* >&2 || true
    return 1
}

case "$cmd" in
start)
    [ "$(id -u)" -eq 0 ] || { echo "localcluster: must run as root" >&2; exit 1; }
    for bin in munged slurmctld slurmd sbatch; do
        command -v "$bin" >/dev/null || { echo "localcluster: $bin not found (apt-get install -y slurm-wlm munge)" >&2; exit 1; }
    done
    mkdir -p "$dir"/{state,spool,log,run,munge}
    chmod 755 "$dir"
    # munge: its own key and socket; munged refuses to run as root, so it runs as `munge`,
    # in a folder only that user can write (others may only reach the socket).
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge: "$dir/munge"
    chmod 755 "$dir/munge"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket"

    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/localcluster.sh for a throw-away test cluster.
ClusterName=wartoktest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=sched_interval=1
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    wait_for 20 slurmctld scontrol ping
    slurmd -f "$SLURM_CONF" -N localhost
    wait_for 30 "slurmd (node idle)" bash -c "sinfo -h -N -o %t | grep -q '^idle'"
    echo "SLURM_CONF=$SLURM_CONF"
    ;;
stop)
    stop_pidfile "$dir/run/slurmd.pid"
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    ;;
*)
    echo "usage: localcluster.sh start|stop DIR" >&2
    exit 2
    ;;
esac
