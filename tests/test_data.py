"""The input pipeline (pipeline.data): augmentation geometry and statistics, exactly-once splitting,
tensor-parallel determinism, the 10 views, labels, DALI vs the torch fallback, and clear errors.

Everything runs DALI CPU-only (device_id=None) on a few 256x256 fixture images. Images whose
pixels encode their coordinates (R = x, G = y, B = a per-image tag; JPEG quality 100 without
chroma subsampling, so within a level or two of exact) make crop windows and mirrors readable
from the output; flat images make the lighting offset readable.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data as D
from pipeline.data import common as C
from pipeline.data import dali_pipeline as data_dali
from pipeline.data import torch_loader as data_torch
from preprocess import format as fmt
from preprocess.errors import UserError
from tests._data_fixtures import EIGVAL, EIGVEC, CHANNEL_MEAN, CHANNEL_STD, coordinate_image, make_dataset

CROP = 227
MAX_OFFSET = 256 - CROP
LOADERS = ["dali", "torch"]


# --------------------------------------------------------------------------------------------
# Fixtures: built once per module, never modified (tests that break data work on a copy)


@pytest.fixture(scope="module")
def coverage_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uneven shards: train 7 + 5 + 4, val 3 + 4; label i identifies sample i."""
    return make_dataset(tmp_path_factory.mktemp("coverage"), {"train": [7, 5, 4], "val": [3, 4]},
                        image=lambda i: coordinate_image(i), quality=60)


@pytest.fixture(scope="module")
def coord_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coordinate images (B = sample number) for geometry; mean image zeros, so outputs are pixels."""
    return make_dataset(tmp_path_factory.mktemp("coord"), {"train": [24, 24], "val": [5]},
                        image=lambda i: coordinate_image(i))


@pytest.fixture(scope="module")
def flat_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flat grey (128) images: any output deviation is the lighting offset."""
    return make_dataset(tmp_path_factory.mktemp("flat"), {"train": [16], "val": [2]},
                        image=lambda i: np.full((256, 256, 3), 128, np.uint8))


def cfg_for(root: Path, loader: str = "dali", **kw) -> D.DataConfig:
    kw.setdefault("workers", 1)  # (0 would mean all CPUs)
    return D.DataConfig(data=str(root), loader=loader, **kw)


def decoded(root: Path, split: str) -> dict[int, np.ndarray]:
    """label -> the stored image decoded by PIL (an independent reference decoder)."""
    out = {}
    for shard in fmt.read_manifest(root).split(split).shards:
        with open(root / shard.path, "rb") as f:
            for _, jpg_offset, jpg_size, cls_offset, cls_size in data_torch.read_index(root / shard.index):
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


def test_rank_ranges_steps_and_even_steps() -> None:
    for total in range(0, 40):
        for n in (1, 2, 3, 4, 7):
            ranges = [C.rank_range(total, r, n) for r in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1
            for b in (1, 2, 5):
                assert C.steps_per_epoch(total, n, b) * b >= max(sizes)
    # A rank one sample short: its last full batch is split rather than followed by an empty one.
    src = [(torch.zeros(5, 1), torch.arange(5)), (torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))]
    out = list(C.even_steps(src, 2))
    assert [len(l) for _, l in out] == [3, 2] and torch.equal(torch.cat([l for _, l in out]), torch.arange(5))
    src = [(torch.zeros(4, 1), torch.arange(4)), (torch.zeros(2, 1), torch.arange(4, 6))]
    assert [len(l) for _, l in C.even_steps(src, 2)] == [4, 2]
    assert C.derive_seed("a", 1) == C.derive_seed("a", 1) != C.derive_seed("a", 2)
    assert C.shard_order(10, 0, 0) != C.shard_order(10, 0, 1) and sorted(C.shard_order(10, 0, 1)) == list(range(10))


