"""slurm/train.sh with a node range (`sbatch -N 3-4`) on the four-node local cluster (conftest.py
slurm_cluster_4nodes): a job that gets 4 nodes is preempted mid-epoch while one of its nodes is drained, Slurm
requeues it onto the 3 that are left, and the run goes on at its next step on dp 3 and finishes the epoch:
every sample once, and the weights of a run that had 3 nodes from the start.

One process per node (--tp 1, NPROC_PER_NODE=1), so the nodes are the data-parallel ranks; --batch-size 12
is divisible by both 3 and 4. The nodes have no GPUs: --gpus-per-node=0 (the script's header asks for 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.checkpoint import META, export_model
from pipeline.data.sample_ledger import epoch_keys, read_ledger
from pipeline.faults.lease import ENDED_STATES
from pipeline.run_dir import RunDir
from tests.integration.test_elastic import TOLERANCE  # the reduction-order tolerance of dp 4 vs dp 2
from tests.support import NARROW, PYTHON, REPO, TORCHRUN, flags
from tests.support.chaos import train_keys
from tests.support.processes import free_port, kill_group, tail, wait_for
from tests.support.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

SCRIPT = str(REPO / "slurm" / "train.sh")
BATCH = 12
STEPS_PER_EPOCH = 8  # 94 demo train images, 12 a step: 7 full global batches and one of 10
STOP_AT = 3  # --train.control-every 3: a stop request present from the start is acted on after step 3
DRAINED = "n2"  # not the head node (the rendezvous) nor the last: the new node list has a hole, n[1,3-4]
# The recipe both runs train, without dropout: every step's update is then a function of the global batch.
RECIPE = [
    *NARROW,
    *flags("--tp 1 --model.dropout 0 --batch-size {} --lr 0.01 --epochs 1", BATCH),
    *flags("--data.workers 1 --train.ten-crop false --checkpoint.every-minutes 0 --train.record-samples true"),
]


def _log(record: dict[str, str]) -> str:
    path = Path(record["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def _wait_for(cluster: SlurmCluster, job: str, what: str, done: Callable[[dict[str, str]], bool]) -> dict:
    """Until `done(record)`; fails (with the log) if the job ends first, or after 300 s."""

    def reached() -> dict | None:
        (record,) = cluster.jobs(job)
        if done(record):
            return record
        assert record["JobState"] not in ENDED_STATES, f"job {job} ended before {what}:\n{_log(record)}"
        return None

    return wait_for(reached, 300, f"job {job}: {what}", poll=0.5)


def _dp_sizes(run_dir: Path) -> dict[int, set[int]]:
    """step -> the dp sizes its ledger lines were recorded under."""
    sizes: dict[int, set[int]] = {}
    for path in RunDir(run_dir).samples.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            sizes.setdefault(record["step"], set()).add(record["dp_size"])
    return sizes


def _start_uninterrupted_dp3(shards: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """The same recipe on 3 ranks from the start: one torchrun on this host (no Slurm needed), run alongside the
    job (which spends much of its time starting, stopping and waiting for its requeue)."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=3", "-m", "launch.train"]
    cmd += [*flags("--data {} --run-dir {}", shards, run_dir), *RECIPE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        # A session of its own: kill_group ends it and the ranks below it.
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_job_requeued_onto_fewer_nodes_finishes_the_epoch_it_began(
    slurm_cluster_4nodes: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """sbatch -N 3-4 with all 4 nodes idle: 4 nodes, dp 4. Once the script's signal trap is armed (its
    "restart 0:" line), n2 is drained (it stays in the running job) and the batch shell gets USR1, as before a
    time limit or a preemption: the stop request is there before the first step, so the run checkpoints at
    its first control step (step 3 of 8) and the script requeues the job. Slurm can give it only n1, n3, n4
    now; it resumes the dp-4 checkpoint on dp 3 at step 3 and trains to the end of the epoch.

    The reference is an uninterrupted dp 3 run started beside the job (any dp size trains the same updates,
    the epoch's short last batch included: 4, 4, 2 samples on dp 3, each rank's loss weighted by its share)."""
    cluster = slurm_cluster_4nodes
    assert set(cluster.sinfo().values()) == {"idle"}, cluster.sinfo()
    run_dir = tmp_path / "run"
    train_args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *RECIPE]
    train_args += flags("--train.control-every {} --train.log-every 1", STOP_AT)
    env = {"PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1", "PREFLIGHT": "off"}
    # An explicit port: job ids of this cluster repeat another cluster's, and so would the script's per-job port.
    env["RDZV_PORT"] = str(free_port())
    resources = ["--nodes=3-4", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out"]
    job = cluster.sbatch([*resources, SCRIPT, *train_args], env=env)
    reference, reference_log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
    uninterrupted = _start_uninterrupted_dp3(demo_shards, reference, reference_log)
    try:
        _wait_for(cluster, job, "armed trap", lambda r: f"job {job} restart 0:" in _log(r))
        cluster.run(["scontrol", "update", f"nodename={DRAINED}", "state=drain", "reason=test: taken away"])
        cluster.scancel(job, "-b", "--signal=USR1")
        record = _wait_for(
            cluster, job, "end after a requeue", lambda r: r.get("Restarts") == "1" and r["JobState"] in ENDED_STATES
        )
        uninterrupted.wait(timeout=600)
    finally:
        kill_group(uninterrupted)  # a no-op once it has exited
        if cluster.job_state(job) not in ENDED_STATES:
            cluster.scancel(job)
            cluster.wait(job, timeout=60)
        cluster.run(["scontrol", "update", f"nodename={DRAINED}", "state=resume"])
    log = _log(record)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert (record["NodeList"], record["NumNodes"]) == ("n[1,3-4]", "3"), record

    # What the job says: 4 nodes, stopped mid-epoch, requeued; then 3 nodes, the dp-4 checkpoint going on at step 3.
    first, _, second = log.partition(f"job {job} restart 1:")
    assert f"job {job} restart 0: 4 node(s) x 1 process(es)" in first and "world 4 = dp 4 x tp 1" in first, first
    assert f"stopped at epoch 0, step {STOP_AT} ({STOP_AT} steps into the epoch)" in first, first
    assert f"training stopped for preemption (exit 0); requeueing job {job}" in first, first
    assert second.startswith(" 3 node(s) x 1 process(es)") and "world 3 = dp 3 x tp 1" in second, second
    assert re.search(rf"resumed from \S+/step-{STOP_AT:08d}: epoch 0, step {STOP_AT},", second), second
    assert (
        "layout changed ({'world_size': 4, 'dp_size': 4, 'tp_size': 1} -> "
        "{'world_size': 3, 'dp_size': 3, 'tp_size': 1}): "
        f"epoch 0 goes on at step {STOP_AT}, sample {STOP_AT * BATCH}"
    ) in second, second
    assert "resuming at the start of epoch" not in log, log
    meta = json.loads((checkpoint.latest(run_dir) / META).read_text())
    assert meta["progress"] == {"epoch": 1, "step": STEPS_PER_EPOCH, "step_in_epoch": 0}, meta["progress"]
    assert meta["layout"] == {"world_size": 3, "dp_size": 3, "tp_size": 1}

    # The ledger: steps 0-2 on dp 4, 3-7 on dp 3, each of the epoch's samples exactly once.
    sizes = _dp_sizes(run_dir)
    assert sizes == {s: {4} if s < STOP_AT else {3} for s in range(STEPS_PER_EPOCH)}, sizes
    assert sorted(epoch_keys(RunDir(run_dir))[0]) == train_keys(demo_shards), "every sample of the epoch once"

    # The run that had 3 nodes from the start: the same global batches, and its weights.
    assert uninterrupted.returncode == 0, tail(reference_log)
    assert read_ledger(RunDir(run_dir)) == read_ledger(RunDir(reference)), "the same global batches, step by step"
    a, b = export_model(checkpoint.latest(run_dir)), export_model(checkpoint.latest(reference))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"dp 4 -> 3 (requeued by Slurm) vs dp 3: max abs weight difference {worst:.3g}")
    assert worst <= TOLERANCE, worst
