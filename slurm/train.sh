#!/bin/bash
# Multi-node AlexNet training on Slurm: one torchrun per node (through srun), c10d rendezvous on the
# job's first node, GPUs of a node paired into the paper's two towers, DDP across the pairs.
#
#   sbatch slurm/train.sh --data /scratch/shards --run-dir /scratch/runs/alexnet
#   sbatch -N 4 --gpus-per-node=8 slurm/train.sh --data /scratch/shards --run-dir /scratch/runs/a4 \
#       --config configs/paper_4node_8gpu.toml
#   sbatch -N 3-4 --gpus-per-node=8 slurm/train.sh ...   # a node range: trains on the nodes it gets
#
# Arguments after the script name go to `python -m launch.train` (see its --help). Environment
# overrides: NPROC_PER_NODE (default: GPUs on the node, else 2), RDZV_PORT (see below), MAX_RESTARTS
# (elastic restarts after a crashed rank, 3), PYTHON (default: the repo's .venv, else python3),
# RUN_DIR (when no --run-dir is given; default runs/alexnet-$SLURM_JOB_ID).
#
# Jobs sharing a node never share a rendezvous: a one-node job rendezvouses on localhost at a port
# the kernel picks (torchrun's c10d store on port 0), a multi-node job on its first node at port
# 20000 + SLURM_JOB_ID % 12000 (launch.submit.rendezvous_port: the same formula; below the usual
# ephemeral range 32768-60999, stable across requeues). An explicit RDZV_PORT wins in both cases.
# A node range (sbatch -N MIN-MAX) starts on whatever Slurm allocates, and a requeue may come back with
# another count: the nodes are read at each start (SLURM_JOB_NUM_NODES, else SLURM_NNODES), and a checkpoint
# resumes on another data-parallel size mid-epoch at its next step (the epoch's order does not depend on it);
# the data-parallel size (nodes x processes / tp) must divide --batch-size, else the run refuses in one line.
# No --ntasks-per-node below (srun starts one torchrun per node itself): with it Slurm counts the job's tasks
# from the range's minimum and allocates that many nodes (-N 3-4 got 3 of 4 idle nodes, Slurm 22.05).
# One job per run directory: a run directory written by another live job (RUN_DIR/writer.lease,
# see pipeline/faults/lease.py) fails this job at once with one `error:` line naming that job; a requeue
# of this job takes its own lease over.
#
# Preemption and time limits: Slurm signals this script (USR1, 120 s before the limit, or TERM when
# preempted); the script drops a stop request into the run directory, the job checkpoints at the
# next step boundary and exits, and the script requeues itself. The requeued job resumes from the
# run directory's latest checkpoint. Operators can trigger the same with `scancel -b --signal=USR1 JOB`.
#
# Pre-flight: before training, `python -m launch.preflight` runs on every rank of the job (matmul,
# shard reads, device memory, all-reduce and links; one table in the job log, a line for each rank far
# below the others). PREFLIGHT=warn (default) reports and trains anyway, PREFLIGHT=strict ends the job
# (exit 1, not requeued) when a rank is named, PREFLIGHT=off skips it.
#
# Hangs: the progress watchdog (pipeline/faults/watchdog.py) names a stuck rank, writes stacks to
# RUN_DIR/hangs/ and ends the attempt (exit 75); torchrun restarts the group (MAX_RESTARTS). When the
# restarts are used up and this job recorded a hang, the script requeues the job (HANG_REQUEUES times,
# default 3, counted by SLURM_RESTART_COUNT), so a hung job comes back on a fresh allocation.
# A broken link: when the nodes of a hung job cannot reach each other, the watchdog names the node cut
# off in RUN_DIR/hangs/<time>/hang.json and ends each node's torchrun at once instead of letting it
# re-rendezvous (which waited 12-18 minutes for the unreachable node); srun --kill-on-bad-exit=1 ends the
# job step with the first of them, and the script requeues the job excluding that node (ExcNodeList).
#
# The node ledger: the nodes a hang named unreachable, the strict pre-flight named, or a divergence that did not
# repeat when re-run in place named are appended to RUN_DIR/../.alexnet-nodes.jsonl (ALEXNET_NODE_LEDGER overrides
# it; pipeline/faults/nodes.py). A later job that lands on one of them says so and requeues itself excluding it
# (LEDGER_REQUEUE=0: says so and trains there). Delete a node's lines to take it back into service.
#
# A crash that repeats: when two attempts in a row died of the same error at the same step
# (RUN_DIR/crashes.jsonl, pipeline/faults/crashes.py), the next attempt ends before training with one
# `error:` line and ends torchrun, so its restarts are not used up; the script then exits 3 and does not
# requeue. Exit codes: 0 finished or requeued, 2 a one-line error, 3 a crash that repeats, else a failure.
#SBATCH --job-name=alexnet
#SBATCH --nodes=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

