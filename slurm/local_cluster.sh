#!/bin/bash
# A real Slurm cluster on this one host, for tests and for trying the job scripts without a cluster.
#
#   slurm/local_cluster.sh up [--nodes N] [--gpus G]   # idempotent; prints `export SLURM_CONF=...`
#   eval "$(slurm/local_cluster.sh up)"                 # ... and use it in this shell
#   sbatch --array=0-2 slurm/preprocess.sh ...; squeue; scontrol show job -o JOB
#   slurm/local_cluster.sh status
#   slurm/local_cluster.sh down                        # cancels every job, stops every daemon
#
# N nodes (default 2: n1, n2) are N slurmd daemons on this host (NodeAddr=127.0.0.1, one port each),
# each with all of this host's cores, in one partition `debug`. A script with `#SBATCH --gpus-per-node=2`
# (slurm/train.sh) is refused here ("Invalid generic resource (gres) specification") unless either
#   - it is submitted with `sbatch --gpus-per-node=0 ...` (or SBATCH_GPUS_PER_NODE=0 in the environment;
#     `--gres=none`, `--gres=gpu:0` and `--gpus=0` do not help): the job gets no GPUs, or
#   - the cluster declares fake GPUs with `up --gpus G`: G GRES per node backed by null-device clones
#     under the state dir; jobs see SLURM_GPUS_ON_NODE=G and CUDA_VISIBLE_DEVICES=0..G-1 (harmless on a
#     host without CUDA; on a host with real GPUs those indices name the real ones).
# Debian's slurm-wlm and munge are installed when missing (root only; exit status 3 when Slurm cannot be
# had). Everything lives under $SLURM_STATE_DIR (default /tmp/alexnet-slurm): its own munged (key,
# socket, pid, log), slurm.conf, state, spool and logs, and its own ports ($SLURM_PORT_BASE, default
# 6917 for slurmctld, then one per node), so a system Slurm (6817/6818, /etc/slurm) is never touched.
# Other environment: SLURM_CPUS_PER_NODE (default: nproc), SLURM_UP_TIMEOUT (seconds, default 30).
#
# Made for a single test host: root runs everything, no cgroups (proctrack/linuxproc), no accounting
# (use `scontrol show job`, finished jobs stay an hour), fast requeue (~12 s), dependencies on failed
# jobs are cancelled (kill_invalid_depend). Messages go to stderr; stdout carries only the exports.
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/tmp/alexnet-slurm}
PORT_BASE=${SLURM_PORT_BASE:-6917}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-30}
CONF=$STATE/etc/slurm.conf
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
LOG_DIR=$STATE/log

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
unavailable() { say "unavailable: $*"; exit 3; }   # exit 3: Slurm cannot be had here (tests skip)

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd=${1:-}
[[ -n "$cmd" ]] || usage
shift
NODES=2
GPUS=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --gpus) GPUS=${2:?--gpus needs a number}; shift 2 ;;
        --gpus=*) GPUS=${1#*=}; shift ;;
        -h|--help) usage ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got $NODES)"
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus must be a non-negative integer (got $GPUS)"

# --- helpers -------------------------------------------------------------------------------------

pid_alive() {  # pid_alive FILE: the process named in FILE exists
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"
}

is_zombie() { [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" == Z ]]; }

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
    local file=$1 name=$2 pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid" || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
        say "$name ($pid) ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$file"
}

node_names() { local i; for ((i = 1; i <= $1; i++)); do echo "n$i"; done; }

running_nodes() {  # the node names whose slurmd pid file exists (from the last `up`)
    local f
    for f in "$STATE"/run/slurmd-*.pid; do
        [[ -e "$f" ]] || continue
        f=${f##*/slurmd-}
        echo "${f%.pid}"
    done
}

ancestors() {  # this shell and its ancestors: never killed by the sweep
    local pid=$$
    while [[ "$pid" =~ ^[0-9]+$ && "$pid" -gt 1 ]]; do
        echo "$pid"
        pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
    done
}

strays() {  # processes of this cluster: its daemons and slurmstepd, and job processes (a job id)
    local keep f p comm
    keep=" $(ancestors | tr '\n' ' ') "
    # Everything the daemons start carries their SLURM_CONF (slurmstepd, and job processes through
    # the job environment): one grep over all environments, then a closer look at the few hits.
    for f in $(grep -l -s -z -x -F -e "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null); do
        p=${f#/proc/}
        p=${p%/environ}
        [[ "$keep" == *" $p "* ]] && continue
        comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case "$comm" in
            slurmstepd|slurmd|slurmctld|slurmscriptd) echo "$p" ;;
            *) grep -q -s -z '^SLURM_JOB_ID=' "$f" && echo "$p" ;;
        esac
    done
    return 0
}

kill_strays() {
    local pids i
    pids=$(strays | tr '\n' ' ')
    [[ -n "${pids// }" ]] || return 0
    say "terminating leftover processes of this cluster: $pids"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        sleep 0.1
        pids=$(strays | tr '\n' ' ')
        [[ -n "${pids// }" ]] || return 0
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
}

client() {  # a Slurm client command against this cluster only
    SLURM_CONF=$CONF "$@"
}

print_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -e "$f" ]] || continue
        echo "----- $f (last 40 lines)" >&2
        tail -n 40 "$f" >&2
    done
}

