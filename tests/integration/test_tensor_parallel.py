"""The tower form on two gloo ranks against the single-device model: same logits, gradients,
fc7 features, conv1 filters and initialisation, for the same weights and batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import AlexNet, ModelConfig, build_model, tower_state_dict
from tests.support import NARROW_FC_WIDTH, NARROW_WIDTHS
from tests.support.tensor_parallel import WORLD, spawn_two_ranks, tp_ranks, train_steps

pytestmark = pytest.mark.multiprocess  # two gloo ranks spawned per case

NARROW_CONFIG = {"widths": NARROW_WIDTHS, "fc_width": NARROW_FC_WIDTH, "dropout": 0.0}
CASES = {"even classes": {**NARROW_CONFIG, "num_classes": 10}, "odd classes": {**NARROW_CONFIG, "num_classes": 7}}
_gen = torch.Generator().manual_seed(7)
# the paper's dropout (0.5) and an odd class count (the towers' fc8 blocks differ in size)
TRAINING = {
    "cfg": {**NARROW_CONFIG, "num_classes": 7, "dropout": 0.5, "init": "kaiming"},
    "seed": 3,
    "batches": [
        (torch.randn(4, 3, 227, 227, generator=_gen), torch.randint(7, (4,), generator=_gen)) for _ in range(3)
    ],
}


def random_state(model: AlexNet, seed: int) -> dict[str, torch.Tensor]:
    """He-scaled random weights and biases: O(1) activations, so every comparison has signal
    (the paper's N(0, 0.01) init gives a narrow net near-constant logits)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        scale = (2.0 / t[0].numel()) ** 0.5 if name.endswith("weight") else 0.1
        state[name] = torch.randn(t.shape, generator=gen) * scale
    return state


def single_device(case: dict[str, Any]) -> dict[str, Any]:
    """What the ranks compute, on one device with both towers."""
    torch.manual_seed(case["seed"])
    model = build_model(ModelConfig(**case["cfg"]))
    out: dict[str, Any] = {"init": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(case["state"])
    logits = model.train()(case["x"])
    F.cross_entropy(logits, case["y"]).backward()
    out["logits"] = logits.detach()
    out["grads"] = {name: p.grad for name, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out["fc7"] = model.fc7_features(case["x"])
    out["filters"] = model.conv1_filters()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One spawn of two ranks for all cases (process start-up dominates the cost)."""
    workdir = tmp_path_factory.mktemp("tp")
    cases = {}
    for i, (name, cfg) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(i)
        state = random_state(AlexNet(**cfg), seed=i)
        cases[name] = {
            "cfg": cfg,
            "seed": 100 + i,
            "state": state,
            "x": torch.randn(4, 3, 227, 227, generator=gen),
            "y": torch.randint(cfg["num_classes"], (4,), generator=gen),
        }
    torch.save(cases, workdir / "cases.pt")
    torch.save(TRAINING, workdir / "training.pt")
    spawn_two_ranks(tp_ranks, (str(workdir),))
    ranks = [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]
    return {
        "ranks": ranks,
        "reference": {name: single_device(case) for name, case in cases.items()},
        "training": train_steps(TRAINING, None),
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float tolerance relative to the tensor's scale (gradients can be small everywhere)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_both_ranks_return_the_single_device_logits(runs: dict[str, Any], case: str) -> None:
    ref = runs["reference"][case]
    for rank in runs["ranks"]:
        assert_close(rank[case]["logits"], ref["logits"])
        assert_close(rank[case]["eval_logits"], ref["logits"])  # dropout=0: train == eval


@pytest.mark.parametrize("case", CASES)
def test_each_rank_gets_the_single_device_gradients_of_its_tower(runs: dict[str, Any], case: str) -> None:
    expected = runs["reference"][case]["grads"]
    for r, rank in enumerate(runs["ranks"]):
        own = tower_state_dict(expected, r)
        assert rank[case]["grads"].keys() == own.keys()
        for name, grad in rank[case]["grads"].items():
            assert grad.abs().max() > 0, name
            assert_close(grad, own[name])


@pytest.mark.parametrize("case", CASES)
def test_fc7_features_and_conv1_filters_are_the_full_ones(runs: dict[str, Any], case: str) -> None:
    ref = runs["reference"][case]
    for rank in runs["ranks"]:
        assert_close(rank[case]["fc7"], ref["fc7"])
        assert len(rank[case]["filters"]) == 2
        for got, want in zip(rank[case]["filters"], ref["filters"]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
def test_a_tower_built_under_the_same_seed_is_the_single_device_models_tower(runs: dict[str, Any], case: str) -> None:
    for r, rank in enumerate(runs["ranks"]):
        expected = tower_state_dict(runs["reference"][case]["init"], r)
        assert rank[case]["init"].keys() == expected.keys()
        for name, tensor in rank[case]["init"].items():
            assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("case", CASES)
def test_ranks_agree_on_the_logits_with_dropout_on(runs: dict[str, Any], case: str) -> None:
    rank0, rank1 = (rank[case]["dropout_logits"] for rank in runs["ranks"])
    assert torch.equal(rank0, rank1)
    assert not torch.allclose(rank0, runs["reference"][case]["logits"])  # dropout did act


def test_collective_gradients(runs: dict[str, Any]) -> None:
    """exchange sums the ranks' partial gradients; gather_replicated does not (no double count)."""
    for r, rank in enumerate(runs["ranks"]):
        got = rank["collectives"]
        assert torch.equal(got["exchanged"], torch.tensor([[0.0, 1, 2, 10, 11, 12]]))
        assert torch.equal(got["exchange_grad"], 3 * torch.arange(6.0)[3 * r : 3 * r + 3])
        assert torch.equal(got["gathered"], torch.tensor([[1.0, 1, 1, 2, 2]]))
        assert torch.equal(got["gather_grad"], torch.arange(5.0)[[slice(0, 3), slice(3, 5)][r]])


def test_same_seed_trains_the_same_with_dropout_in_either_layout(runs: dict[str, Any]) -> None:
    """tp=2 draws each tower's dropout mask as its slice of the single device's: same losses, same logits."""
    ref = runs["training"]
    assert len(ref["losses"]) == 3 and len(set(float(v) for v in ref["losses"])) == 3  # it did train
    for rank in runs["ranks"]:
        for step, (loss, logits) in enumerate(zip(rank["training"]["losses"], rank["training"]["logits"])):
            assert_close(loss, ref["losses"][step])
            assert_close(logits, ref["logits"][step])
    torch.manual_seed(TRAINING["seed"])
    model = build_model(ModelConfig(**TRAINING["cfg"])).train()
    torch.manual_seed(TRAINING["seed"] + 1)  # the same weights with other masks: the comparison has teeth
    assert not torch.allclose(model(TRAINING["batches"][0][0]), ref["logits"][0], rtol=1e-3, atol=1e-3)


@pytest.mark.multiprocess
def test_replicas_draw_their_own_dropout_masks_and_a_pair_shares_one(tmp_path) -> None:
    """dp=2 x tp=2 on gloo, Trainers as built for training: the two replicas' masks differ (one device gives
    every image of the global batch its own mask), the two towers of a pair hold the columns of one mask,
    the one a single device draws for that replica."""
    from pipeline import seeds
    from tests.support.tensor_parallel import spawn_ranks, trainer_dropout_masks

    model_cfg = {**NARROW_CONFIG, "num_classes": 4, "dropout": 0.5}
    spawn_ranks(trainer_dropout_masks, (str(tmp_path), 4, 2, model_cfg, 5), nprocs=4, timeout_s=240)
    got = [torch.load(tmp_path / f"masks{r}.pt") for r in range(4)]
    by = {(g["dp"], g["tp"]): g["masks"] for g in got}
    for dp in (0, 1):
        seeds.seed_init(5, 0)
        single = build_model(ModelConfig(**model_cfg)).train()
        seeds.seed_dropout(5, dp)
        for k in range(2):
            want = single._dropout(torch.ones(6, single.fc6.out_features), "fc6") != 0
            pair = torch.cat([by[(dp, 0)][k], by[(dp, 1)][k]], dim=1)
            assert torch.equal(pair, want), f"replica {dp}: the pair's towers do not hold one mask (batch {k})"
    for tp in (0, 1):
        for k in range(2):
            assert not torch.equal(by[(0, tp)][k], by[(1, tp)][k]), f"replicas drew the same masks (tower {tp})"
