"""The DALI implementation of ``pipeline.data``: small pipeline functions, as in DALI's ImageNet example.

One pipeline per epoch, seeded from the rank's epoch seed: a fresh reader starts its range with an
empty shuffle buffer, so an epoch is exactly the rank's sample range, reproducible, with nothing
carried over from the previous epoch. The iterator is bounded by the reader (``reader_name``,
``LastBatchPolicy.PARTIAL``); ``common.even_steps`` turns a trailing empty batch into a split of
the last full one. Decoding runs on the GPU (``device="mixed"``) when the training device is CUDA,
else on CPU threads; the graph after the decoder is the same either way, one fused
``crop_mirror_normalize`` per view. Why the reader options are what they are (seen with DALI 2.4):
``docs/data-pipeline.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from pipeline.data.common import EpochRequest, Normalization, Split, derive_seed, finish_batch, parse_labels
from preprocess import format as fmt
from preprocess.errors import UserError

READER = "reader"  # the reader's name: the iterator reads the epoch size and shard layout from it


# --------------------------------------------------------------------------------------------
# Graph pieces


def read(split: Split, *, shard_id: int, num_shards: int, shuffle: bool, buffer: int, seed: int) -> tuple[Any, Any]:
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=[str(p) for p in split.shards],
        index_paths=[str(p) for p in split.indexes],
        ext=[fmt.IMAGE_EXT, fmt.LABEL_EXT],
        missing_component_behavior="error",  # a sample without image or label is a broken shard
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=shuffle,
        initial_fill=buffer,
        seed=seed,
        pad_last_batch=True,  # fill the last batch with copies (dropped) instead of next-epoch reads
        stick_to_shard=True,  # a pipeline lives one epoch; never drift to another rank's range
        name=READER,
    )


def decode(jpegs: Any, *, gpu: bool) -> Any:
    from nvidia.dali import fn, types

    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)


def labels(cls: Any) -> Any:
    """``.cls`` bytes padded with zeros to the longest in the batch: one uint8 tensor; torch parses the digits."""
    from nvidia.dali import fn

    return fn.pad(cls, fill_value=0)


def subtract_mean_image(images: Any, norm: Normalization, *, gpu: bool) -> Any:
    """float HWC = decoded image - the mean image; a no-op for per-channel means (the crop op does those)."""
    from nvidia.dali import types

    if norm.mean_image is None:
        return images
    return images - types.Constant(norm.mean_image, layout="HWC", device="gpu" if gpu else "cpu")


def lighting_offset(norm: Normalization) -> Any:
    """Per sample: ``lighting @ alpha`` with alpha ~ N(0, lighting_std) per principal component (shape [3])."""
    from nvidia.dali import fn

    alpha = fn.random.normal(shape=[1, 3], stddev=norm.lighting_std)
    # coord_transform computes M @ x for every row x of its input: here the one row alpha.
    offset = fn.coord_transform(alpha, M=norm.lighting.flatten().tolist())
    return fn.reshape(offset, shape=[3])


def crop_normalize(images: Any, norm: Normalization, *, pos_x: Any, pos_y: Any, mirror: Any, offset: Any,
                   layout: str) -> Any:
    """One fused pass: window, mirror, ``(x + offset - channel_mean) / channel_std``, float, layout."""
    from nvidia.dali import fn, types

    mean: Any = list(norm.channel_mean)
    if offset is not None:
        mean = types.Constant(np.asarray(norm.channel_mean, np.float32)) - offset
    return fn.crop_mirror_normalize(images, crop=(norm.crop, norm.crop), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                    mirror=mirror, mean=mean, std=list(norm.channel_std), dtype=types.FLOAT,
                                    output_layout=layout)


def offset_positions(norm: Normalization) -> list[float]:
    """Every integer window offset 0..size-crop as a normalised crop position (DALI rounds it back exactly)."""
    if norm.max_offset == 0:
        return [0.5]
    return [k / norm.max_offset for k in range(norm.max_offset + 1)]


# --------------------------------------------------------------------------------------------
# Pipelines


def training_pipeline(split: Split, norm: Normalization, *, shard_id: int, num_shards: int, shuffle_buffer: int,
                      seed: int, gpu: bool, layout: str, with_params: bool = False) -> tuple[Any, ...]:
    """Random crop, mirror with p=1/2, PCA lighting, mean subtraction. Call inside a DALI ``Pipeline``.

    With ``with_params`` it also returns the per-sample crop positions (normalised), mirror flags
    and lighting offsets, which the tests compare with the pixels.
    """
    from nvidia.dali import fn

    # The reader does not derive its seed from the pipeline's (seen with DALI 2.4: other pipeline
    # seeds, same order), so it gets its own, from the same epoch seed.
    jpegs, cls = read(split, shard_id=shard_id, num_shards=num_shards, shuffle=True, buffer=shuffle_buffer,
                      seed=derive_seed("reader", seed))
    images = subtract_mean_image(decode(jpegs, gpu=gpu), norm, gpu=gpu)
    positions = offset_positions(norm)
    # Discrete uniform over the integer offsets: a continuous position would give the two edge
    # offsets half the probability of the others after rounding.
    pos_x = fn.random.uniform(values=positions)
    pos_y = fn.random.uniform(values=positions)
    mirror = fn.random.coin_flip(probability=0.5)
    offset = lighting_offset(norm) if norm.lighting_std > 0 else None
    out = crop_normalize(images, norm, pos_x=pos_x, pos_y=pos_y, mirror=mirror, offset=offset, layout=layout)
    if with_params:
        return out, labels(cls), pos_x, pos_y, mirror, offset if offset is not None else fn.zeros(shape=[3])
    return out, labels(cls)


def eval_pipeline(split: Split, norm: Normalization, *, shard_id: int, num_shards: int, gpu: bool, layout: str,
                  ten_crop: bool) -> tuple[Any, Any]:
    """Centre crop, or the 10 views stacked on a new leading axis: [10, C, H, W] (or [10, H, W, C])."""
    from nvidia.dali import fn

    jpegs, cls = read(split, shard_id=shard_id, num_shards=num_shards, shuffle=False, buffer=1, seed=0)
    images = subtract_mean_image(decode(jpegs, gpu=gpu), norm, gpu=gpu)
    center = norm.center_offset() / norm.max_offset if norm.max_offset else 0.5
    if not ten_crop:
        out = crop_normalize(images, norm, pos_x=center, pos_y=center, mirror=0, offset=None, layout=layout)
        return out, labels(cls)
    windows = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (center, center)]  # tl, tr, bl, br, centre
    views = [crop_normalize(images, norm, pos_x=x, pos_y=y, mirror=mirror, offset=None, layout=layout)
             for mirror in (0, 1) for x, y in windows]
    return fn.stack(*views), labels(cls)


# --------------------------------------------------------------------------------------------
# Running them


def build(split: Split, norm: Normalization, *, train: bool, dp_rank: int, dp_size: int, seed: int,
          device_id: int | None, batch_size: int, workers: int, shuffle_buffer: int = 1, channels_last: bool = False,
          ten_crop: bool = False, with_params: bool = False) -> Any:
    """A built DALI pipeline; ``device_id=None`` runs it on the CPU only."""
    from nvidia.dali import Pipeline

    gpu = device_id is not None
    layout = "HWC" if channels_last else "CHW"
    pipe = Pipeline(batch_size=batch_size, num_threads=workers, device_id=device_id, seed=seed)
    with pipe:
        if train:
            outputs = training_pipeline(split, norm, shard_id=dp_rank, num_shards=dp_size,
                                        shuffle_buffer=shuffle_buffer, seed=seed, gpu=gpu, layout=layout, with_params=with_params)
        else:
            outputs = eval_pipeline(split, norm, shard_id=dp_rank, num_shards=dp_size, gpu=gpu, layout=layout,
                                    ten_crop=ten_crop)
        pipe.set_outputs(*outputs)
    try:
        pipe.build()
    except RuntimeError as e:
        raise UserError(f"{split.describe()}: DALI cannot open the shards: {dali_message(e)}") from None
    return pipe


def iterate(pipe: Any, names: list[str], split: Split) -> Iterator[dict[str, Any]]:
    """The pipeline's batches for one epoch (bounded by the reader), DALI errors as one-line UserErrors."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    it = DALIGenericIterator([pipe], names, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=False, prepare_first_batch=False)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            raise UserError(f"{split.describe()}: DALI failed reading or decoding a sample ({dali_message(e)}); "
                            "--loader torch names the broken sample") from None
        yield batch[0]


