"""The input pipeline (pipeline.data): augmentation geometry and statistics, exactly-once splitting,
tensor-parallel determinism, the 10 views, labels, DALI vs the torch fallback, the mean image on the
window, exact mid-epoch resume, shard integrity, and one-line errors for crafted inputs.

Everything runs DALI on the CPU on a few 256x256 fixture images. Images whose
pixels encode their coordinates (R = x, G = y, B = a per-image tag; JPEG quality 100 without
chroma subsampling, so within a level or two of exact) make crop windows and mirrors readable
from the output; flat images make the lighting offset readable.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from basics.errors import UserError
from pipeline import data as D
from pipeline.data import config as data_config
from pipeline.data import integrity
from pipeline.data.epoch_plan import (
    Plan,
    batch_bounds,
    derive_seed,
    epoch_seed,
    plan_epoch,
    rank_range,
    shard_order,
    steps_per_epoch,
)
from pipeline.data.index_cache import index_rows
from pipeline.data.views import ten_view_windows
from preprocess import format as fmt
from tests.support import REPO
from tests.support.datasets import (
    CHANNEL_MEAN,
    CHANNEL_STD,
    EIGVAL,
    EIGVEC,
    cfg_for,
    coordinate_image,
    make_dataset,
    rewrite_member,
)

CROP = 227
MAX_OFFSET = 256 - CROP
LOADERS = ["dali", "torch"]


# --------------------------------------------------------------------------------------------
# Fixtures: built once per module, never modified (tests that break data work on a copy)


@pytest.fixture(scope="module")
def coverage_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uneven shards: train 7 + 5 + 4, val 3 + 4; label i identifies sample i."""
    return make_dataset(
        tmp_path_factory.mktemp("coverage"),
        {"train": [7, 5, 4], "val": [3, 4]},
        image=lambda i: coordinate_image(i),
        quality=60,
    )


@pytest.fixture(scope="module")
def coord_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coordinate images (B = sample number) for geometry; mean image zeros, so outputs are pixels."""
    return make_dataset(
        tmp_path_factory.mktemp("coord"), {"train": [24, 24], "val": [5]}, image=lambda i: coordinate_image(i)
    )


@pytest.fixture(scope="module")
def flat_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flat grey (128) images: any output deviation is the lighting offset."""
    return make_dataset(
        tmp_path_factory.mktemp("flat"),
        {"train": [16], "val": [2]},
        image=lambda i: np.full((256, 256, 3), 128, np.uint8),
    )