repo=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

# The run directory must be stable across requeues: take --run-dir from the arguments or set one.
args=("$@")
run_dir=""
data_dir=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --run-dir|--run_dir) run_dir=${args[i + 1]:-} ;;
        --run-dir=*|--run_dir=*) run_dir=${args[i]#*=} ;;
        --data|--data.data) data_dir=${args[i + 1]:-} ;;
        --data=*|--data.data=*) data_dir=${args[i]#*=} ;;
    esac
done
if [[ -z "$run_dir" ]]; then
    run_dir=${RUN_DIR:-runs/alexnet-${SLURM_JOB_ID:-local}}
    args+=(--run-dir "$run_dir")
fi
mkdir -p "$run_dir"

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}   # what this allocation got (a range: any count in it)
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -n 1)
head_node=${head_node:-$(hostname)}
# Rendezvous at the head node's address as Slurm knows it (NodeAddr; it defaults to the node name,
# but differs where node names do not resolve, e.g. several slurmd on one host).
head_addr=$(scontrol show node -o "$head_node" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
head_addr=${head_addr:-$head_node}
gpus=${SLURM_GPUS_ON_NODE:-}
nproc=${NPROC_PER_NODE:-${gpus:-2}}
if [[ -n "${RDZV_PORT:-}" ]]; then
    endpoint=$head_addr:$RDZV_PORT
elif [[ "$nodes" == 1 ]]; then
    endpoint=localhost:0   # this node only: a free port, nothing shared with other jobs on the node
else
    endpoint=$head_addr:$((20000 + ${SLURM_JOB_ID:-0} % 12000))   # = launch.submit.rendezvous_port
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-2} / nproc > 0 ? ${SLURM_CPUS_PER_TASK:-2} / nproc : 1 ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail fast on a dead peer
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Elastic restarts (--max-restarts) need a fresh store per worker group: torchrun's shared rendezvous
# store keeps the old group's keys, and the restarted ranks read the dead ranks' addresses from it
# (gloo/NCCL "Connection refused" at init; pytorch/pytorch#135712, #167288; measured here with torch 2.14:
# 4 of 5 restarts failed with sharing on, 0 of 5 with it off).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Site-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) belong in the environment.

# Fail now, not after the ranks start, when another live job writes this run directory (the ranks'
# own lease taking in launch.train still settles a race between two jobs starting together).
"$PYTHON" -m pipeline.faults.lease check "$run_dir" || exit $?

# --kill-on-bad-exit=1: a node's torchrun fails only when its restarts are spent or its watchdog ended it
# (a node it cannot reach); either way the others cannot go on, and waiting for them kept the allocation.
torchrun_on_all_nodes() {  # torchrun once per node through srun; the rest of the line is its arguments
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
        "$PYTHON" -m torch.distributed.run \
            --nnodes="$nodes" --nproc-per-node="$nproc" \
            --rdzv-backend=c10d --rdzv-endpoint="$endpoint" "$@"
}

requeue_excluding() {  # requeue this job, then exclude nodes from its next allocation
    local nodes=$1 old
    old=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^ExcNodeList=//p')
    [[ -n "$old" && "$old" != "(null)" ]] && nodes=$old,$nodes
    # Slurm changes ExcNodeList only on a pending job: the requeue makes it pending at once and TERMs this
    # script, which then has KillWait seconds (30 by default) for the update.
    trap '' TERM
    scontrol requeue "$SLURM_JOB_ID"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$nodes" 2>/dev/null && return 0
        sleep 0.5
    done
    echo "$(date +%T) could not exclude $nodes from job $SLURM_JOB_ID (scontrol update refused): it may land there again"
}

