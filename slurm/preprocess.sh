#!/bin/bash
# ImageNet -> WebDataset shards as a Slurm array job on cluster storage.
#
#   sbatch --array=0-31 slurm/preprocess.sh --src /data/ILSVRC2012_img_train.tar --out /scratch/imagenet-shards --split train
#   sbatch --array=0-7  slurm/preprocess.sh --src /data/ILSVRC2012_img_val.tar \
#          --devkit /data/ILSVRC2012_devkit_t12.tar.gz --out /scratch/imagenet-shards --split val
#
# Task i of N writes shards i, i+N, i+2N, ... of the deterministic plan; the task that finds the
# split complete verifies every shard and writes manifest.json (+ mean image, RGB PCA). Tasks are
# resumable: a requeued or re-submitted task skips its verified shards. If the last task dies
# before the manifest is written, run: python -m preprocess finalize --out OUT --split SPLIT
#
# Everything after the script name goes to `python -m preprocess shard`. Override the
# interpreter with PYTHON=/path/to/python (default: the repo's .venv, else python3).
#SBATCH --job-name=alexnet-preprocess
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=2G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

repo=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

# The 0-based task index, whatever the --array range and step (e.g. --array=1-31:2).
id=${SLURM_ARRAY_TASK_ID:-0}
min=${SLURM_ARRAY_TASK_MIN:-0}
step=${SLURM_ARRAY_TASK_STEP:-1}
count=${SLURM_ARRAY_TASK_COUNT:-1}
index=$(( (id - min) / step ))

echo "preprocess task $index of $count on $(hostname) with ${SLURM_CPUS_PER_TASK:-?} cores: $*"
exec "$PYTHON" -m preprocess shard --task-index "$index" --task-count "$count" \
    --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" --no-progress "$@"