def decoded(root: Path, split: str) -> dict[int, np.ndarray]:
    """label -> the stored image decoded by PIL (an independent reference decoder)."""
    out = {}
    for shard in fmt.read_manifest(root).split(split).shards:
        with open(root / shard.path, "rb") as f:
            for _, jpg_offset, jpg_size, cls_offset, cls_size in index_rows(root / shard.index):
                f.seek(cls_offset)
                label = fmt.decode_label(f.read(cls_size))
                f.seek(jpg_offset)
                out[label] = np.asarray(Image.open(io.BytesIO(f.read(jpg_size))).convert("RGB"), np.float32)
    return out


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] float -> [..., H, W, 3] numpy."""
    return images.float().movedim(-3, -1).numpy()


def read_window(view: np.ndarray) -> tuple[int, int, bool]:
    """(left, top, mirrored) of a crop of a coordinate image: R = x, G = y."""
    r, g = view[..., 0], view[..., 1]
    mirrored = r[:, 0].mean() > r[:, -1].mean()
    left = int(round(float(r[:, -1].mean() if mirrored else r[:, 0].mean())))
    top = int(round(float(g[0, :].mean())))
    return left, top, bool(mirrored)


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_rank_ranges_steps_and_batch_bounds() -> None:
    for total in range(0, 40):
        for n in (1, 2, 3, 4, 7):
            ranges = [rank_range(total, r, n) for r in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1
            for b in (1, 2, 5):
                assert steps_per_epoch(total, n, b) * b >= max(sizes)
    # A rank one sample short: its last full batch is split rather than followed by an empty one.
    assert batch_bounds(5, 2, 5) == [(0, 3), (3, 5)]
    assert batch_bounds(6, 2, 4) == [(0, 4), (4, 6)]
    assert batch_bounds(6, 3, 3) == [(0, 3), (3, 5), (5, 6)]
    assert batch_bounds(1, 3, 2) == [(0, 1), (1, 1), (1, 1)]  # toy case: fewer samples than steps
    for samples in range(0, 30):
        for steps, size in ((3, 4), (5, 2), (2, 16)):
            if math.ceil(samples / size) > steps or math.ceil((samples + 1) / size) < steps:
                continue  # not a rank of a valid split (ranks differ by at most one sample)
            bounds = batch_bounds(samples, steps, size)
            assert len(bounds) == steps and bounds[0][0] == 0 and bounds[-1][1] == samples
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert all(0 < hi - lo <= size for lo, hi in bounds) or samples < steps
    assert derive_seed("a", 1) == derive_seed("a", 1) != derive_seed("a", 2)
    assert shard_order(10, 0, 0) != shard_order(10, 0, 1) and sorted(shard_order(10, 0, 1)) == list(range(10))


def test_config_validation() -> None:
    with pytest.raises(UserError, match="loader"):
        D.DataConfig(loader="tf")
    with pytest.raises(UserError, match="mean"):
        D.DataConfig(mean="median")
    with pytest.raises(UserError, match="crop"):
        D.DataConfig(crop=300)
    # Every name the config accepts picks an implementation, and every implementation can be picked.
    assert set(D.IMPLEMENTATIONS) == set(data_config.LOADERS) == set(LOADERS)


# --------------------------------------------------------------------------------------------
# Labels through DALI


def test_labels_read_back_through_dali(tmp_path: Path) -> None:
    written = [0, 3, 42, 999, 1234, 7, 10, 100]  # 1 to 4 ASCII digits: DALI pads them to the batch's longest
    root = make_dataset(
        tmp_path / "labels",
        {"train": [5], "val": [5, 3]},
        label=lambda i: written[i % 8] if i >= 5 else i,
        num_classes=1235,
        quality=50,
    )
    loader = D.val_loader(cfg_for(root), dp_rank=0, dp_size=1, device="cpu", batch_size=3)
    got = torch.cat([labels for _, labels in loader])
    assert got.dtype == torch.int64
    assert got.tolist() == [written[i % 8] for i in range(5, 13)]  # val is read in stored order


# --------------------------------------------------------------------------------------------
# Exactly once per epoch, 1/2/3 dp ranks, uneven shards


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dp_size,batch", [(1, 4), (2, 3), (3, 5)])
def test_each_sample_exactly_once_across_ranks(coverage_ds: Path, loader: str, dp_size: int, batch: int) -> None:
    cfg = cfg_for(coverage_ds, loader)
    for split, expected in (("train", set(range(16))), ("val", set(range(16, 23)))):
        seen: list[int] = []
        lengths = []
        for rank in range(dp_size):
            if split == "train":
                it = D.train_loader(cfg, dp_rank=rank, dp_size=dp_size, epoch=3, seed=5, device="cpu", batch_size=batch)
            else:
                it = D.val_loader(cfg, dp_rank=rank, dp_size=dp_size, device="cpu", batch_size=batch)
            sizes = [len(labels) for _, labels in it]
            labels = [int(l) for _, ls in it for l in ls]
            assert len(sizes) == len(it), "every rank takes exactly len(loader) steps"
            if split == "train":  # full slices of the global batch; the last one as far as the lanes reach
                assert all(s == batch for s in sizes[:-1]), f"only the last batch is short: {sizes}"
            else:
                assert all(s > 0 for s in sizes), f"no empty batch while samples remain: {sizes}"
            assert all(s <= batch for s in sizes)
            assert len(labels) == it.samples
            lengths.append(len(it))
            seen += labels
        assert len(set(lengths)) == 1, f"{split}: ranks disagree on the step count: {lengths}"
        assert sorted(seen) == sorted(expected), f"{split} with {dp_size} ranks: {sorted(seen)}"


def test_dali_and_torch_give_each_rank_the_same_samples(coverage_ds: Path) -> None:
    for rank in range(3):
        sets = [
            sorted(
                int(l)
                for _, ls in D.train_loader(
                    cfg_for(coverage_ds, loader), dp_rank=rank, dp_size=3, epoch=1, seed=9, device="cpu", batch_size=8
                )
                for l in ls
            )
            for loader in LOADERS
        ]
        assert sets[0] == sets[1]


# --------------------------------------------------------------------------------------------
# Tensor-parallel pairs and epochs


@pytest.mark.parametrize("loader", LOADERS)
def test_tensor_parallel_pair_sees_identical_batches(coord_ds: Path, loader: str) -> None:
    cfg = cfg_for(coord_ds, loader)

    def epoch(e: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(D.train_loader(cfg, dp_rank=1, dp_size=2, epoch=e, seed=seed, device="cpu", batch_size=8))

    tp0, tp1 = epoch(0), epoch(0)  # the two tensor-parallel ranks of dp rank 1 build the same loader
    assert len(tp0) == len(tp1) == 3
    for (a, la), (b, lb) in zip(tp0, tp1):
        assert torch.equal(la, lb) and torch.equal(a, b)
    other = epoch(1)
    order0 = torch.cat([l for _, l in tp0]).tolist()
    order1 = torch.cat([l for _, l in other]).tolist()
    assert sorted(order0) != sorted(order1) or order0 != order1, "a new epoch gives a new order"
    assert epoch(0, seed=8)[0][0].shape == tp0[0][0].shape
    assert not torch.equal(torch.cat([l for _, l in epoch(0, seed=8)]), torch.cat([l for _, l in tp0]))


# --------------------------------------------------------------------------------------------
# Crop geometry, mirror, lighting


@pytest.mark.parametrize("loader", LOADERS)
def test_crop_windows_and_mirror(coord_ds: Path, loader: str) -> None:
    reference = decoded(coord_ds, "train")
    cfg = cfg_for(coord_ds, loader, lighting_std=0.0)
    windows = []
    for images, labels in D.train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=3, device="cpu", batch_size=16):
        for view, label in zip(to_hwc(images), labels.tolist()):
            left, top, mirrored = read_window(view)
            assert 0 <= left <= MAX_OFFSET and 0 <= top <= MAX_OFFSET
            expected = reference[label][top : top + CROP, left : left + CROP]
            if mirrored:
                expected = expected[:, ::-1]
            assert np.abs(view - expected).max() <= 3, "the output is exactly that window (mirrored)"
            assert abs(view[..., 2].mean() - label) < 2  # B channel: it is this label's image
            windows.append((left, top, mirrored))
    assert len(windows) == 48 and len(set(windows)) > 40
    assert 10 < sum(m for _, _, m in windows) < 38


def epoch_plan(root: Path, seed: int, lanes: int = 1, **kw) -> Plan:
    """dp 1's plan; ``lanes``: the global batch the loader it is compared with runs."""
    split, norm = D.open_dataset(cfg_for(root, **kw), "train")
    return plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=seed, train=True, lanes=lanes)


