"""The single-device AlexNet: the paper's shapes, parameter count, LRN, init, dropout, the
state-dict conversion to and from towers, the optional knobs and the layer-table CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import (
    AlexNet,
    ModelConfig,
    build_model,
    from_towers,
    layer_table,
    local_response_norm,
    main,
    merge_tower_state_dicts,
    to_towers,
    tower_state_dict,
    unwrap,
)
from tests.support import NARROW_FC_WIDTH, NARROW_WIDTHS, flags

NARROW_CONFIG = {"num_classes": 10, "widths": NARROW_WIDTHS, "fc_width": NARROW_FC_WIDTH}


@pytest.fixture(scope="module")
def alexnet() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet()


def paper_lrn(a: torch.Tensor, n: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75) -> torch.Tensor:
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, channel by channel."""
    channels = a.shape[1]
    b = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        b[:, i] = a[:, i] / (k + alpha * a[:, lo : hi + 1].square().sum(1)) ** beta
    return b


def test_shape_trace(alexnet: AlexNet) -> None:
    shapes = {row.name: row.output for row in layer_table(alexnet)}
    assert shapes == {
        "conv1": (96, 55, 55),
        "norm1": (96, 55, 55),
        "pool1": (96, 27, 27),
        "conv2": (256, 27, 27),
        "norm2": (256, 27, 27),
        "pool2": (256, 13, 13),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "pool5": (256, 6, 6),
        "fc6": (4096,),
        "fc7": (4096,),
        "fc8": (1000,),
    }
    assert alexnet.eval()(torch.randn(2, 3, 227, 227)).shape == (2, 1000)


def test_parameter_count(alexnet: AlexNet) -> None:
    assert sum(p.numel() for p in alexnet.parameters()) == 60_965_224


def test_lrn_is_the_papers_formula() -> None:
    a = 30 * torch.randn(2, 12, 3, 3, dtype=torch.float64)  # large enough that alpha * sum matters
    expected = paper_lrn(a)
    torch.testing.assert_close(local_response_norm(a), expected)
    torch.testing.assert_close(F.local_response_norm(a, 5, alpha=5e-4, beta=0.75, k=2.0), expected)
    assert not torch.allclose(F.local_response_norm(a, 5, alpha=1e-4, beta=0.75, k=2.0), expected)


def test_grouped_lrn_normalises_each_tower_on_its_own() -> None:
    a = 30 * torch.randn(2, 12, 3, 3, dtype=torch.float64)
    per_tower = torch.cat([paper_lrn(a[:, :6]), paper_lrn(a[:, 6:])], 1)
    torch.testing.assert_close(local_response_norm(a, groups=2), per_tower)
    mixed = ~torch.isclose(paper_lrn(a), per_tower).flatten(2).all(2).all(0)
    assert mixed.nonzero().flatten().tolist() == [4, 5, 6, 7]  # only the channels by the boundary


def test_paper_initialisation(alexnet: AlexNet) -> None:
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(alexnet, name)
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.03), name
        assert abs(layer.weight.mean().item()) < 1e-3, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(layer.bias, torch.full_like(layer.bias, expected_bias)), name


def test_dropout_only_in_training() -> None:
    model = AlexNet(**NARROW_CONFIG, dropout=0.5)
    undropped = AlexNet(**NARROW_CONFIG, dropout=0.0)
    undropped.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 227, 227)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), undropped.eval()(x))  # inverted dropout: nothing to rescale at test


def test_fc7_features_and_conv1_filters(alexnet: AlexNet) -> None:
    x = torch.randn(2, 3, 227, 227)
    alexnet.eval()
    with torch.no_grad():
        features = alexnet.fc7_features(x)
        assert features.shape == (2, 4096) and features.min() >= 0
        torch.testing.assert_close(alexnet.fc8(features), alexnet(x))
    filters = alexnet.conv1_filters()
    assert [f.shape for f in filters] == [(48, 3, 11, 11)] * 2
    assert torch.equal(torch.cat(filters), alexnet.conv1.weight)


def test_tower_state_dicts(alexnet: AlexNet) -> None:
    full = alexnet.state_dict()
    towers = [tower_state_dict(full, r) for r in range(2)]
    assert {k: tuple(v.shape) for k, v in towers[1].items() if k.endswith("weight")} == {
        "conv1.weight": (48, 3, 11, 11),
        "conv2.weight": (128, 48, 5, 5),
        "conv3.weight": (192, 256, 3, 3),
        "conv4.weight": (192, 192, 3, 3),
        "conv5.weight": (128, 192, 3, 3),
        "fc6.weight": (2048, 9216),
        "fc7.weight": (2048, 4096),
        "fc8.weight": (500, 4096),
    }
    merged = merge_tower_state_dicts(towers)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    again = [tower_state_dict(merged, r) for r in range(2)]
    assert all(torch.equal(again[r][k], towers[r][k]) for r in range(2) for k in full)
    assert all(torch.equal(v, full[k]) for k, v in tower_state_dict(full, 0, tp_size=1).items())


