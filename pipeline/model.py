"""The paper's AlexNet (Krizhevsky, Sutskever & Hinton, 2012), on one device or split over two GPUs.

Architecture (input 3x227x227; the paper's "224" is a known typo): conv1 96x11x11 stride 4, ReLU,
LRN, max-pool 3/2; conv2 256x5x5 pad 2, ReLU, LRN, pool; conv3 384x3x3, conv4 384x3x3,
conv5 256x3x3 (pad 1, ReLU), pool; fc6 4096, fc7 4096 (ReLU, dropout 0.5); fc8 ``num_classes``.

Two forms, one weight semantics
-------------------------------
The paper (its figure 2) puts half of every layer on each of two GPUs: two "towers". conv2, conv4
and conv5 see only the maps of their own tower; conv3, fc6, fc7 and fc8 see both. ``AlexNet``
builds either form:

- ``tp_group=None``: one module with both towers. conv2/4/5 are grouped convolutions (groups=2)
  and LRN normalises each tower's maps separately, as each GPU did (a single LRN over all
  channels would mix the towers at the boundary channel). 60,965,224 parameters at 1000 classes.
- ``tp_group`` of two ranks: this rank's tower only (conv1 48, conv2 128, conv3 192, conv4 192,
  conv5 128, fc6 2048, fc7 2048 and fc8 ``ceil(num_classes/2)`` on rank 0, the rest on rank 1).
  The cross-tower layers all-gather activations with ``pipeline.parallel.exchange``; fc8's blocks
  are gathered so that *both* ranks return the full logits.

Gradient convention for the tower form: compute the loss identically on both ranks from the full
logits and call backward on both. ``pipeline.parallel`` is written for exactly that case: each
rank's parameter gradients are then the single-device gradients of its parameters (not 2x).

State-dict conversion
---------------------
Both forms use the same names (``conv1.weight`` ... ``fc8.bias``), and a tower's tensor is its
block of rows (dim 0: output units) of the full tensor: tower 0 the first ``ceil(n/2)`` rows,
tower 1 the rest (``tower_sizes``). This holds for the grouped convolutions too, since group g of
a grouped convolution is exactly tower g's convolution. Hence the exact conversions:

- ``tower_state_dict(full_sd, tp_rank, tp_size=2)``: the rank's tower (``tp_size=1``: a copy of all);
- ``merge_tower_state_dicts([sd0, sd1])``: the full state.

Both apply to any mapping keyed by parameter names, e.g. SGD momentum buffers. ``unwrap`` strips
DDP and ``torch.compile`` wrappers, so saved keys never carry ``module.`` or ``_orig_mod.``.

Initialisation (the paper): weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7 (the
paper's "second, fourth and fifth convolutional layers" and the hidden fully-connected layers), 0
elsewhere. Weights are drawn for the full layer and sliced, from a generator seeded by one draw of
the global RNG: under the same ``torch.manual_seed`` a tower equals ``tower_state_dict`` of the
single-device model, so tp=1 and tp=2 runs start from the same weights, and two ranks with the same
seed do not get identical (symmetric) towers.

Dropout masks do not depend on the layout: every rank draws the mask of the *full* layer from
the global RNG and keeps its tower's columns, so under the same seed a tower's mask is its slice
of the mask a single device draws, and a tp=2 run trains like a tp=1 run step for step. This needs
equal RNG states on the two ranks of a pair (the trainer seeds a pair alike and replicas apart, ``pipeline.seeds``).

Ablation switches (``ModelConfig``; defaults are the paper): ``activation`` relu|tanh,
``overlap_pool`` (3/2 max-pooling, else 2/2, same output shapes), ``lrn``, ``dropout`` and
``towers``: 2 (the paper's two columns) or 1 (one full-width column, no grouping: conv2/4/5 and
LRN see every channel; tp=1 only). A one-column model is stored as the single tower 0
(``to_towers``/``from_towers``).

``python -m pipeline.model [--num-classes N] [--tp 1|2]`` prints the layer table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from pipeline.options import Check, Section, one_of, option
from pipeline.parallel import exchange, gather_replicated

TOWERS = 2
PAPER_WIDTHS = (96, 256, 384, 384, 256)
INPUT_SIZE = (3, 227, 227)
_ONE_BIAS = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})
INITS = ("paper", "kaiming")
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def tower_sizes(n: int, tp_size: int = TOWERS) -> tuple[int, ...]:
    """How ``n`` output units split over ``tp_size`` towers: earlier towers take the ceil share."""
    return tuple((n + tp_size - 1 - r) // tp_size for r in range(tp_size))


def check_widths(num_classes: int, widths: Sequence[int], fc_width: int) -> None:
    """Raise ValueError unless every split layer can be halved between the two towers."""
    if len(widths) != 5 or any(w <= 0 or w % 2 for w in widths):
        raise ValueError(
            f"widths must be 5 positive even numbers (conv1..conv5; each of the paper's "
            f"two towers holds half of every layer); got {tuple(widths)}"
        )
    if fc_width <= 0 or fc_width % 2:
        raise ValueError(
            f"fc_width must be a positive even number (fc6 and fc7 are split in half "
            f"between the towers); got {fc_width}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (fc8 is split between the towers); got {num_classes}")


def local_response_norm(
    x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, groups: int = 1
) -> Tensor:
    """The paper's LRN: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta.

    ``alpha`` multiplies the plain sum; torch's ``F.local_response_norm`` divides it by ``size``.
    With ``groups`` the channels are normalised in ``groups`` separate blocks (one per tower):
    the window never crosses a block boundary. The sum is taken in at least float32, also under
    bf16 autocast (CPU has no bf16 avg_pool3d, and the sum is the precision-sensitive part).
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    squares = wide.square().unflatten(1, (groups, -1))  # [N, groups, C/groups, H, W]: windows stay in a group
    squares = F.pad(squares, (0, 0, 0, 0, size // 2, (size - 1) // 2))  # zeros beyond the edge channels
    window_sum = F.avg_pool3d(squares, (size, 1, 1), stride=1).flatten(1, 2) * size
    return x / (k + alpha * window_sum).pow(beta).to(x.dtype)


class LocalResponseNorm(nn.Module):
    """``local_response_norm`` with the paper's constants (k=2, n=5, alpha=1e-4, beta=0.75)."""

    def __init__(self, groups: int = 1, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class AlexNet(nn.Module):
    """Both towers on one device (``tp_group=None`` or a 1-rank group) or this rank's tower."""

    def __init__(
        self,
        num_classes: int = 1000,
        widths: Sequence[int] = PAPER_WIDTHS,
        fc_width: int = 4096,
        dropout: float = 0.5,
        lrn: bool = True,
        *,
        tp_group: ProcessGroup | None = None,
        init: str = "paper",
        activation: str = "relu",
        overlap_pool: bool = True,
        towers: int = TOWERS,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"model.init must be one of {', '.join(INITS)} (got {init!r})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) (got {dropout})")
        if towers not in (1, TOWERS):
            raise ValueError(f"model.towers must be 1 or {TOWERS} (got {towers})")
        self.init, self.activation, self.towers, self.dropout_p = init, activation, towers, dropout
        self.act = ACTIVATIONS[activation]
        check_widths(num_classes, widths, fc_width)
        if tp_group is not None and dist.get_world_size(tp_group) == 1:
            tp_group = None
        if towers == 1 and tp_group is not None:
            raise ValueError("model.towers=1 (one full-width column) has nothing to split: run it with --tp 1")
        self.tp_group = tp_group
        self.tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        if self.tp_size not in (1, TOWERS):
            raise ValueError(f"the paper's split has {TOWERS} towers; got a tensor-parallel group of {self.tp_size}")
        self.widths, self.fc_width, self.num_classes = tuple(widths), fc_width, num_classes
        self.full_width = dict(
            zip(
                ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"),
                (*self.widths, fc_width, fc_width, num_classes),
            )
        )
        own = {name: tower_sizes(n, self.tp_size)[self.tp_rank] for name, n in self.full_width.items()}
        # 2: grouped convolutions and LRN; 1: one tower, or the one-column model
        towers_here = towers // self.tp_size

        # nn layers' own init consumes the global RNG by layer size, i.e. differently per layout (and per
        # tower with an odd class count); it is overwritten anyway, so it runs on a forked RNG: after
        # construction the global RNG has advanced by this one draw in every layout, and the dropout
        # masks drawn from it next are the same whatever the split.
        init_seed = int(torch.randint(2**62, (), device="cpu"))
        pool = (3, 2) if overlap_pool else (2, 2)  # overlapping pooling: z=3, s=2; 2/2 gives the same shapes
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv2d(3, own["conv1"], 11, stride=4)
            self.norm1 = LocalResponseNorm(towers_here) if lrn else nn.Identity()
            self.pool1 = nn.MaxPool2d(*pool)
            self.conv2 = nn.Conv2d(own["conv1"], own["conv2"], 5, padding=2, groups=towers_here)
            self.norm2 = LocalResponseNorm(towers_here) if lrn else nn.Identity()
            self.pool2 = nn.MaxPool2d(*pool)
            self.conv3 = nn.Conv2d(self.widths[1], own["conv3"], 3, padding=1)  # sees both towers
            self.conv4 = nn.Conv2d(own["conv3"], own["conv4"], 3, padding=1, groups=towers_here)
            self.conv5 = nn.Conv2d(own["conv4"], own["conv5"], 3, padding=1, groups=towers_here)
            self.pool5 = nn.MaxPool2d(*pool)
            self.fc6 = nn.Linear(self.widths[4] * 6 * 6, own["fc6"])
            self.fc7 = nn.Linear(fc_width, own["fc7"])
            self.fc8 = nn.Linear(fc_width, own["fc8"])
        # Applied to the outputs of fc6 and fc7 ("dropout in the first two fully-connected layers";
        # as in Caffe's reference net), before the exchange: each unit is dropped by the rank that
        # owns it, so both ranks see the same dropped vector (``_dropout``). Inverted dropout: kept
        # units are scaled by 1/(1-p) in training and nothing happens at test time, where the
        # paper multiplies the outputs by 0.5 at test time. Both make the expected training
        # activation equal the test activation; the nets differ only by a factor 2 folded into the
        # next layer's weights.
        self.reset_parameters(init_seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """The init, each weight drawn for the full layer and this tower's rows kept.

        ``paper``: N(0, 0.01) weights, biases 1 in conv2/4/5, fc6, fc7. ``kaiming``: N(0, 2/fan_in)
        (He et al., 2015) and zero biases, for small datasets where the paper's init sits at chance
        for many epochs (the demo)."""
        generator = torch.Generator().manual_seed(seed)
        for name, n in self.full_width.items():
            layer = getattr(self, name)
            shape = (n, *layer.weight.shape[1:])
            fan_in = math.prod(shape[1:])
            std = 0.01 if self.init == "paper" else math.sqrt((1.0 if name == "fc8" else 2.0) / fan_in)
            full = torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)
            layer.weight.copy_(full.split(tower_sizes(n, self.tp_size))[self.tp_rank])
            layer.bias.fill_(1.0 if self.init == "paper" and name in _ONE_BIAS else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes]; in the tower form every rank returns the full logits."""
        h = self._exchange(self._dropout(self._fc7(x), "fc7"))
        return self._gather(self.fc8(h), self.num_classes)

    def fc7_features(self, x: Tensor) -> Tensor:
        """fc7's activations [N, fc_width] (post-activation, no dropout) for the paper's nearest-neighbour
        retrieval; the tower form gathers the full vector (a collective: call it on both ranks)."""
        return self._gather(self._fc7(x), self.fc_width)

    @torch.no_grad()
    def conv1_filters(self) -> list[Tensor]:
        """conv1's kernels per tower, ``[w/2, 3, 11, 11]`` each (the paper's figure 3: colour-agnostic
        on one GPU, colour-specific on the other; one ``[w, 3, 11, 11]`` for the one-column model);
        a collective in the tower form."""
        weight = self._gather(self.conv1.weight.detach(), self.widths[0], dim=0)
        return list(weight.split(tower_sizes(self.widths[0], self.towers)))

    def _fc7(self, x: Tensor) -> Tensor:
        """This module's fc7 units, post-activation."""
        act = self.act
        x = self.pool1(self.norm1(act(self.conv1(x))))
        x = self.pool2(self.norm2(act(self.conv2(x))))
        x = act(self.conv3(self._exchange(x)))
        x = act(self.conv4(x))
        x = self.pool5(act(self.conv5(x)))
        x = act(self.fc6(self._exchange(x).flatten(1)))  # channels in tower order: the full layout
        return act(self.fc7(self._exchange(self._dropout(x, "fc6"))))

    def _dropout(self, x: Tensor, layer: str) -> Tensor:
        """Inverted dropout whose mask is this tower's columns of the full layer's mask (layout-free)."""
        if not self.training or self.dropout_p == 0.0:
            return x
        n = self.full_width[layer]
        offset = sum(tower_sizes(n, self.tp_size)[: self.tp_rank])
        keep = torch.rand(x.shape[0], n, device=x.device).narrow(1, offset, x.shape[1]) >= self.dropout_p
        return x * keep.to(x.dtype) / (1.0 - self.dropout_p)

    def _exchange(self, x: Tensor) -> Tensor:
        """Both towers' units for a cross-tower layer (identity when this module holds both)."""
        return x if self.tp_group is None else exchange(x, self.tp_group)

    def _gather(self, x: Tensor, n: int, dim: int = 1) -> Tensor:
        """The full ``n`` units that every rank then uses identically (identity on one device)."""
        if self.tp_group is None:
            return x
        return gather_replicated(x, self.tp_group, dim, tower_sizes(n, self.tp_size))


@dataclass
class ModelConfig(Section):
    num_classes: int = option(0, Check(lambda x: x == 0 or x >= 2, "at least 2, or 0 for the dataset's class count"))
    """classes (fc8's outputs); 0 = the dataset's class count (the paper: 1000); tp=2: tower 0 holds the ceil half"""
    widths: tuple[int, ...] = option(
        PAPER_WIDTHS, Check(lambda x: len(x) == 5 and all(w >= 2 and w % 2 == 0 for w in x), "five even widths >= 2")
    )
    """output channels of conv1..conv5 (the paper: 96,256,384,384,256); even: each tower holds half"""
    fc_width: int = option(4096, Check(lambda x: x >= 2 and x % 2 == 0, "even and at least 2"))
    """units of fc6 and fc7 (the paper: 4096); even"""
    dropout: float = option(0.5, Check(lambda x: 0 <= x < 1, "in [0, 1)"))
    """dropout probability on the outputs of fc6 and fc7 during training (the paper: 0.5)"""
    lrn: bool = True
    """local response normalisation after conv1 and conv2 (the paper: on)"""
    init: str = option("paper", one_of(*INITS))
    """paper: N(0, 0.01) and the paper's biases; kaiming: He-normal, zero biases (small-data demos)"""
    activation: str = option("relu", one_of(*ACTIVATIONS))
    """non-linearity after every conv and hidden fc layer: relu (the paper) or tanh (its figure 1)"""
    overlap_pool: bool = True
    """max-pooling 3x3 stride 2 (the paper's overlapping pooling); false: 2x2 stride 2 (same shapes)"""
    towers: int = option(TOWERS, one_of(1, TOWERS))
    """2: the paper's two columns (grouped conv2/4/5, per-tower LRN); 1: one full-width column (tp=1 only)"""
    channels_last: bool = False
    """store conv weights channels-last; convolutions then run channels-last from the first one on"""
    compile: bool = False
    """torch.compile the module in place (nn.Module.compile): state-dict keys are unchanged"""

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        super().__post_init__()


def build_model(cfg: ModelConfig, tp_group: ProcessGroup | None = None) -> AlexNet:
    """The single-device model (``tp_group`` None or of size 1) or this rank's tower (size 2)."""
    model = AlexNet(
        cfg.num_classes,
        cfg.widths,
        cfg.fc_width,
        cfg.dropout,
        cfg.lrn,
        tp_group=tp_group,
        init=cfg.init,
        activation=cfg.activation,
        overlap_pool=cfg.overlap_pool,
        towers=cfg.towers,
    )
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile(model)`` (``._orig_mod``) wrappers, whose
    state-dict keys carry those prefixes; ``build_model`` compiles in place, so its models need none."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def tower_state_dict(full: Mapping[str, Tensor], tp_rank: int, tp_size: int = TOWERS) -> dict[str, Tensor]:
    """Rank ``tp_rank``'s tower of a single-device state (or of any tensors keyed like it)."""
    if tp_size not in (1, TOWERS) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tower {tp_rank} of {tp_size}: the paper's split has {TOWERS} towers")
    return {name: t.split(tower_sizes(t.shape[0], tp_size))[tp_rank].clone() for name, t in full.items()}


def merge_tower_state_dicts(towers: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The single-device state from the towers' states, in tower order (inverse of ``tower_state_dict``)."""
    if len(towers) not in (1, TOWERS) or any(set(t) != set(towers[0]) for t in towers):
        raise ValueError(f"expected 1 or {TOWERS} tower states with the same keys; got {[sorted(t) for t in towers]}")
    return {name: torch.cat([t[name] for t in towers]) for name in towers[0]}


def to_towers(full: Mapping[str, Tensor], towers: int = TOWERS) -> dict[int, dict[str, Tensor]]:
    """A single-device state (or momentum) in the stored tower form: {0: ..., 1: ...} for the paper's
    two columns, {0: everything} for the one-column model (``towers=1``)."""
    return {t: tower_state_dict(full, t, towers) for t in range(towers)}


def from_towers(towers: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The single-device state from the stored tower form (inverse of ``to_towers``; 1 or 2 towers)."""
    if sorted(towers) not in ([0], list(range(TOWERS))):
        raise ValueError(f"expected towers 0..{TOWERS - 1} or tower 0 alone; got {sorted(towers)}")
    return merge_tower_state_dicts([towers[t] for t in sorted(towers)])


# ---------------------------------------------------------------------------- layer table


@dataclass(frozen=True)
class LayerRow:
    name: str
    output: tuple[int, ...]
    """per image: (C, H, W) or (units,)"""
    params: int
    flops: int
    """forward, per image: 2 x multiply-adds of the conv/fc layer (LRN, pooling, ReLU not counted)"""


def layer_table(model: AlexNet, tower: int | None = None) -> list[LayerRow]:
    """Rows for the conv, fc, LRN and pooling layers of a single-device ``model``, from forward hooks
    on one image; ``tower=t`` gives tower t's share (its block of every layer's outputs)."""
    if model.tp_group is not None:
        raise ValueError("layer_table needs the single-device model (it reports towers with tower=)")
    rows: list[LayerRow] = []

    def record(name: str, module: nn.Module, output: Tensor) -> None:
        shape = tuple(output.shape[1:])
        params = dict(module.named_parameters())
        if tower is not None:
            shape = (tower_sizes(shape[0])[tower], *shape[1:])
            params = tower_state_dict(params, tower)
        fan_in = module.weight[0].numel() if isinstance(module, (nn.Conv2d, nn.Linear)) else 0
        n_out = torch.Size(shape).numel()
        rows.append(LayerRow(name, shape, sum(p.numel() for p in params.values()), 2 * n_out * fan_in))

    kinds = (nn.Conv2d, nn.Linear, nn.MaxPool2d, LocalResponseNorm)
    hooks = [
        m.register_forward_hook(lambda m, _, out, name=name: record(name, m, out))
        for name, m in model.named_children()
        if isinstance(m, kinds)
    ]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *INPUT_SIZE, device=model.conv1.weight.device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return rows


def format_table(rows: Sequence[LayerRow], title: str) -> str:
    lines = [title, f"{'layer':<8}{'output':>16}{'params':>14}{'MFLOPs':>11}"]
    lines += [
        f"{r.name:<8}{' x '.join(map(str, r.output)):>16}{r.params:>14,}"
        f"{f'{r.flops / 1e6:,.1f}' if r.flops else '-':>11}"
        for r in rows
    ]
    lines.append(f"{'total':<8}{'':>16}{sum(r.params for r in rows):>14,}{sum(r.flops for r in rows) / 1e6:>11,.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.model",
        description="Print AlexNet's layer table: output shape, parameters and forward FLOPs per layer "
        "(per image; FLOPs = 2 x multiply-adds of the conv/fc layers), per tower with --tp 2.",
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--tp",
        type=int,
        choices=(1, TOWERS),
        default=1,
        help="1: one device, both towers (grouped convolutions); 2: one tower per GPU",
    )
    args = parser.parse_args(argv)
    try:
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            model = AlexNet(args.num_classes)
    except ValueError as e:
        parser.error(str(e))
    shape = "x".join(map(str, INPUT_SIZE))
    if args.tp == 1:
        print(format_table(layer_table(model), f"AlexNet, {args.num_classes} classes, input {shape}, one device"))
        return
    for t in range(TOWERS):
        print(
            format_table(
                layer_table(model, t),
                f"AlexNet tower {t} of {TOWERS} (tp rank {t}), {args.num_classes} classes, input {shape}",
            )
        )
        print()
    rows = layer_table(model)
    print(
        f"both towers: {sum(r.params for r in rows):,} parameters, "
        f"{sum(r.flops for r in rows) / 1e6:,.1f} MFLOPs per image"
    )


if __name__ == "__main__":
    main()
