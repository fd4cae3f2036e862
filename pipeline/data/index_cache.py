"""The shards' DALI index files and labels, read in arrays and cached per dataset.

An ImageNet epoch plan needs the offsets of 1.28M samples and their labels; both are parsed in numpy
(nothing per sample) and kept as ``.npy`` files in the dataset's cache (:data:`INDEX_CACHE`), named by
the source file's path and stat, so a rewritten index or shard is read again. What the fast path cannot
parse goes through :func:`index_rows`, which accepts any member order and names the bad line.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

from basics.errors import UserError
from basics.files import atomic_output
from preprocess import format as fmt

INDEX_CACHE = "index"  # parsed DALI index files (.npy), inside the dataset's cache directory
INDEX_COLUMNS = 4  # jpg offset, jpg size, cls offset, cls size
_LABEL_DIGITS = 18  # longest label parsed in arrays (int64); longer ones go through the exact path
_TOKENS_PER_ROW = 8  # "jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls", the order preprocess writes


def read_index(path: Path, cache: Path | None = None) -> np.ndarray:
    """int64 ``[n, 4]``: jpg offset, jpg size, cls offset, cls size per sample of a DALI index file (v1.2).

    An ImageNet epoch reads ~1,300 of these (1.28M rows), so the rows are parsed column-wise into
    one array (no object per sample); an index in another member order, or a malformed one, goes
    through :func:`index_rows`, which accepts any order and names the bad line. With ``cache`` (a
    directory), the parsed array is kept there as ``.npy``, named by the index file's path, size,
    mtime, ctime and inode, so a rewritten index is parsed again; loading it is ~10x cheaper
    than parsing (0.6 s of an ImageNet epoch's plan at dp 1).
    """
    cached = _index_cache_file(cache, path) if cache is not None else None
    rows = _load_cached(cached, np.int64, 2)
    if rows is not None and rows.shape[1] == INDEX_COLUMNS:
        return rows
    rows = _parse_index_file(path)
    _store_cached(cached, rows)
    return rows


def _index_cache_file(cache: Path, index: Path, kind: str = "") -> Path | None:
    """The cache file of what was read from ``index`` (any file): named by its path and stat, so a
    rewritten file is read again."""
    try:
        st = index.stat()
    except FileNotFoundError:
        return None  # the reader says what is missing
    name = hashlib.sha256(os.path.abspath(index).encode()).hexdigest()[:24]
    return cache / f"{kind}{name}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}.npy"


def _load_cached(cached: Path | None, dtype: type, ndim: int) -> np.ndarray | None:
    if cached is None:
        return None
    try:
        array = np.load(cached, allow_pickle=False)
    except (OSError, ValueError):
        return None  # not there yet (or damaged): read again
    return array if array.dtype == dtype and array.ndim == ndim else None


def _store_cached(cached: Path | None, array: np.ndarray) -> None:
    if cached is None:
        return
    try:
        with atomic_output(cached, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    except (OSError, UserError):
        pass  # a cache: reading again next time is fine


def read_labels(shard: Path, spans: np.ndarray, cache: Path | None = None) -> np.ndarray:
    """int32 label of each of a shard's samples (``spans``: their .cls members' offset and size, index order).

    -1 where the member is not a plain decimal number (signs, spaces, junk, past the shard's end): the
    reader parses those one by one and names the sample when it is bad. Read once per dataset: with
    ``cache`` the labels are kept like the parsed index, named by the shard's path and stat. Reading
    them touches a page per sample, so an epoch must not do it (at ImageNet's size 2.8 s and ~1.28M
    page reads at every epoch's start, measured on the replicated set).
    """
    cached = _index_cache_file(cache, shard, "labels-") if cache is not None else None
    labels = _load_cached(cached, np.int32, 1)
    if labels is not None and len(labels) == len(spans):
        return labels
    with open(shard, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            labels = np.full(len(spans), -1, np.int32)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                data = np.frombuffer(mapped, np.uint8)
                value = decimal_labels(data, spans)
                del data  # the mapping closes only once no array views it
            labels = np.where((value >= 0) & (value < 2**31), value, -1).astype(np.int32)
    _store_cached(cached, labels)
    return labels


def decimal_labels(data: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """int64 values of the ``.cls`` members at ``spans`` (offset, size) in ``data``, -1 where a member is not
    1..18 decimal digits within ``data``: parsed in arrays, nothing per sample."""
    offset, size = spans[:, 0], spans[:, 1]
    labels = np.full(len(spans), -1, np.int64)
    simple = np.flatnonzero((size >= 1) & (size <= _LABEL_DIGITS) & (offset + size <= len(data)))
    if not len(simple):
        return labels
    offset, size = offset[simple], size[simple]
    width = np.arange(int(size.max()))
    valid = width[None, :] < size[:, None]
    digits = data[np.where(valid, offset[:, None] + width[None, :], offset[:, None])].astype(np.int64) - 48
    digits = np.where(valid, digits, 0)
    decimal = ((digits >= 0) & (digits <= 9)).all(axis=1)
    value = np.zeros(len(simple), np.int64)
    for column in range(len(width)):  # Horner, skipping each row's padding
        value = np.where(valid[:, column], value * 10 + digits[:, column], value)
    labels[simple[decimal]] = value[decimal]
    return labels


def _parse_index_file(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: DALI index file is missing; re-run `python -m preprocess shard`") from None
    tokens = data.split()
    n = (len(tokens) - 2) // _TOKENS_PER_ROW
    if (
        len(tokens) == 2 + n * _TOKENS_PER_ROW
        and data.count(b"\n") == n + 1
        and tokens[1] == str(n).encode()
        and tokens[2::_TOKENS_PER_ROW].count(fmt.IMAGE_EXT.encode()) == n
        and tokens[6::_TOKENS_PER_ROW].count(fmt.LABEL_EXT.encode()) == n
    ):
        rows = np.empty((n, INDEX_COLUMNS), np.int64)
        try:
            for column, token in enumerate((3, 4, 7, 8)):
                values = tokens[token::_TOKENS_PER_ROW]
                if not all(map(bytes.isdigit, values)):
                    raise ValueError
                rows[:, column] = np.fromiter(map(int, values), np.int64, n)
            return rows
        except ValueError:
            pass  # the slow path names the line
    parsed = index_rows(path)
    return np.array([row[1:] for row in parsed], np.int64).reshape(len(parsed), INDEX_COLUMNS)


def index_rows(path: Path) -> list[tuple[str, int, int, int, int]]:
    """(key, jpg offset, jpg size, cls offset, cls size) per sample, any member order; errors name the line.

    Python objects per row: for error messages and odd indexes only, never for a whole epoch.
    """
    rows = []
    try:
        with open(path) as f:
            header = f.readline().split()
            for line_no, line in enumerate(f, start=2):
                parts = line.split()
                members = {}
                for i in range(0, len(parts) - 3, 4):  # groups of: ext offset size name
                    offset, size = parts[i + 1], parts[i + 2]
                    if not (offset.isdigit() and size.isdigit()):
                        raise UserError(
                            f"{path}:{line_no}: index row has a non-numeric offset or size "
                            f"({offset!r}, {size!r}); re-run `python -m preprocess shard`"
                        )
                    members[parts[i]] = (int(offset), int(size), parts[i + 3])
                if fmt.IMAGE_EXT not in members or fmt.LABEL_EXT not in members:
                    raise UserError(
                        f"{path}:{line_no}: sample without both .{fmt.IMAGE_EXT} and .{fmt.LABEL_EXT} "
                        "(or an index without member names); re-run `python -m preprocess shard`"
                    )
                jpg, cls = members[fmt.IMAGE_EXT], members[fmt.LABEL_EXT]
                rows.append((jpg[2].split(".", 1)[0], jpg[0], jpg[1], cls[0], cls[1]))
    except FileNotFoundError:
        raise UserError(f"{path}: DALI index file is missing; re-run `python -m preprocess shard`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text DALI index file; re-run `python -m preprocess shard`") from None
    if len(header) != 2 or not header[1].isdigit() or int(header[1]) != len(rows):
        raise UserError(f"{path}: index header says {header[1:]} samples, it lists {len(rows)}")
    return rows