def dali_message(error: BaseException) -> str:
    """One line from a DALI error: the failing operator and the cause (they come with Python and C++ traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line for line in lines if line.startswith("Error in ")), "")
    cause = ""
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1:]
        cause = next((line for line in rest if not line.startswith(("Current pipeline", "[/", "Stacktrace"))), "")
    if not cause:
        skip = ("Critical error", "Error in ", "File ", "Current pipeline", "[/", "Stacktrace", "which was used")
        cause = next((line for line in lines if not line.startswith(skip)), lines[0] if lines else type(error).__name__)
    operator = operator.removeprefix("Error in ").rstrip(",")
    return (f"{operator}: {cause}" if operator else cause)[:400]


def batches(request: EpochRequest) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """What ``pipeline.data`` calls: a function that builds the epoch's pipeline and yields (images, labels)."""
    r = request
    device_id = r.device.index if r.device.type == "cuda" else None
    if r.device.type == "cuda" and device_id is None:
        import torch

        device_id = torch.cuda.current_device()

    def run() -> Iterator[tuple[Any, Any]]:
        pipe = build(r.split, r.norm, train=r.train, dp_rank=r.dp_rank, dp_size=r.dp_size, seed=r.seed,
                     device_id=device_id, batch_size=r.batch_size, workers=r.workers, shuffle_buffer=r.shuffle_buffer,
                     channels_last=r.channels_last, ten_crop=r.ten_crop)
        try:
            for batch in iterate(pipe, ["images", "labels"], r.split):
                yield finish_batch(batch["images"], parse_labels(batch["labels"]), r.split, device=r.device,
                                   dtype=r.dtype, channels_last=r.channels_last, input_channels_last=r.channels_last)
        finally:
            del pipe  # free the epoch's buffers before the next epoch builds its pipeline

    return run
