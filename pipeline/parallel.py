"""Autograd-aware collectives for the paper's two-GPU split (tensor parallelism over a 2-rank group).

Each rank holds one tower, i.e. a block of every layer's output units. Where the paper connects a
layer to *both* GPUs (conv3, fc6, fc7, fc8), the ranks all-gather the previous layer's blocks. The
two gathers below have the same forward and differ in backward, because what the ranks do with
the gathered tensor decides where its gradient comes from:

``exchange``
    Every rank feeds the gathered tensor to *its own* layer (different weights per rank). The
    gradient of the gathered tensor is then a different partial gradient on each rank, and the
    true gradient of a rank's block is the sum over ranks: all-reduce, then keep the own slice
    (a reduce-scatter, written as all_reduce + slice because gloo has no reduce_scatter).
``gather_replicated``
    Every rank computes the *same* function of the gathered tensor: the loss on the full logits,
    computed identically on both ranks. Each rank's gradient of the gathered tensor is already
    the whole gradient, so backward only keeps the own slice; summing would double-count it.

With that convention each rank's parameter gradients are exactly the single-device gradients of
its parameters for the same loss. The process group is always passed in (never the default
group), and only all_gather/all_reduce are used, so NCCL (GPUs) and gloo (CPU tests) both work.
Blocks may be uneven (an odd number of classes): they are padded to the largest block for the
all-gather and trimmed after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def exchange(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """All-gather equal blocks along ``dim`` for a rank-specific consumer; backward all-reduces."""
    sizes = [x.shape[dim]] * dist.get_world_size(group)
    return _Gather.apply(x, group, dim, sizes, True)


def gather_replicated(x: Tensor, group: ProcessGroup, dim: int = 1, sizes: Sequence[int] | None = None) -> Tensor:
    """All-gather blocks (``sizes[r]`` along ``dim`` from rank r; default: equal) for a consumer
    that every rank computes identically; backward keeps the own slice of the gradient."""
    sizes = list(sizes) if sizes is not None else [x.shape[dim]] * dist.get_world_size(group)
    return _Gather.apply(x, group, dim, sizes, False)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        group: ProcessGroup,
        dim: int,
        sizes: list[int],
        reduce_grad: bool,
    ) -> Tensor:
        rank = dist.get_rank(group)
        if len(sizes) != dist.get_world_size(group) or x.shape[dim] != sizes[rank]:
            raise ValueError(
                f"rank {rank} holds {x.shape[dim]} units along dim {dim}; "
                f"expected blocks {sizes} over {dist.get_world_size(group)} ranks"
            )
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        ctx.offset, ctx.size = sum(sizes[:rank]), sizes[rank]
        return _all_gather(x, group, dim, sizes)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.reduce_grad:
            grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
            dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.offset, ctx.size), None, None, None, None


def _all_gather(x: Tensor, group: ProcessGroup, dim: int, sizes: list[int]) -> Tensor:
    """Concatenation along ``dim`` of every rank's block, in group-rank order."""
    widest = max(sizes)
    if x.shape[dim] < widest:
        pad = list(x.shape)
        pad[dim] = widest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    x = x.contiguous()
    blocks = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(blocks, x, group=group)
    return torch.cat([block.narrow(dim, 0, n) for block, n in zip(blocks, sizes)], dim)
