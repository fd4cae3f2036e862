"""The researcher's tools, run on finished (or running) training runs; the training core never imports them.

python -m pipeline.tools.evaluate   top-1/top-5 error, centre crop or 10 views, one model or an ensemble
python -m pipeline.tools.analysis   the paper's figures 3 (conv1 kernels) and 4 (nearest neighbours)
python -m pipeline.tools.ablate     one run per switched-off ingredient, tabulated against the baseline
python -m pipeline.tools.report     a run's report: curves, errors beside the paper's, figures, checkpoints
"""