def test_parse_labels() -> None:
    raw = torch.tensor([[49, 50, 51, 0], [55, 0, 0, 0], [48, 0, 0, 0], [57, 57, 57, 57]], dtype=torch.uint8)
    assert C.parse_labels(raw).tolist() == [123, 7, 0, 9999]
    assert C.parse_labels(torch.zeros(0, 3, dtype=torch.uint8)).tolist() == []
    with pytest.raises(fmt.FormatError, match="not a decimal number"):
        C.parse_labels(torch.tensor([[49, 65]], dtype=torch.uint8))
    with pytest.raises(fmt.FormatError):
        C.parse_labels(torch.tensor([[0, 0]], dtype=torch.uint8))  # empty label


def test_config_validation() -> None:
    with pytest.raises(UserError, match="loader"):
        D.DataConfig(loader="tf")
    with pytest.raises(UserError, match="mean"):
        D.DataConfig(mean="median")
    with pytest.raises(UserError, match="crop"):
        D.DataConfig(crop=300)


# --------------------------------------------------------------------------------------------
# Labels through DALI


def test_labels_read_back_through_dali(tmp_path: Path) -> None:
    written = [0, 3, 42, 999, 1234, 7, 10, 100]  # 1 to 4 ASCII digits: DALI pads them to the batch's longest
    root = make_dataset(tmp_path / "labels", {"train": [5], "val": [5, 3]}, label=lambda i: written[i % 8] if i >= 5 else i,
                        num_classes=1235, quality=50)
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
            assert all(s > 0 for s in sizes), f"no empty batch while samples remain: {sizes}"
            assert all(s <= batch for s in sizes)
            assert len(labels) == it.samples
            lengths.append(len(it))
            seen += labels
        assert len(set(lengths)) == 1, f"{split}: ranks disagree on the step count: {lengths}"
        assert sorted(seen) == sorted(expected), f"{split} with {dp_size} ranks: {sorted(seen)}"


def test_dali_and_torch_give_each_rank_the_same_samples(coverage_ds: Path) -> None:
    for rank in range(3):
        sets = [sorted(int(l) for _, ls in D.train_loader(cfg_for(coverage_ds, loader), dp_rank=rank, dp_size=3, epoch=1,
                                                            seed=9, device="cpu", batch_size=8) for l in ls)
                for loader in LOADERS]
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


def test_dali_crop_windows_and_mirror(coord_ds: Path) -> None:
    reference = decoded(coord_ds, "train")
    cfg = cfg_for(coord_ds, lighting_std=0.0)
    windows = []
    for images, labels in D.train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=3, device="cpu", batch_size=16):
        for view, label in zip(to_hwc(images), labels.tolist()):
            left, top, mirrored = read_window(view)
            assert 0 <= left <= MAX_OFFSET and 0 <= top <= MAX_OFFSET
            expected = reference[label][top:top + CROP, left:left + CROP]
            if mirrored:
                expected = expected[:, ::-1]
            assert np.abs(view - expected).max() <= 3, "the output is exactly that window (mirrored)"
            assert abs(view[..., 2].mean() - label) < 2  # B channel: it is this label's image
            windows.append((left, top, mirrored))
    assert len(windows) == 48 and len(set(windows)) > 40
    assert 10 < sum(m for _, _, m in windows) < 38


def augmentation_params(root: Path, n_batches: int, batch: int = 32, **norm_kw) -> dict[str, np.ndarray]:
    """DALI's per-sample window offsets, mirrors and lighting offsets over many samples (reader wraps)."""
    split, norm = D.open_dataset(cfg_for(root, **norm_kw), "train")
    pipe = data_dali.build(split, norm, train=True, dp_rank=0, dp_size=1, seed=11, device_id=None, batch_size=batch,
                           workers=2, shuffle_buffer=64, with_params=True)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "pos_x", "pos_y", "mirror", "offset")}
    for _ in range(n_batches):
        images, _, px, py, mirror, offset = (np.array(o.as_tensor()) for o in pipe.run())
        for k, v in zip(cols, (images, px, py, mirror, offset)):
            cols[k].append(v)
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["x"] = np.rint(out.pop("pos_x") * MAX_OFFSET).astype(int).ravel()
    out["y"] = np.rint(out.pop("pos_y") * MAX_OFFSET).astype(int).ravel()
    return out