def test_the_plan_costs_the_bytes_a_sample_its_notes_say(flat_ds: Path) -> None:
    plan = epoch_plan(flat_ds, 0)
    columns = [getattr(plan, f.name) for f in dataclasses.fields(plan)]
    per_sample = sum(c.nbytes for c in columns if isinstance(c, np.ndarray)) / len(plan)
    assert per_sample == int(per_sample)
    notes = {"docs/data-pipeline.md": (REPO / "docs" / "data-pipeline.md").read_text(), "Plan": Plan.__doc__ or ""}
    for where, text in notes.items():
        assert f"{int(per_sample)} bytes a sample" in " ".join(text.split()), f"{where} gives another figure"


def test_augmentation_statistics(flat_ds: Path) -> None:
    plans = [epoch_plan(flat_ds, s) for s in range(80)]  # 1280 samples
    check_lighting_covariance(np.concatenate([p.offset for p in plans]))
    # Windows: uniform over all 30 integer offsets, edges included; mirror with p = 1/2.
    for axis in ("x", "y"):
        values = np.concatenate([getattr(p, axis) for p in plans])
        counts = np.bincount(values, minlength=MAX_OFFSET + 1)
        assert len(counts) == MAX_OFFSET + 1
        assert counts.min() >= 0.5 * len(values) / (MAX_OFFSET + 1), counts
    assert abs(np.concatenate([p.mirror for p in plans]).mean() - 0.5) < 0.05


