"""Benchmarks: the figures in docs/BENCHMARKS.md, each with the command that reproduces it.

    python -m pipeline.bench.train    the Trainer's loop against a plain one, the tower split, the checkpoint
                                      stall, the scaling estimate; --gpu-report: the GPU input path (bench.gpu)
    python -m pipeline.bench.data     the input pipeline: throughput, resume, hashing, the training thread's share
    python -m pipeline.bench.model    the model's step alone (fp32/bf16, compiled)
    python -m pipeline.bench.scale    fixed costs at ImageNet's size against a small set
    python -m pipeline.bench.profiling  the loop with and without the on-demand profiler, and inside a window

``harness`` is what they share (set-up, the two loops, timed loaders, the machine's description).
"""