def test_lighting_offset_statistics_dali(flat_ds: Path) -> None:
    p = augmentation_params(flat_ds, n_batches=40)  # 1280 samples
    offset = p["offset"]
    # Flat 128 input, zero mean image: every pixel of a sample is 128 + that sample's offset.
    pixels = p["images"][:64]
    assert np.allclose(pixels, 128 + offset[:64, :, None, None], atol=1e-3)
    # offset = eigvec @ (alpha * sqrt(eigval)), alpha ~ N(0, 0.1): covariance eigvec diag(0.01 eigval) eigvec^T.
    check_lighting_covariance(offset)
    # Windows: uniform over all 30 integer offsets, edges included; mirror with p = 1/2.
    for axis in ("x", "y"):
        counts = np.bincount(p[axis], minlength=MAX_OFFSET + 1)
        assert len(counts) == MAX_OFFSET + 1
        assert counts.min() >= 0.5 * len(p[axis]) / (MAX_OFFSET + 1), counts
    assert abs(p["mirror"].mean() - 0.5) < 0.05


def check_lighting_covariance(offset: np.ndarray, tolerance: float = 0.16) -> None:
    """Sample covariance vs eigvec diag(0.01 eigval) eigvec^T; with ~1300 samples a variance is within ~4% (1 sd)."""
    eigvec, eigval = np.array(EIGVEC), np.array(EIGVAL)
    assert abs(offset.mean(axis=0)).max() < 0.2 * np.sqrt(0.01 * eigval[0])
    in_pca = eigvec.T @ np.cov(offset.T) @ eigvec
    expected = 0.01 * eigval
    assert np.allclose(np.diag(in_pca), expected, rtol=tolerance), (np.diag(in_pca), expected)
    scale = np.sqrt(np.outer(expected, expected))
    assert np.all(np.abs(in_pca - np.diag(np.diag(in_pca))) < tolerance * scale)


def test_lighting_offset_statistics_torch(flat_ds: Path) -> None:
    split, norm = D.open_dataset(cfg_for(flat_ds, "torch"), "train")
    offsets = np.concatenate([data_torch.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=s, train=True).offset
                              for s in range(80)])  # 1280 samples
    check_lighting_covariance(offsets)
    # And the pixels carry exactly the planned offsets.
    plan = data_torch.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=C.augment_seed(0, 0, 0), train=True)
    images, _ = next(iter(D.train_loader(cfg_for(flat_ds, "torch"), dp_rank=0, dp_size=1, epoch=0, seed=0,
                                         device="cpu", batch_size=4)))
    assert torch.allclose(images, 128 + torch.from_numpy(plan.offset[:4])[:, :, None, None], atol=1e-3)


def test_mean_image_follows_the_window_and_mirror(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mean_image = rng.uniform(0, 60, (256, 256, 3)).astype(np.float32)
    root = make_dataset(tmp_path / "mean", {"train": [8], "val": [2]}, image=coordinate_image, mean_image=mean_image)
    reference = decoded(root, "train")
    # DALI: read the windows from the pipeline's parameters.
    p = augmentation_params(root, n_batches=2, batch=8, lighting_std=0.0)
    split, _ = D.open_dataset(cfg_for(root), "train")
    for i in range(16):
        view = p["images"][i].transpose(1, 2, 0)
        x, y = p["x"][i], p["y"][i]
        label = int(round(float(view[..., 2].mean() + mean_image[y:y + CROP, x:x + CROP, 2].mean())))
        expected = reference[label][y:y + CROP, x:x + CROP] - mean_image[y:y + CROP, x:x + CROP]
        if p["mirror"][i]:
            expected = expected[:, ::-1]
        assert np.abs(view - expected).max() <= 3
    # torch: the planned windows.
    split, norm = D.open_dataset(cfg_for(root, "torch", lighting_std=0.0), "train")
    plan = data_torch.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=4, train=True)
    dataset = data_torch.ShardSamples(split, norm, plan, ten_crop=False)
    for i in range(8):
        view, label = dataset[i]
        x, y = plan.x[i], plan.y[i]
        expected = reference[label][y:y + CROP, x:x + CROP] - mean_image[y:y + CROP, x:x + CROP]
        if plan.mirror[i]:
            expected = expected[:, ::-1]
        assert np.abs(view.permute(1, 2, 0).numpy() - expected).max() <= 3


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
                expected = image[top:top + CROP, left:left + CROP]
                if v >= 5:
                    expected = expected[:, ::-1]
                assert np.abs(sample[v] - expected).max() <= 3, f"view {v}"
            assert np.array_equal(sample[4], centre_view)