def check_lighting_covariance(offset: np.ndarray, tolerance: float = 0.16) -> None:
    """Sample covariance vs eigvec diag(0.01 eigval) eigvec^T; with ~1300 samples a variance is within ~4% (1 sd)."""
    eigvec, eigval = np.array(EIGVEC), np.array(EIGVAL)
    assert abs(offset.mean(axis=0)).max() < 0.2 * np.sqrt(0.01 * eigval[0])
    in_pca = eigvec.T @ np.cov(offset.T) @ eigvec
    expected = 0.01 * eigval
    assert np.allclose(np.diag(in_pca), expected, rtol=tolerance), (np.diag(in_pca), expected)
    scale = np.sqrt(np.outer(expected, expected))
    assert np.all(np.abs(in_pca - np.diag(np.diag(in_pca))) < tolerance * scale)


@pytest.mark.parametrize("loader", LOADERS)
def test_pixels_carry_the_planned_lighting(flat_ds: Path, loader: str) -> None:
    plan = epoch_plan(flat_ds, epoch_seed(0, 0), lanes=4)
    images, _ = next(
        iter(
            D.train_loader(cfg_for(flat_ds, loader), dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=4)
        )
    )
    # Flat 128 input, zero mean image: every pixel of a sample is 128 + that sample's offset.
    assert torch.allclose(images, 128 + torch.from_numpy(plan.offset[:4])[:, :, None, None], atol=1e-3)
    assert plan.offset[:4].std() > 1


@pytest.fixture(scope="module")
def mean_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """The same coordinate images twice: with a random mean image, and with a zero one (outputs = pixels)."""
    mean_image = np.random.default_rng(0).uniform(0, 60, (256, 256, 3)).astype(np.float32)
    root = make_dataset(
        tmp_path_factory.mktemp("mean"), {"train": [9, 7], "val": [3]}, image=coordinate_image, mean_image=mean_image
    )
    zero = tmp_path_factory.mktemp("zero") / "ds"
    shutil.copytree(root, zero)
    np.save(zero / fmt.MEAN_IMAGE_NAME, np.zeros_like(mean_image))
    return root, zero, mean_image


