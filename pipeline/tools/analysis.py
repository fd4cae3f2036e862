"""The paper's figures 3 and 4 for any checkpoint (any layout), as PNGs under ``RUN/figures/``.

    python -m pipeline.tools.analysis filters --run-dir RUN [--checkpoint best]
    python -m pipeline.tools.analysis neighbours --run-dir RUN [--checkpoint best] [--images 8]
    torchrun --nproc_per_node=N -m pipeline.tools.analysis neighbours ...   # feature extraction split over N

Figure 3: conv1's kernels, one panel per tower, each kernel scaled to [0, 1] on its own, with each
tower's colour fraction beside it: the share of a kernel's energy (after removing its mean) that is
not common to the three colour channels, averaged over the tower's kernels. 0 is a grey kernel;
i.i.d. noise gives about 2/3. The paper saw one tower colour-agnostic and the other colour-specific:
a low and a high fraction.

Figure 4: for a few val images, the top-5 predictions with probabilities and the ``k`` training
images nearest in fc7 space (Euclidean; centre crops). At ImageNet scale the features do not fit
in memory (1.28M x 4096 x 4 B = 21 GB), so each process streams its part of the train split to a
float16 memmap (``RUN/analysis/fc7-<checkpoint>/features-rank<r>.f16``, 10.5 GB in all) and the
search reads them back in chunks of ``--chunk-rows`` rows, exhaustively (exact up to float32
arithmetic on the float16 features), on the GPU when there is one. The files are kept for the next
call and reused while their ``meta.json`` names the same checkpoint. Costs: docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from basics.errors import UserError, run_cli
from basics.files import atomic_output, write_bytes_atomic, write_json_atomic
from pipeline.checkpoint import resolve as resolve_checkpoint
from pipeline.process import ProcessEnv, process_group, select_device
from pipeline.run_dir import RunDir
from pipeline.tools.evaluate import Member, class_names, load_member
from preprocess import format as fmt

FEATURE_DTYPE = np.float16


# ---------------------------------------------------------------------------- figure 3


def colour_fraction(filters: torch.Tensor) -> torch.Tensor:
    """Per kernel [n, 3, h, w]: the share of its (mean-removed) energy outside the grey component."""
    w = filters.double().flatten(2)
    w = w - w.mean(dim=(1, 2), keepdim=True)
    chroma = w - w.mean(dim=1, keepdim=True)
    return (chroma.square().sum((1, 2)) / w.square().sum((1, 2)).clamp_min(1e-30)).float()


def filter_grid(filters: torch.Tensor, columns: int = 16) -> np.ndarray:
    """The kernels as an RGB image [rows*(h+1)+1, columns*(w+1)+1, 3], each scaled to [0, 1], white gaps."""
    n, _, h, w = filters.shape
    rows = -(-n // columns)
    f = filters.double()
    lo = f.amin(dim=(1, 2, 3), keepdim=True)
    hi = f.amax(dim=(1, 2, 3), keepdim=True)
    f = ((f - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).numpy()
    grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, 3))
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = f[i]
    return grid


def filters_figure(towers: list[torch.Tensor], out: Path, title: str = "", dpi: int = 100) -> dict[str, Any]:
    """Write figure 3 (one panel per tower) to ``out``; returns the colour fractions and the PNG's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [float(colour_fraction(t).mean()) for t in towers]
    grids = [filter_grid(t.cpu(), columns=min(16, t.shape[0])) for t in towers]
    size = (8.0, 0.6 + sum(0.4 + 7.0 * g.shape[0] / g.shape[1] for g in grids))
    fig, axes = plt.subplots(len(grids), 1, figsize=size, dpi=dpi, squeeze=False)
    for t, (ax, grid) in enumerate(zip(axes[:, 0], grids)):
        ax.imshow(grid, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"tower {t}: {towers[t].shape[0]} kernels, colour fraction {fractions[t]:.3f}", fontsize=10)
    fig.suptitle(title or "conv1 kernels", fontsize=11)
    fig.tight_layout()
    _save_png(fig, out, dpi)
    plt.close(fig)
    return {"png": str(out), "size": list(fig.canvas.get_width_height()), "colour_fraction": fractions}