# --------------------------------------------------------------------------------------------
# The fallback against DALI, output formats


def test_fallback_matches_dali_in_distribution(coord_ds: Path) -> None:
    stats = {}
    for loader in LOADERS:
        cfg = cfg_for(coord_ds, loader, mean="channel")
        windows, outputs = [], []
        for epoch in range(3):
            for images, labels in D.train_loader(cfg, dp_rank=0, dp_size=1, epoch=epoch, seed=2, device="cpu",
                                                 batch_size=48):
                pixels = to_hwc(images) * np.array(CHANNEL_STD) + np.array(CHANNEL_MEAN)  # undo the normalisation
                # The lighting offset shifts every pixel equally: read the window from differences.
                for view, label in zip(pixels, labels.tolist()):
                    mirrored = view[0, 0, 0] > view[0, -1, 0]
                    off_b = view[..., 2].mean() - label  # B channel is the tag: its shift is the B offset
                    windows.append((mirrored, off_b))
                outputs.append(images.float())
        out = torch.cat(outputs)
        stats[loader] = (out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3)), np.array(windows, dtype=float))
    (m_d, s_d, w_d), (m_t, s_t, w_t) = stats["dali"], stats["torch"]
    assert torch.allclose(m_d, m_t, atol=0.1), (m_d, m_t)
    assert torch.allclose(s_d, s_t, rtol=0.05), (s_d, s_t)
    assert abs(w_d[:, 0].mean() - w_t[:, 0].mean()) < 0.2  # mirror rate, 144 samples each
    b_std = np.sqrt((np.array(EIGVEC)[2] ** 2 * 0.01 * np.array(EIGVAL)).sum())
    for w in (w_d, w_t):  # the B-channel lighting offset has the expected spread in both
        assert 0.7 * b_std < w[:, 1].std() < 1.3 * b_std


def test_fallback_window_offsets_uniform(coord_ds: Path) -> None:
    split, norm = D.open_dataset(cfg_for(coord_ds, "torch"), "train")
    xs = np.concatenate([data_torch.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=s, train=True).x
                         for s in range(40)])
    counts = np.bincount(xs, minlength=MAX_OFFSET + 1)
    assert len(counts) == MAX_OFFSET + 1 and counts.min() >= 0.5 * len(xs) / (MAX_OFFSET + 1)


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
    assert views.shape == (2, 10, 3, CROP, CROP) and views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Errors: one line, naming the thing


@pytest.fixture
def broken(coverage_ds: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(coverage_ds, copy)
    return copy


def _train(root: Path, loader: str = "dali", **kw) -> list:
    return list(D.train_loader(cfg_for(root, loader), dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu",
                               batch_size=4, **kw))


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
    shard = broken / "train" / fmt.shard_name("train", 1)
    rows = data_torch.read_index(broken / "train" / fmt.index_name(shard.name))
    _, jpg_offset, jpg_size, _, _ = rows[2]
    data = bytearray(shard.read_bytes())
    data[jpg_offset:jpg_offset + jpg_size] = b"\0" * jpg_size  # same size: only decoding can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        _train(broken, loader)
    message = _one_line(e)
    if loader == "torch":
        assert f"train-000001.tar: sample {rows[2][0]}: cannot decode its JPEG" in message
    else:
        assert "decoders.image" in message and "--loader torch" in message


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