@pytest.mark.parametrize("loader", LOADERS)
def test_mean_image_on_the_window_equals_full_image_subtraction(
    mean_ds: tuple[Path, Path, np.ndarray], loader: str
) -> None:
    """The window's mean is subtracted after cropping; the result is what subtracting the full 256x256 mean
    image first gave (the previous computation: crop_mirror_normalize of ``pixels - mean_image`` with mean
    ``-offset``), within float rounding, for training windows/mirrors/lighting and the 10 views."""
    root, zero, mean_image = mean_ds
    plan = epoch_plan(root, epoch_seed(5, 2), lanes=16)
    order = shard_order(2, 5, 2)
    assert order == [1, 0] or order == [0, 1]
    kw = dict(dp_rank=0, dp_size=1, epoch=2, seed=5, device="cpu", batch_size=16)
    out = next(iter(D.train_loader(cfg_for(root, loader), **kw)))[0]
    pixels = next(iter(D.train_loader(cfg_for(zero, loader, lighting_std=0.0), **kw)))[0]  # the cropped pixels
    for i in range(16):
        x, y, mirror, offset = int(plan.x[i]), int(plan.y[i]), bool(plan.mirror[i]), plan.offset[i]
        window = mean_image[y : y + CROP, x : x + CROP]
        if mirror:
            window = window[:, ::-1]
        before = (pixels[i].numpy() - window.transpose(2, 0, 1)) - (np.float32(0) - offset)[:, None, None]
        assert np.abs(out[i].numpy() - before).max() <= 1e-4  # float32 rounding at 0..255 is ~3e-5
    views = next(
        iter(D.val_loader(cfg_for(root, loader), dp_rank=0, dp_size=1, device="cpu", batch_size=3, ten_crop=True))
    )[0]
    plain = next(
        iter(D.val_loader(cfg_for(zero, loader), dp_rank=0, dp_size=1, device="cpu", batch_size=3, ten_crop=True))
    )[0]
    for v, (mirror, top, left) in enumerate(ten_view_windows(MAX_OFFSET, MAX_OFFSET // 2)):
        window = mean_image[top : top + CROP, left : left + CROP]
        if mirror:
            window = window[:, ::-1]
        assert np.abs(views[:, v].numpy() - (plain[:, v].numpy() - window.transpose(2, 0, 1))).max() <= 1e-4


# --------------------------------------------------------------------------------------------
# Validation views


@pytest.mark.parametrize("loader", LOADERS)
def test_ten_views_and_centre_crop(coord_ds: Path, loader: str) -> None:
    reference = decoded(coord_ds, "val")
    cfg = cfg_for(coord_ds, loader)
    ten = list(D.val_loader(cfg, dp_rank=0, dp_size=1, device="cpu", batch_size=3, ten_crop=True))
    centre = list(D.val_loader(cfg, dp_rank=0, dp_size=1, device="cpu", batch_size=3))
    assert [tuple(images.shape) for images, _ in ten] == [(3, 10, 3, CROP, CROP), (2, 10, 3, CROP, CROP)]
    c = MAX_OFFSET // 2
    windows = [(0, 0), (MAX_OFFSET, 0), (0, MAX_OFFSET), (MAX_OFFSET, MAX_OFFSET), (c, c)]  # (left, top)
    for (views, labels), (centres, centre_labels) in zip(ten, centre):
        assert torch.equal(labels, centre_labels)
        for sample, label, centre_view in zip(to_hwc(views), labels.tolist(), to_hwc(centres)):
            image = reference[label]
            for v in range(10):
                left, top = windows[v % 5]
                expected = image[top : top + CROP, left : left + CROP]
                if v >= 5:
                    expected = expected[:, ::-1]
                assert np.abs(sample[v] - expected).max() <= 3, f"view {v}"
            assert np.array_equal(sample[4], centre_view)


# --------------------------------------------------------------------------------------------
# The fallback against DALI, output formats


@pytest.mark.parametrize("mean", ["image", "channel"])
def test_fallback_gives_dalis_batches(mean_ds: tuple[Path, Path, np.ndarray], mean: str) -> None:
    """Both execute the same epoch plan: the same samples, windows, mirrors and lighting; both decoders are
    libjpeg-turbo, so the pixels agree to a level or two (here: exactly, up to float rounding)."""
    root = mean_ds[0]
    batches = {
        loader: list(
            D.train_loader(
                cfg_for(root, loader, mean=mean), dp_rank=1, dp_size=2, epoch=1, seed=4, device="cpu", batch_size=3
            )
        )
        for loader in LOADERS
    }
    assert len(batches["dali"]) == len(batches["torch"]) == 3
    for (a, la), (b, lb) in zip(batches["dali"], batches["torch"]):
        assert torch.equal(la, lb)
        scale = 1.0 if mean == "image" else 1 / min(CHANNEL_STD)
        assert (a - b).abs().max() <= 2 * scale and (a - b).abs().mean() <= 0.1 * scale


@pytest.mark.parametrize("loader", LOADERS)
def test_output_dtype_and_layout(coord_ds: Path, loader: str) -> None:
    cfg = cfg_for(coord_ds, loader, dtype="bfloat16", channels_last=True, mean="channel", lighting_std=0.0)
    images, labels = next(iter(D.val_loader(cfg, dp_rank=0, dp_size=1, device="cpu", batch_size=2)))
    assert images.dtype == torch.bfloat16 and images.shape == (2, 3, CROP, CROP)
    assert images.is_contiguous(memory_format=torch.channels_last)
    x = MAX_OFFSET // 2 + 100  # R at column 100 of the centre crop is x
    expected = (x - CHANNEL_MEAN[0]) / CHANNEL_STD[0]
    assert abs(float(images[0, 0, 50, 100]) - expected) < 0.05
    views, _ = next(iter(D.val_loader(cfg, dp_rank=0, dp_size=1, device="cpu", batch_size=2, ten_crop=True)))
    assert views.shape == (2, 10, 3, CROP, CROP)
    assert views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Errors: one line, naming the thing


@pytest.fixture
def broken(coverage_ds: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(coverage_ds, copy)
    return copy


def _train(root: Path, loader: str = "dali", **kw) -> list:
    return list(
        D.train_loader(cfg_for(root, loader), dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=4, **kw)
    )


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_shard_is_named(broken: Path) -> None:
    (broken / "train" / fmt.shard_name("train", 1)).unlink()
    with pytest.raises(UserError, match=r"train-000001\.tar: shard .* is missing") as e:
        _train(broken)
    _one_line(e)


def test_missing_index_is_named(broken: Path) -> None:
    (broken / "train" / fmt.index_name(fmt.shard_name("train", 2))).unlink()
    with pytest.raises(UserError, match=r"train-000002\.idx: DALI index file is missing"):
        _train(broken)


def test_truncated_shard_is_named(broken: Path) -> None:
    shard = broken / "train" / fmt.shard_name("train", 0)
    shard.write_bytes(shard.read_bytes()[:3000])
    for loader in LOADERS:
        with pytest.raises(UserError, match=r"train-000000\.tar: shard is 3000 bytes.*truncated") as e:
            _train(broken, loader)
        _one_line(e)


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_image_gives_one_line(broken: Path, loader: str) -> None:
    key = rewrite_member(broken, 1, 2, "jpg", b"")  # zeros, same size, matching sha256: only decoding can tell
    with pytest.raises(UserError) as e:
        _train(broken, loader)
    assert f"train-000001.tar: sample {key}: cannot decode its JPEG" in _one_line(e)


def test_manifest_without_statistics(broken: Path) -> None:
    manifest = fmt.read_manifest(broken)
    manifest.stats = None
    fmt.write_manifest(broken, manifest)
    with pytest.raises(UserError, match="no train statistics") as e:
        _train(broken)
    _one_line(e)


def test_class_count_mismatch(coverage_ds: Path) -> None:
    with pytest.raises(UserError, match="dataset has 23 classes but the model has 1000") as e:
        _train(coverage_ds, num_classes=1000)
    _one_line(e)
    assert _train(coverage_ds, num_classes=23)


@pytest.mark.parametrize("loader", LOADERS)
def test_negative_label_names_the_sample(broken: Path, loader: str) -> None:
    key = rewrite_member(broken, 1, 3, "cls", b"-3")
    with pytest.raises(UserError, match=rf"train-000001\.tar: sample {key}: label -3 is outside") as e:
        _train(broken, loader)
    _one_line(e)


@pytest.mark.parametrize("loader", LOADERS)
def test_wrong_size_jpeg_names_the_sample(broken: Path, loader: str) -> None:
    small = io.BytesIO()
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(small, "JPEG", quality=50)
    key = rewrite_member(broken, 0, 1, "jpg", small.getvalue())  # a valid JPEG, 200x200
    with pytest.raises(
        UserError,
        match=rf"train-000000\.tar: sample {key}: image is 200x200, the format stores "
        r"256x256",
    ) as e:
        list(
            D.train_loader(
                cfg_for(broken, loader, mean="channel"),
                dp_rank=0,
                dp_size=1,
                epoch=0,
                seed=0,
                device="cpu",
                batch_size=4,
            )
        )
    _one_line(e)


@pytest.mark.parametrize("loader", LOADERS)
def test_non_numeric_index_row_is_named(broken: Path, loader: str) -> None:
    index = broken / "train" / fmt.index_name(fmt.shard_name("train", 2))
    lines = index.read_text().splitlines()
    parts = lines[2].split()
    parts[1] = "12x4"
    lines[2] = " ".join(parts)
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train-000002\.idx:3: index row has a non-numeric offset") as e:
        _train(broken, loader)
    _one_line(e)


@pytest.mark.parametrize("key", ["sha256", "samples", "classes"])
def test_manifest_missing_a_key_is_one_line(broken: Path, key: str) -> None:
    manifest = json.loads(fmt.manifest_path(broken).read_text())
    if key == "classes":
        del manifest["classes"]
    else:
        del manifest["splits"]["train"]["shards"][1][key]
    fmt.manifest_path(broken).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"manifest.json: malformed manifest \(missing key '{key}'\)") as e:
        _train(broken)
    _one_line(e)


@pytest.mark.parametrize("path", ["../outside/train-000000.tar", "train/../../train-000000.tar", "ABSOLUTE"])
def test_manifest_paths_stay_in_the_dataset(broken: Path, path: str) -> None:
    outside = broken.parent / "outside"
    outside.mkdir()
    shutil.copy(broken / "train" / fmt.shard_name("train", 0), outside / fmt.shard_name("train", 0))
    manifest = json.loads(fmt.manifest_path(broken).read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = str(outside / "train-000000.tar") if path == "ABSOLUTE" else path
    fmt.manifest_path(broken).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard path .* is outside the dataset directory") as e:
        _train(broken)
    _one_line(e)


# --------------------------------------------------------------------------------------------
# Shard integrity: sha256 against the manifest, cached per run dir


def test_same_size_corruption_is_caught_by_the_hash(broken: Path, tmp_path: Path) -> None:
    shard = broken / "train" / fmt.shard_name("train", 1)
    data = bytearray(shard.read_bytes())
    data[400] ^= 0x01  # one bit in the first tar header's unused prefix field: same size, still decodes
    shard.write_bytes(bytes(data))
    for loader in LOADERS:
        with pytest.raises(UserError, match=r"train-000001\.tar: sha256 .* does not match the manifest") as e:
            _train(broken, loader, verify_cache=tmp_path / "verified")
        _one_line(e)
    # --data.verify size: only the size is checked, and the data loads.
    assert list(
        D.train_loader(
            cfg_for(broken, verify="size"), dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=4
        )
    )


def test_verified_shards_are_hashed_once_per_run_dir(
    broken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    cache = tmp_path / "run" / "verified-shards"

    def epoch(e: int, rank: int = 0) -> None:
        D.train_loader(
            cfg_for(broken, "torch"),
            dp_rank=rank,
            dp_size=2,
            epoch=e,
            seed=1,
            device="cpu",
            batch_size=4,
            verify_cache=cache,
        )

    epoch(0)
    first = sorted(hashed)
    assert first and len(first) < 3, "a rank hashes the shards it reads, not all of them"
    epoch(0)
    epoch(1)
    epoch(0, rank=1)
    assert sorted(hashed) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"], "each shard once"
    # A shard rewritten in place (new mtime) is hashed again, and a corrupt rewrite is caught.
    shard = broken / "train" / hashed[0]
    data = bytearray(shard.read_bytes())
    data[400] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="does not match the manifest"):
        for e in range(4):
            for rank in (0, 1):
                epoch(e, rank)


# --------------------------------------------------------------------------------------------
# Resuming mid-epoch: start at batch k, equal to the uninterrupted epoch, nothing before k read


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_at_any_batch_gives_the_uninterrupted_batches(coverage_ds: Path, loader: str, dp_size: int) -> None:
    cfg = cfg_for(coverage_ds, loader)
    for rank in range(dp_size):
        kw = dict(dp_rank=rank, dp_size=dp_size, epoch=2, seed=3, device="cpu", batch_size=3)
        full = list(D.train_loader(cfg, **kw))
        assert len(full) == (6 if dp_size == 1 else 3)
        for k in range(len(full) + 1):
            resumed = D.train_loader(cfg, start_batch=k, **kw)
            assert len(resumed) == len(full) - k and resumed.steps_in_epoch == len(full)
            got = list(resumed)
            assert len(got) == len(full) - k
            for (a, la), (b, lb) in zip(got, full[k:]):
                assert torch.equal(la, lb) and torch.equal(a, b)
    with pytest.raises(UserError, match="cannot start the epoch at batch 7"):
        D.train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=3, start_batch=7)


@pytest.mark.parametrize("loader", LOADERS)
def test_resume_reads_nothing_before_its_batch(broken: Path, loader: str) -> None:
    cfg = cfg_for(broken, loader, verify="size")
    kw = dict(dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=4)
    first = int(next(iter(D.train_loader(cfg, **kw)))[1][0])  # label = sample number
    shard_no, row = (0, first) if first < 7 else (1, first - 7) if first < 12 else (2, first - 12)
    shard = broken / "train" / fmt.shard_name("train", shard_no)
    _, jpg_offset, jpg_size, _, _ = index_rows(broken / "train" / fmt.index_name(shard.name))[row]
    data = bytearray(shard.read_bytes())
    data[jpg_offset : jpg_offset + jpg_size] = b"\0" * jpg_size  # the epoch's first sample can no longer be read
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="cannot decode its JPEG"):
        list(D.train_loader(cfg, **kw))
    assert len(list(D.train_loader(cfg, start_batch=1, **kw))) == 3