def _save_png(fig: Any, out: Path, dpi: int) -> None:
    """Atomically (tmp name, fsync, rename); no bbox_inches='tight', so the size is figsize x dpi."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, buffer.getvalue())


# ---------------------------------------------------------------------------- figure 4: features on disk


@dataclass(frozen=True)
class FeatureStore:
    """fc7 features of a split in per-rank float16 files; row j of rank r is sample ``starts[r] + j``."""

    root: Path
    dim: int
    counts: tuple[int, ...]
    starts: tuple[int, ...]

    @classmethod
    def open(cls, root: Path) -> "FeatureStore":
        meta = json.loads((root / "meta.json").read_text())
        return cls(root, meta["dim"], tuple(meta["counts"]), tuple(meta["starts"]))

    def rank_file(self, rank: int) -> Path:
        return self.root / f"features-rank{rank}.f16"

    def labels(self) -> np.ndarray:
        return np.concatenate([np.load(self.root / f"labels-rank{r}.npy") for r in range(len(self.counts))])

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first sample index, float16 array [<= rows, dim]) over every stored row, file by file."""
        for r, (count, start) in enumerate(zip(self.counts, self.starts)):
            if count == 0:
                continue
            # Read, not mapped: a mapping's touched pages count in the process's RSS (2.6 GB per rank
            # file at ImageNet's size), a read chunk is the only memory held.
            with open(self.rank_file(r), "rb") as f:
                for lo in range(0, count, rows):
                    n = min(rows, count - lo)
                    chunk = np.fromfile(f, dtype=FEATURE_DTYPE, count=n * self.dim)
                    if chunk.size != n * self.dim:
                        raise UserError(f"{self.rank_file(r)}: shorter than its {count} rows; delete {self.root}")
                    yield start + lo, chunk.reshape(n, self.dim)


def write_rank_features(
    root: Path, rank: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], count: int, dim: int
) -> None:
    """Stream ``count`` feature rows to ``root/features-rank<rank>.f16`` (complete or absent) + labels."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(count, dtype=np.int64)
    with atomic_output(root / f"features-rank{rank}.f16") as tmp:
        features = np.memmap(tmp, dtype=FEATURE_DTYPE, mode="w+", shape=(max(count, 1), dim))
        row = 0
        for feats, batch_labels in batches:
            n = feats.shape[0]
            if row + n > count:
                raise RuntimeError(f"rank {rank}: the loader gave more than its {count} samples")
            features[row : row + n] = feats.to(torch.float16).cpu().numpy()
            labels[row : row + n] = batch_labels.cpu().numpy()
            row += n
        if row != count:
            raise RuntimeError(f"rank {rank}: the loader gave {row} samples, expected {count}")
        features.flush()
        del features
        # the labels first: the features file under its final name says this rank's output is complete
        with atomic_output(root / f"labels-rank{rank}.npy") as labels_tmp, open(labels_tmp, "wb") as f:
            np.save(f, labels)


def nearest(
    queries: torch.Tensor,
    store: FeatureStore,
    k: int,
    *,
    chunk_rows: int = 16384,
    device: torch.device | str = "cpu",
    margin: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` stored rows nearest to each query (Euclidean), exhaustively over every chunk:
    (distances [q, k] ascending, sample indices [q, k]). Memory: one chunk plus [q, chunk] distances.

    Per chunk, a matrix product (|q|^2 - 2 q.x + |x|^2, fast but with cancellation error) picks
    ``k + margin`` candidates, whose distances are then computed directly from the differences;
    only those exact distances are ranked."""
    device = torch.device(device)
    q = queries.to(device, torch.float32)
    q_sq = q.square().sum(1, keepdim=True)
    best_d = torch.full((q.shape[0], 0), float("inf"), device=device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=device)
    for start, chunk in store.chunks(chunk_rows):
        x = torch.from_numpy(chunk).to(device, torch.float32)
        rough = q_sq - 2 * q @ x.T + x.square().sum(1)
        cand = rough.topk(min(k + margin, x.shape[0]), dim=1, largest=False).indices  # [q, c]
        d = (q[:, None, :] - x[cand]).norm(dim=2)
        d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, cand + start], 1)
        keep = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=True).indices
        best_d, best_i = d.gather(1, keep), idx.gather(1, keep)
    return best_d.cpu(), best_i.cpu()


# ---------------------------------------------------------------------------- figure 4: images


def split_loader(
    member: Member, split: str, *, dp_rank: int, dp_size: int, device: torch.device, batch_size: int
) -> Any:
    """Centre crops of ``split`` without augmentation, every image once across ranks in manifest order."""
    from pipeline import data

    return data.val_loader(
        member.cfg.data,
        dp_rank=dp_rank,
        dp_size=dp_size,
        device=device,
        batch_size=batch_size,
        num_classes=member.cfg.model.num_classes,
        split=split,
    )


