"""What the suite shares: constants here, helpers in the modules beside this one.

datasets         the demo dataset through the real preprocessing, image folders, small synthetic datasets
processes        subprocesses: environment, ports, waiting for a state, killing a process tree, logs
trained_run      a tiny trained run (the evaluation, figure, report and ablation tests)
slurm            a real single-host Slurm cluster
netns            emulated nodes in Linux network namespaces (a pair on a veth, or a group on a bridge)
chaos            a seeded chaos campaign on four emulated nodes and its checks (``make chaos``)
chaos_rank       a script: the chaos campaign's training rank (the harness plus its fault hooks)
tensor_parallel  two gloo ranks on CPU and the tower-split rank body
checkpoint_phases  two gloo ranks saving a checkpoint, their watchdog phases sampled (test_watchdog)
harness          a script: ``launch.train`` in-process, with test-controlled loaders, gates and holds
hooks/           a sitecustomize for subprocesses (fault hooks)
"""

from __future__ import annotations

import sys
from pathlib import Path


def flags(text: str, *values: object) -> list[str]:
    """An argument list written as one line: ``flags("--data {} --tp 2", data)`` is ``["--data", str(data),
    "--tp", "2"]``. The text is split on whitespace; each ``{}`` takes the next value whole, so a path with
    spaces (or odd characters) stays one argument."""
    words = text.split()
    if words.count("{}") != len(values):
        raise ValueError(f"{text!r} has {words.count('{}')} placeholders for {len(values)} values")
    given = iter(values)
    return [str(next(given)) if word == "{}" else word for word in words]


REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
HARNESS = str(REPO / "tests" / "support" / "harness.py")  # a script: `python HARNESS ARGS`, under torchrun too
HOOKS = str(REPO / "tests" / "support" / "hooks")  # first on a subprocess's PYTHONPATH: the fault hooks

# The demo dataset's shape and the small-run flags every end-to-end test shares.
DEMO_CLASSES, DEMO_TRAIN, DEMO_VAL = 4, 24, 6
TRAIN_SHARD_SIZE = 40
# The narrow model every multi-rank and fault test trains (the paper's widths are tested end to end elsewhere).
NARROW_WIDTHS, NARROW_FC_WIDTH = (16, 32, 48, 48, 32), 64
NARROW_MODEL = flags("--model.widths {} --model.fc-width {}", ",".join(map(str, NARROW_WIDTHS)), NARROW_FC_WIDTH)
NARROW = [*flags("--num-classes {}", DEMO_CLASSES), *NARROW_MODEL]  # on the demo data
SMALL_RUN = [*NARROW, *flags("--batch-size 8 --data.workers 1 --train.ten-crop false --checkpoint.every-minutes 0")]