install_packages() {
    local need=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        || need+=(slurm-wlm)
    command -v munged >/dev/null || need+=(munge)
    [[ ${#need[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || unavailable "Slurm is not installed and only root can install it (apt-get install ${need[*]})"
    command -v apt-get >/dev/null || unavailable "Slurm is not installed and there is no apt-get to install it"
    say "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/apt.log" 2>&1 || { tail -n 20 "$STATE/apt.log" >&2; unavailable "apt-get update failed"; }
    apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; unavailable "apt-get install ${need[*]} failed"; }
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || unavailable "installed ${need[*]}, but slurmctld/munged are still not on PATH"
}

# --- configuration -------------------------------------------------------------------------------

host=$(hostname -s)
cpus=${SLURM_CPUS_PER_NODE:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # nproc obeys OMP_NUM_THREADS
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

spec() {  # what a running cluster must match to be reused as is
    echo "nodes=$NODES gpus=$GPUS cpus=$cpus mem=$mem_mb host=$host ports=$PORT_BASE"
}

write_conf() {
    local first_job_id=1 gres_types="" node_gres="" i
    [[ -s "$STATE/next-job-id" ]] && first_job_id=$(cat "$STATE/next-job-id")
    if [[ "$GPUS" -gt 0 ]]; then
        gres_types="GresTypes=gpu"
        node_gres="Gres=gpu:$GPUS"
        # Slurm drops GPUs without device files and wants character devices: null-device clones.
        mkdir -p "$STATE/dev"
        for ((i = 0; i < GPUS; i++)); do
            [[ -c "$STATE/dev/gpu$i" ]] || mknod -m 0666 "$STATE/dev/gpu$i" c 1 3 \
                || die "cannot create the fake GPU device $STATE/dev/gpu$i (mknod)"
        done
        echo "AutoDetect=off" >"$STATE/etc/gres.conf"
        echo "Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]" >>"$STATE/etc/gres.conf"
    else
        rm -f "$STATE/etc/gres.conf"
    fi
    {
        echo "# Written by slurm/local_cluster.sh ($(spec)); rewritten on every fresh start."
        cat <<EOF
ClusterName=alexnet-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId=$first_job_id
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
$gres_types
EOF
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + i)) CPUs=$cpus" \
                 "Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb $node_gres State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } >"$CONF"
    : >"$STATE/etc/plugstack.conf"   # not the system's /etc/slurm/plugstack.conf
}

# --- up / down / status --------------------------------------------------------------------------

all_running() {  # the daemons of the running cluster are all alive and it has the wanted shape
    [[ -s "$STATE/spec" && "$(cat "$STATE/spec")" == "$(spec)" ]] || return 1
    pid_alive "$MUNGE_DIR/munged.pid" && pid_alive "$STATE/run/slurmctld.pid" || return 1
    local n
    for n in $(node_names "$NODES"); do pid_alive "$STATE/run/slurmd-$n.pid" || return 1; done
}

wait_idle() {  # every node idle (or busy with jobs: mixed/allocated), within UP_TIMEOUT seconds
    local deadline=$((SECONDS + UP_TIMEOUT)) states
    while ((SECONDS < deadline)); do
        states=$(client sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ') || states=""
        if [[ -n "$states" ]] \
            && [[ $(client sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l) -eq $NODES ]] \
            && ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$(tr ' ' '\n' <<<"$states" | sed '/^$/d')"; then
            return 0
        fi
        sleep 0.3
    done
    say "nodes not idle after ${UP_TIMEOUT}s: ${states:-no answer from slurmctld}"
    client sinfo -N -l >&2 2>&1 || true
    print_logs
    return 1
}

save_next_job_id() {  # keep job ids increasing across restarts (state is cleared on a fresh start)
    local max
    max=$(client scontrol show job -o 2>/dev/null | grep -o '^JobId=[0-9]*' | cut -d= -f2 | sort -n | tail -n 1) || true
    if [[ -n "$max" ]]; then
        local old=0
        [[ -s "$STATE/next-job-id" ]] && old=$(cat "$STATE/next-job-id")
        ((max + 1 > old)) && echo $((max + 1)) >"$STATE/next-job-id"
    fi
    return 0
}

cancel_all() {  # cancel every job of this cluster and wait (bounded) for an empty queue
    local jobs i
    jobs=$(client squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
    [[ -n "${jobs// }" ]] || return 0
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    client scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do   # KillWait is 10 s
        [[ -z "$(client squeue -h -o %A 2>/dev/null)" ]] && return 0
        sleep 0.1
    done
    say "jobs still in the queue after 30 s: $(client squeue -h -o '%A %T' | tr '\n' ' ')"
}

do_down() {
    if pid_alive "$STATE/run/slurmctld.pid"; then
        cancel_all
        save_next_job_id
    fi
    local n
    for n in $(running_nodes); do stop_pidfile "$STATE/run/slurmd-$n.pid" "slurmd $n"; done
    stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
    kill_strays
    stop_pidfile "$MUNGE_DIR/munged.pid" munged
    rm -f "$STATE/spec" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
}

start_munged() {
    mkdir -p "$MUNGE_DIR"
    chmod 0755 "$STATE" "$MUNGE_DIR"   # munged refuses a socket directory writable by others
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    setsid munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG_DIR/munged.log" 2>&1 \
        || { print_logs; die "munged did not start"; }
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -S "$MUNGE_SOCKET" ]] && pid_alive "$MUNGE_DIR/munged.pid" && return 0
        sleep 0.1
    done
    print_logs
    die "munged did not come up"
}

do_up() {
    mkdir -p "$STATE"
    install_packages
    if all_running; then
        wait_idle || die "the running cluster is unhealthy (see the logs above); try: $0 down"
        return 0
    fi
    # A fresh start: stop whatever is left of an earlier cluster under this state dir.
    do_down
    mkdir -p "$STATE"/{etc,ctld,run,spool} "$LOG_DIR"
    write_conf
    start_munged
    local n
    # -c: no jobs or drained nodes from an earlier cluster; job ids go on from next-job-id.
    env SLURM_CONF="$CONF" setsid slurmctld -c -f "$CONF" </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 \
        || { print_logs; die "slurmctld did not start"; }
    for n in $(node_names "$NODES"); do
        mkdir -p "$STATE/spool/$n"
        env SLURM_CONF="$CONF" setsid slurmd -f "$CONF" -N "$n" </dev/null >>"$LOG_DIR/slurmd-$n.out" 2>&1 \
            || { print_logs; die "slurmd $n did not start"; }
    done
    spec >"$STATE/spec"
    wait_idle || { do_down; die "the cluster did not come up (logs above)"; }
    say "up: $NODES node(s) x $cpus CPUs$( ((GPUS > 0)) && echo " x $GPUS fake GPUs") in partition debug; state in $STATE"
}

do_status() {
    local ok=0 n
    pid_alive "$MUNGE_DIR/munged.pid" && say "munged: running ($(cat "$MUNGE_DIR/munged.pid"))" || { say "munged: stopped"; ok=1; }
    pid_alive "$STATE/run/slurmctld.pid" && say "slurmctld: running ($(cat "$STATE/run/slurmctld.pid"))" \
        || { say "slurmctld: stopped"; ok=1; }
    for n in $(running_nodes); do
        pid_alive "$STATE/run/slurmd-$n.pid" && say "slurmd $n: running ($(cat "$STATE/run/slurmd-$n.pid"))" \
            || { say "slurmd $n: stopped"; ok=1; }
    done
    if [[ $ok -eq 0 ]]; then
        client sinfo -N >&2 || ok=1
        client squeue >&2 || ok=1
    fi
    return $ok
}

case "$cmd" in
    up)
        do_up
        echo "export SLURM_CONF=$CONF"
        ;;
    down)
        do_down
        say "down"
        ;;
    status)
        if do_status; then echo "export SLURM_CONF=$CONF"; else exit 1; fi
        ;;
    *) usage ;;
esac