def read_image(data_dir: str | Path, split: str, index: int) -> tuple[np.ndarray, int]:
    """Sample ``index`` of ``split`` (manifest order) as stored (256x256 RGB uint8) and its label,
    read through the shard's DALI index file (one seek per image)."""
    import io

    from PIL import Image

    root = Path(data_dir)
    for shard in fmt.read_manifest(root).split(split).shards:
        if index < shard.samples:
            line = (root / shard.index).read_text().splitlines()[1 + index].split()
            fields = {line[i]: (int(line[i + 1]), int(line[i + 2])) for i in range(0, len(line), 4)}
            with open(root / shard.path, "rb") as f:
                f.seek(fields["jpg"][0])
                jpeg = f.read(fields["jpg"][1])
                f.seek(fields["cls"][0])
                label = fmt.decode_label(f.read(fields["cls"][1]))
            return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), label
        index -= shard.samples
    raise UserError(f"{root}: the {split} split has no sample {index}")


def centre(image: np.ndarray, crop: int) -> np.ndarray:
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    return image[top : top + crop, left : left + crop]


def neighbours_figure(rows: list[dict[str, Any]], out: Path, dpi: int = 100) -> dict[str, Any]:
    """Figure 4: per row the query, its top-5 predictions and its nearest training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(rows[0]["neighbour_images"])
    size = (1.6 * (k + 2), 1.6 * len(rows))
    fig, axes = plt.subplots(len(rows), k + 2, figsize=size, dpi=dpi, squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"])
        axes[r, 0].set_title(f"val {row['index']}: {row['label_name'][:18]}", fontsize=6)
        text = "\n".join(f"{p['probability']:.2f} {p['name'][:20]}" for p in row["top5"])
        axes[r, 1].text(0.0, 0.5, text, fontsize=6, va="center", family="monospace")
        for j, image in enumerate(row["neighbour_images"]):
            axes[r, 2 + j].imshow(image)
            axes[r, 2 + j].set_title(f"d={row['neighbours'][j]['distance']:.3g}", fontsize=6)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle(f"top-5 predictions and the {k} training images nearest in fc7 space", fontsize=9)
    fig.tight_layout()
    _save_png(fig, out, dpi)
    plt.close(fig)
    return {"png": str(out), "size": list(fig.canvas.get_width_height())}


# ---------------------------------------------------------------------------- the work


def extract_train_features(
    member: Member, root: Path, *, rank: int, world: int, device: torch.device, batch_size: int
) -> FeatureStore:
    """Every process writes the fc7 features of its part of the train split; rank 0 writes meta.json
    last. Reuses the files when their meta.json names this checkpoint."""
    meta_path = root / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("checkpoint") == str(member.path):
        return FeatureStore.open(root)
    model = member.build(device)
    loader = split_loader(member, "train", dp_rank=rank, dp_size=world, device=device, batch_size=batch_size)
    batches = ((model.fc7_features(images).float(), labels) for images, labels in loader if labels.numel())
    write_rank_features(root, rank, batches, loader.samples, model.fc_width)
    counts = [loader.samples] * world
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, loader.samples)
        counts = [int(c) for c in gathered]
    if rank == 0:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        write_json_atomic(
            meta_path,
            {
                "checkpoint": str(member.path),
                "dim": model.fc_width,
                "counts": counts,
                "starts": [int(s) for s in starts],
                "dtype": "float16",
            },
        )
    if world > 1:
        dist.barrier()
    return FeatureStore.open(root)


@torch.no_grad()
def neighbours(
    member: Member,
    *,
    images: int,
    k: int,
    device: torch.device,
    batch_size: int,
    chunk_rows: int,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any] | None:
    """Figure 4 for ``member``: features (all ranks), then search and drawing (rank 0); its summary."""
    started = time.perf_counter()
    root = RunDir(member.run_dir).analysis / f"fc7-{member.path.name}"
    store = extract_train_features(member, root, rank=rank, world=world, device=device, batch_size=batch_size)
    extracted = time.perf_counter()
    if rank != 0:
        return None
    model = member.build(device)
    names = class_names(member.cfg.data.data)
    queries, query_labels, probs = [], [], []
    for batch, labels in split_loader(member, "val", dp_rank=0, dp_size=1, device=device, batch_size=images):
        queries.append(model.fc7_features(batch).float().cpu())
        probs.append(model(batch).float().softmax(1).cpu())
        query_labels.append(labels.cpu())
        if sum(len(q) for q in queries) >= images:
            break
    q = torch.cat(queries)[:images].half().float()  # on the stored features' grid
    probs, query_labels = torch.cat(probs)[:images], torch.cat(query_labels)[:images]
    search_device = device if device.type == "cuda" else "cpu"
    dists, idx = nearest(q, store, k, chunk_rows=chunk_rows, device=search_device)
    searched = time.perf_counter()
    train_labels = store.labels()
    crop = member.cfg.data.crop
    rows = []
    for i in range(q.shape[0]):
        image, label = read_image(member.cfg.data.data, "val", i)
        if label != int(query_labels[i]):
            raise RuntimeError(f"val sample {i}: the loader's label {int(query_labels[i])} is not the shard's {label}")
        top = probs[i].topk(min(5, probs.shape[1]))
        found = [
            {"index": int(j), "distance": float(d), "label": int(train_labels[j]), "name": names[train_labels[j]]}
            for d, j in zip(dists[i], idx[i])
        ]
        rows.append(
            {
                "index": i,
                "label": label,
                "label_name": names[label],
                "image": centre(image, crop),
                "top5": [
                    {"class": int(c), "name": names[int(c)], "probability": float(p)}
                    for p, c in zip(top.values, top.indices)
                ],
                "neighbours": found,
                "neighbour_images": [
                    centre(read_image(member.cfg.data.data, "train", n["index"])[0], crop) for n in found
                ],
            }
        )
    out = RunDir(member.run_dir).neighbours_figure(member.path.name)
    figure = neighbours_figure(rows, out)
    summary = {
        **figure,
        "checkpoint": str(member.path),
        "features": str(root),
        "train_images": sum(store.counts),
        "feature_bytes": sum(store.counts) * store.dim * 2,
        "chunk_rows": chunk_rows,
        "seconds": {
            "extract": extracted - started,
            "search": searched - extracted,
            "figure": time.perf_counter() - searched,
        },
        "queries": [{key: row[key] for key in ("index", "label", "label_name", "top5", "neighbours")} for row in rows],
    }
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary


def filters(member: Member, device: torch.device | None = None) -> dict[str, Any]:
    """Figure 3 for ``member``: ``RUN/figures/conv1-filters-<checkpoint>.png`` and its JSON summary."""
    towers = member.build(device or torch.device("cpu")).conv1_filters()
    out = RunDir(member.run_dir).figures / f"conv1-filters-{member.path.name}.png"
    summary = {
        **filters_figure(towers, out, f"conv1 kernels, {member.run_dir.name} step {member.step}"),
        "checkpoint": str(member.path),
    }
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary


# ---------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="figure", required=True)
    for name, help_text in (
        ("filters", "figure 3: conv1 kernels per tower and their colour fraction"),
        ("neighbours", "figure 4: top-5 predictions and nearest training images in fc7 space"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--run-dir", type=Path, required=True)
        p.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
        p.add_argument("--data", help="dataset directory (default: the run's)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        if name == "neighbours":
            p.add_argument("--images", type=int, default=8, help="val images to show (the first ones)")
            p.add_argument("--k", type=int, default=6, help="nearest training images per val image (the paper: 6)")
            p.add_argument("--batch-size", type=int, default=128, help="images per process and step")
            p.add_argument("--chunk-rows", type=int, default=16384, help="feature rows per search chunk")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    env = ProcessEnv.from_environ()
    device = select_device(args.device, env.local_rank, option="--device")
    member = load_member(resolve_checkpoint(args.run_dir, args.checkpoint), data=args.data)
    if args.figure == "filters":
        summary = filters(member, device)
        print(
            f"{summary['png']} ({summary['size'][0]}x{summary['size'][1]}): colour fraction per tower "
            + ", ".join(f"{f:.3f}" for f in summary["colour_fraction"])
        )
        return 0
    if min(args.images, args.k, args.batch_size, args.chunk_rows) < 1:
        raise UserError("--images, --k, --batch-size and --chunk-rows must be at least 1")
    with process_group(env, device, timedelta(minutes=60)):
        summary = neighbours(
            member,
            images=args.images,
            k=args.k,
            device=device,
            batch_size=args.batch_size,
            chunk_rows=args.chunk_rows,
            rank=env.rank,
            world=env.world_size,
        )
    if summary is not None:
        s = summary["seconds"]
        print(
            f"{summary['png']} ({summary['size'][0]}x{summary['size'][1]}): {len(summary['queries'])} val images, "
            f"{summary['train_images']} train features ({summary['feature_bytes'] / 2**20:.1f} MiB float16); "
            f"extract {s['extract']:.1f} s, search {s['search']:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