# The node ledger (pipeline/faults/nodes.py): nodes a hang, the strict pre-flight or a divergence re-run named
# in earlier jobs. A job that landed on one says so and is requeued without it (LEDGER_REQUEUE=0: only says so).
export ALEXNET_NODE_LEDGER=${ALEXNET_NODE_LEDGER:-$(cd "$run_dir/.." && pwd -P)/.alexnet-nodes.jsonl}
failed_before=$("$PYTHON" -m pipeline.faults.nodes exclude "$run_dir" 2>/dev/null | tr ',' '\n')
allocated=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null)
bad_here=$(comm -12 <(sort -u <<<"$allocated") <(sort -u <<<"$failed_before") | paste -sd, -)
if [[ -n "$bad_here" ]]; then
    if [[ ${LEDGER_REQUEUE:-1} == 1 && -n "${SLURM_JOB_ID:-}" && ${SLURM_RESTART_COUNT:-0} -lt ${HANG_REQUEUES:-3} ]]; then
        echo "$(date +%T) $bad_here failed in an earlier job ($ALEXNET_NODE_LEDGER): requeueing job $SLURM_JOB_ID excluding $bad_here"
        requeue_excluding "$bad_here"
        exit 0
    fi
    echo "$(date +%T) $bad_here failed in an earlier job ($ALEXNET_NODE_LEDGER); training on it anyway"
fi

preflight=${PREFLIGHT:-warn}
if [[ "$preflight" != off && -n "$data_dir" ]]; then
    echo "$(date +%T) pre-flight on every rank (PREFLIGHT=$preflight; PREFLIGHT=off skips it)"
    strict=()
    [[ "$preflight" == strict ]] && strict=(--strict)
    torchrun_on_all_nodes --rdzv-id="${SLURM_JOB_ID:-local}-preflight" \
        -m launch.preflight --data "$data_dir" "${strict[@]}"
    pre_status=$?
    if [[ $pre_status != 0 && "$preflight" == strict ]]; then
        echo "$(date +%T) pre-flight failed (exit $pre_status): not training on this allocation"
        exit "$pre_status"
    fi
fi

requeue=0
on_signal() {
    echo "$(date +%T) signal received: asking the job to checkpoint and stop (run dir $run_dir)"
    touch "$run_dir/preempt.request"
    requeue=1
}
trap on_signal USR1 TERM

echo "$(date +%T) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $nproc process(es), rendezvous $endpoint"
started=$(date +%s)
torchrun_on_all_nodes --rdzv-id="${SLURM_JOB_ID:-local}" --max-restarts="${MAX_RESTARTS:-3}" \
    -m launch.train "${args[@]}" &
step=$!
# A trap runs only while bash waits, so wait in a loop until the step has really ended.
while true; do
    wait "$step"
    status=$?
    kill -0 "$step" 2>/dev/null || break
done

if [[ $requeue == 1 ]]; then
    echo "$(date +%T) training stopped for preemption (exit $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
# A crash that repeats (pipeline/faults/crashes.py): no requeue would get past it.
repeats=0
[[ $status != 0 ]] && { "$PYTHON" -m pipeline.faults.crashes check "$run_dir" 2>/dev/null || repeats=$?; }
if [[ $repeats == 3 ]]; then
    echo "$(date +%T) training failed with a crash that repeats (the error: line above); not requeueing (exit 3)"
    exit 3
fi

# A hang recorded by this job (a folder under RUN_DIR/hangs/ newer than its start) that torchrun's
# restarts did not get past: requeue, so the job comes back on a fresh allocation; without the nodes
# its hang.json names as cut off from the others (pipeline/faults/reach.py), which a new allocation must avoid.
hung=$(find "$run_dir/hangs" -mindepth 1 -maxdepth 1 -newermt "@$started" 2>/dev/null | sort | tail -n 1)
[[ -n "$hung" ]] && "$PYTHON" -m pipeline.faults.nodes record-hangs "$run_dir" >/dev/null 2>&1
if [[ $status != 0 && -n "$hung" && ${SLURM_RESTART_COUNT:-0} -lt ${HANG_REQUEUES:-3} && -n "${SLURM_JOB_ID:-}" ]]; then
    unreachable=$("$PYTHON" -c 'import json, sys; print(",".join(u["node"] for u in json.load(open(sys.argv[1]))["unreachable"]))' \
        "$hung/hang.json" 2>/dev/null)
    if [[ -n "$unreachable" ]]; then
        echo "$(date +%T) training failed after a hang ($hung, exit $status): $unreachable cannot reach the other nodes; requeueing job $SLURM_JOB_ID excluding $unreachable"
        requeue_excluding "$unreachable"
    else
        echo "$(date +%T) training failed after a hang ($hung, exit $status); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
exit "$status"