def test_odd_number_of_classes_gives_tower_0_the_larger_half() -> None:
    full = AlexNet(**{**NARROW_CONFIG, "num_classes": 7}).state_dict()
    assert [tower_state_dict(full, r)["fc8.bias"].numel() for r in range(2)] == [4, 3]


@pytest.mark.parametrize("option, value", [("widths", (16, 32, 47, 48, 32)), ("fc_width", 63)])
def test_odd_widths_are_refused(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option.replace("_", "[-_]")):  # the flag, --model.fc-width, once named
        ModelConfig(**{**NARROW_CONFIG, option: value})
    with pytest.raises(ValueError, match=option):
        AlexNet(**{**NARROW_CONFIG, option: value})


def test_build_model_knobs_keep_logits_and_state_dict_keys() -> None:
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**NARROW_CONFIG)).eval()
    torch.manual_seed(0)
    channels_last = build_model(ModelConfig(**NARROW_CONFIG, channels_last=True)).eval()
    assert channels_last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 227, 227)
    torch.testing.assert_close(channels_last(x), plain(x))
    compiled = build_model(ModelConfig(**NARROW_CONFIG, compile=True))  # compiles lazily: no forward here
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert unwrap(torch.compile(plain)) is plain and unwrap(compiled) is compiled


def test_runs_under_bf16_autocast() -> None:
    model = AlexNet(**NARROW_CONFIG)
    x = torch.randn(2, 3, 227, 227)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, torch.tensor([1, 2]))
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    torch.testing.assert_close(low, model(x).detach(), rtol=0.02, atol=0.02)


def test_layer_table_cli(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    single = capsys.readouterr().out
    assert "60,965,224" in single.splitlines()[-1] and "1,448.8" in single.splitlines()[-1]
    main(flags("--tp 2 --num-classes 7"))
    towers = capsys.readouterr().out
    assert "tower 1 of 2" in towers and "48 x 55 x 55" in towers
    assert "both towers: 56,896,903 parameters" in towers


def test_ablation_switches_change_only_what_they_name(alexnet: AlexNet) -> None:
    shapes = [(r.name, r.output) for r in layer_table(alexnet)]
    torch.manual_seed(0)
    flat = AlexNet(overlap_pool=False)
    assert [(r.name, r.output) for r in layer_table(flat)] == shapes  # 2/2 pooling keeps the shapes
    assert (flat.pool1.kernel_size, flat.pool1.stride) == (2, 2)
    assert (alexnet.pool1.kernel_size, alexnet.pool1.stride) == (3, 2)
    x = torch.randn(2, 3, 227, 227)
    relu, tanh = (
        build_model(ModelConfig(**NARROW_CONFIG, init="kaiming", activation=a)).eval() for a in ("relu", "tanh")
    )
    tanh.load_state_dict(relu.state_dict())
    with torch.no_grad():
        assert relu.fc7_features(x).min() >= 0 and tanh.fc7_features(x).min() < 0
        assert not torch.allclose(relu(x), tanh(x))
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="sigmoid")
    with pytest.raises(ValueError, match="towers"):
        ModelConfig(towers=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)


def test_one_full_width_column() -> None:
    with torch.device("meta"):
        column = AlexNet(towers=1)
    # conv2, conv4 and conv5 see all channels: 1,413,120 more weights than the paper's two towers
    assert sum(p.numel() for p in column.parameters()) == 60_965_224 + 1_413_120
    assert column.conv2.groups == column.conv4.groups == column.conv5.groups == 1 and column.norm1.groups == 1
    torch.manual_seed(0)
    narrow = AlexNet(**NARROW_CONFIG, towers=1)
    assert [f.shape for f in narrow.conv1_filters()] == [(16, 3, 11, 11)]
    full = narrow.state_dict()
    stored = to_towers(full, towers=1)
    assert list(stored) == [0] and all(torch.equal(stored[0][k], full[k]) for k in full)
    back = from_towers(stored)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    two = to_towers(AlexNet(**NARROW_CONFIG).state_dict())
    assert list(two) == [0, 1] and from_towers(two)["conv2.weight"].shape == (32, 8, 5, 5)
    with pytest.raises(ValueError, match="tower"):
        from_towers({1: two[1]})


def test_dropout_masks_whole_units_with_the_papers_rate() -> None:
    model = AlexNet(**NARROW_CONFIG, dropout=0.5).train()
    x = torch.ones(400, 64)
    dropped = model._dropout(x, "fc6")
    assert set(dropped.unique().tolist()) == {0.0, 2.0}  # inverted dropout: kept units scaled by 1/(1-p)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(model.eval()._dropout(x, "fc6"), x)
