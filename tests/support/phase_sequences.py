"""Two gloo ranks training with the real ``Trainer``, each recording the marks it enters (the rank body of
test_phases' multi-rank test; spawned processes import it without pytest).

Fixed synthetic batches (tests/support/harness.py), dp 2: two epochs of 4 steps with a save every 2 steps
and at each epoch's end, a validation after each epoch in which rank 1 gets three batches and rank 0 one
(ranks may tick unequally, never mark unequally). A subscriber (``PhaseMarks.subscribe``) writes each
rank's marks as ``[seq, phase, step]`` and its ticks as ``[seq, phase]`` to ``DIR/marks-rank{R}.json``.
"""

from __future__ import annotations

import json
import threading

import torch

from tests.support import SMALL_RUN, flags
from tests.support.tensor_parallel import gloo_group

EPOCHS = 2


def record_marks(rank: int, workdir: str) -> None:
    from pipeline import config
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.phases import Mark, PhaseMarks
    from pipeline.train import Loaders, build_trainer
    from tests.support.harness import FixedLoader, fixed_loaders

    with gloo_group(rank, workdir) as root:
        argv = [
            *flags("--data {} --run-dir {}", root / "no-data", root / "run"),
            *SMALL_RUN,
            *flags("--tp 1 --epochs {} --checkpoint.every-steps 2 --train.control-every 2", EPOCHS),
            *flags("--train.log-every 1"),
        ]
        cfg = config.validate(config.parse(argv)[0])

        def val_loader(cfg, *, dp_rank, dp_size, device, batch_size, num_classes=None, **_):
            return FixedLoader(
                dp_rank=dp_rank,
                dp_size=dp_size,
                batch_size=batch_size,
                num_classes=num_classes,
                epoch=99,
                device=device,
                steps=1 + 2 * dp_rank,  # rank 0: one batch, rank 1: three
            )

        marks, ticks = [], []
        seen = PhaseMarks()

        def record(mark: Mark) -> None:
            if marks and mark.seq == marks[-1][0]:
                ticks.append([mark.seq, str(mark.phase)])
            else:
                marks.append([mark.seq, str(mark.phase), mark.step])

        seen.subscribe(record)
        dims = ParallelDims(2, rank, 1)
        loaders = Loaders(train=fixed_loaders().train, val=val_loader)
        trainer = build_trainer(
            cfg, build_mesh(dims, "cpu"), torch.device("cpu"), threading.Event(), loaders, marks=seen
        )
        outcome = trainer.fit()
        result = {"marks": marks, "ticks": ticks, "step": outcome.progress.step}
        (root / f"marks-rank{rank}.json").write_text(json.dumps(result))
