"""Where a split's images come from: (key, label, bytes-locator) for every image of the input.

Three kinds of input, told apart by what is on disk:

* an ImageFolder tree ``SRC/<wnid>/*``: the folder names are the classes (sorted, torchvision's
  convention) and every non-hidden file is an item (bad contents are the decoder's business);
  symlinks are followed (a directory reached twice, i.e. a loop, is walked once);
* a flat folder of val images ``SRC/ILSVRC2012_val_00000001.JPEG``: labels from the devkit
  (``--devkit``) or Kaggle's ``LOC_val_solution.csv`` (``--labels``);
* the official archives, read in place: ``ILSVRC2012_img_train.tar`` (an uncompressed tar of
  per-class uncompressed tars) and ``ILSVRC2012_img_val.tar`` (a flat tar, labelled as above).
  Only the tar headers are scanned; an item is (archive path, byte offset, size), so workers
  seek and read one image without extracting anything.

The devkit's ground truth numbers classes by ILSVRC2012_ID, which follows meta.mat's own order,
NOT sorted-wnid order: an ID must go through meta.mat to its wnid and then to the wnid's index in
the class list. Reading the IDs as indices is the classic ImageNet val mislabeling bug.

Nothing is read unbounded and nothing can block: an item is opened only once ``stat`` shows a
regular file within the size cap, opened non-blocking and checked again, and read to at most the
cap; FIFOs, devices, symlink loops, dangling links and oversize files or archive members become
:class:`SkippedFile` with the reason, which the shard writer lists in the manifest. Devkit members
are read with a cap too.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from basics.errors import UserError
from preprocess import format as fmt

DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
SYNSET_MAPPING = "LOC_synset_mapping.txt"  # Kaggle's "wnid words" list, next to LOC_val_solution.csv
VAL_NAME = "ILSVRC2012_val_{:08d}"  # val image n (1-based) of the devkit's ground truth
# meta.mat is ~2 MB and the ground truth ~200 KB: anything far larger is not the devkit.
MAX_DEVKIT_MEMBER_BYTES = 64 << 20
MAX_DEVKIT_MEMBERS = 10_000  # the devkit has ~30

_BLOCK = tarfile.BLOCKSIZE
# Leading bytes of compressed files: such tars cannot be read at an offset without decompressing.
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}


class SkippedFile(OSError):
    """A source file that is not read at all (FIFO, device, loop, dangling link, too large): ``str`` is why."""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One image: small and picklable, since the shard writer ships lists of these to workers."""

    key: str  # sample key, no dots (format.sample_key), unique within the split
    label: int  # class index
    origin: str  # for messages and the skipped list: a file path, or "ARCHIVE.tar:member/path"
    path: str  # file that holds the bytes
    offset: int = 0  # byte offset of the payload in `path`
    size: int = -1  # payload length; -1 = the whole file
    error: str = ""  # why it is skipped unread, known from the scan (a GNU sparse member, a directory loop)

    def read(self, max_bytes: int | None = None) -> bytes:
        """The image file's bytes; OSError if they cannot be had (the writer records it and goes on).

        :class:`SkippedFile` for what must not be read: not a regular file, or more than ``max_bytes``.
        """
        if self.error:
            raise SkippedFile(self.error)
        if self.size > (max_bytes if max_bytes is not None else self.size):
            raise SkippedFile(_too_large(self.size, max_bytes))  # type: ignore[arg-type]
        if self.size < 0:
            return read_regular_file(self.path, max_bytes)
        with open(self.path, "rb") as f:  # the archive, a regular file (checked when it was scanned)
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"archive ends inside this member ({len(data)} of {self.size} bytes)")
        return data


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path`` (symlinks followed) if it is a regular file of at most ``max_bytes``.

    Raises :class:`SkippedFile` otherwise, without opening anything that is not a regular file
    (opening a FIFO blocks until a writer appears; /dev/zero never ends).
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise SkippedFile(_stat_failure(path, e)) from None
    _require_regular(info, max_bytes)
    # O_NONBLOCK: should the path have become a FIFO since the stat, the open must not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        _require_regular(os.fstat(fd), max_bytes)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise SkippedFile(_too_large(len(data), max_bytes))  # grew since the fstat
    return data


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _require_regular(info: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
        raise SkippedFile(f"not a regular file ({kind})")
    if max_bytes is not None and info.st_size > max_bytes:
        raise SkippedFile(_too_large(info.st_size, max_bytes))


def _stat_failure(path: str, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return "dangling symlink (its target does not exist)"
    return f"unreadable ({error.strerror or error})"


def _too_large(size: int, max_bytes: int) -> str:
    return f"file too large ({size / 2**20:.1f} MB > --max-file-mb {max_bytes >> 20})"


@dataclass
class Source:
    classes: list[dict[str, Any]]  # [{"index": i, "wnid": ..., "name": ... or ""}] in index order
    items: list[SourceItem]  # sorted by key


def open_source(
    src: str, split: str, *, devkit: str | None = None, labels: str | None = None, classes: list[str] | None = None
) -> Source:
    """List a split's images and their labels.

    ``classes``: wnids in index order (from the manifest of a split already written), so that every
    split of a dataset agrees on the indices; without it the class order is sorted wnids.
    ``devkit`` (the devkit tarball, its directory, or meta.mat) also provides the class names.
    """
    src = str(src)
    if not os.path.exists(src):
        raise UserError(f"{src}: no such directory or archive")
    if classes is not None and len(set(classes)) != len(classes):
        raise UserError("the class list has duplicate wnids; the manifest is corrupt")
    kit = _load_devkit(devkit) if devkit else None

    if os.path.isdir(src):
        flat, entries = _scan_directory(src)
    elif os.path.isfile(src):
        flat, entries = _scan_archive(src)
    else:
        raise UserError(f"{src}: not a directory or a regular file")

    names = dict(kit.names) if kit else {}
    if flat:
        val = _val_labels(src, split, kit, labels)
        names = {**val.names, **names}
        _label_flat_entries(entries, val, src)
        default_order = val.classes
    else:
        if labels:
            raise UserError(
                f"{labels}: --labels is for flat folders or archives of images; {src} has "
                "class folders (or per-class tars), whose names are the labels"
            )
        default_order = sorted({e.wnid for e in entries if e.wnid})

    order = _class_order({e.wnid for e in entries if e.wnid}, classes, default_order, src)
    index = {wnid: i for i, wnid in enumerate(order)}
    keys = _unique_keys(entries)
    items = [
        SourceItem(key, index[e.wnid or ""], e.origin, e.path, e.offset, e.size, e.error)
        for key, e in zip(keys, entries)
    ]
    items.sort(key=lambda item: item.key)
    table = [{"index": i, "wnid": wnid, "name": names.get(wnid, "")} for i, wnid in enumerate(order)]
    return Source(classes=table, items=items)


# --------------------------------------------------------------------------------------------
# Entries: items before their labels and keys are settled


@dataclass
class _Entry:
    name: str  # the member or file name the key derives from
    origin: str
    path: str
    offset: int = 0
    size: int = -1
    error: str = ""
    wnid: str | None = None  # known from the folder / inner tar; flat inputs get it from the labels


def _hidden(name: str) -> bool:
    # Dot files: .DS_Store, macOS "._x" resource forks, editor backups; never images.
    return os.path.basename(name.rstrip("/")).startswith(".")


def _unique_keys(entries: list[_Entry]) -> list[str]:
    """One key per entry; where names collide, prefix the wnid (then number), never drop one."""
    keys = [fmt.sample_key(e.name) for e in entries]
    counts = Counter(keys)
    taken = {k for k, n in counts.items() if n == 1}
    clashing = sorted((i for i, k in enumerate(keys) if counts[k] > 1), key=lambda i: (keys[i], entries[i].origin))
    for i in clashing:
        wnid = entries[i].wnid
        base = f"{fmt.sample_key(wnid)}_{keys[i]}" if wnid else keys[i]
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        keys[i] = candidate
    return keys


def _class_order(found: set[str], classes: list[str] | None, default: list[str], src: str) -> list[str]:
    if classes is None:
        return default
    unknown = sorted(found - set(classes))
    if unknown:
        raise UserError(
            f"{src}: class(es) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
            f"are not among the dataset's {len(classes)} classes (from the manifest of "
            "the split written first); shard every split from the same class set"
        )
    return list(classes)


# --------------------------------------------------------------------------------------------
# Directories


def _scan_directory(src: str) -> tuple[bool, list[_Entry]]:
    """(flat?, entries) of an ImageFolder tree or a flat folder of images."""
    src = os.path.abspath(src)  # items are read by worker processes: no cwd dependence
    with os.scandir(src) as it:
        top = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    folders = [e for e in top if _is_dir(e)]
    files = [e for e in top if not _is_dir(e)]
    if folders and files:
        # Refuse rather than guess: the loose files would have no label, or the folders no meaning.
        raise UserError(
            f"{src}: has both class folders ({folders[0].name}/ ...) and loose files "
            f"({files[0].name} ...); expected either SRC/<wnid>/* or a flat folder of images"
        )
    if not top:
        raise UserError(f"{src}: empty directory, no images found")
    if files:
        return True, [_Entry(e.name, e.path, e.path) for e in files]
    entries = []
    for folder in folders:
        found = [
            _Entry(os.path.basename(p), p, p, error=error, wnid=folder.name)
            for p, error in _walk_files(folder.path, set())
        ]
        if not found:
            raise UserError(f"{folder.path}: empty class folder; remove it or restore its images")
        entries += found
    return False, entries


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP): not a directory; reading it records why
        return False


def _walk_files(folder: str, seen: set[tuple[int, int]]) -> Iterator[tuple[str, str]]:
    """(path, error) of the non-hidden non-directories under ``folder``, recursively (as torchvision's
    ImageFolder), sorted.

    Symlinked directories are followed, but one already walked in this class (``seen``: device,
    inode) is not walked again, so a link to an ancestor cannot loop; it becomes an item with an
    error instead. Anything that is not a directory is yielded, FIFOs and broken links included:
    reading decides, and records why it skipped them.
    """
    info = os.stat(folder)
    seen.add((info.st_dev, info.st_ino))
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    for entry in entries:
        if not _is_dir(entry):
            yield entry.path, ""
            continue
        target = os.stat(entry.path)
        if (target.st_dev, target.st_ino) in seen:
            yield entry.path, "symlink loop (links to a directory already walked)"
        else:
            yield from _walk_files(entry.path, seen)


# --------------------------------------------------------------------------------------------
# Archives


def _scan_archive(path: str) -> tuple[bool, list[_Entry]]:
    """(flat?, entries) of ILSVRC2012_img_train.tar (tar of per-class tars) or a flat val tar."""
    path = os.path.abspath(path)
    with open(path, "rb") as f:
        _require_uncompressed_tar(f, path)
        end = os.fstat(f.fileno()).st_size
        members = [m for m in _tar_members(f, 0, end, path) if not m.isdir() and not _hidden(m.name)]
        if not members:
            raise UserError(f"{path}: empty archive, no images found")
        tars = [m for m in members if m.name.endswith(".tar")]
        if tars and len(tars) != len(members):
            other = next(m for m in members if not m.name.endswith(".tar"))
            raise UserError(
                f"{path}: mixes per-class tars ({tars[0].name} ...) and other members "
                f"({other.name} ...); expected ILSVRC2012_img_train.tar or a flat val tar"
            )
        if not tars:
            return True, [_member_entry(m, path, f"{path}:") for m in members]
        entries = []
        for inner in tars:
            entries += _inner_tar_entries(f, path, inner)
    return False, entries


def _inner_tar_entries(f: BinaryIO, path: str, inner: tarfile.TarInfo) -> list[_Entry]:
    where = f"{path}:{inner.name}"
    if inner.issparse() or not inner.isreg():
        raise UserError(f"{where}: not a regular tar member; re-download the archive")
    start = inner.offset_data
    f.seek(start)
    _require_uncompressed_tar(f, where)
    wnid = os.path.basename(inner.name)[: -len(".tar")]
    members = _tar_members(f, start, start + inner.size, where)
    entries = [_member_entry(m, path, f"{where}/", wnid) for m in members if not m.isdir() and not _hidden(m.name)]
    if not entries:
        raise UserError(f"{where}: class tar with no images")
    return entries


def _member_entry(member: tarfile.TarInfo, path: str, prefix: str, wnid: str | None = None) -> _Entry:
    """An entry for a tar member; members that are not one contiguous byte range carry an error."""
    entry = _Entry(
        os.path.basename(member.name), prefix + member.name, path, member.offset_data, member.size, wnid=wnid
    )
    if member.issparse():
        entry.error = "GNU sparse tar member (bytes not stored contiguously); extract it and use the folder"
    elif not member.isreg():
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
        entry.error = f"tar member is a {kind}, not a regular file"
    return entry


def _require_uncompressed_tar(f: BinaryIO, where: str) -> None:
    """Raise unless ``f`` (at its current position) can be read at offsets: seekable, not compressed."""
    if not f.seekable():
        raise UserError(f"{where}: not seekable; give a regular file (an uncompressed .tar)")
    pos = f.tell()
    head = f.read(8)
    f.seek(pos)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise UserError(
                f"{where}: {kind}-compressed; images are read at byte offsets, which needs an "
                "uncompressed tar: decompress it first (the official ILSVRC2012 tars are not "
                "compressed)"
            )


def _tar_members(f: BinaryIO, start: int, end: int, where: str) -> list[tarfile.TarInfo]:
    """Headers of the tar stored at [start, end) of ``f``, with absolute data offsets.

    tarfile takes ``fileobj.tell()`` as the archive start and reports every ``offset_data`` as
    ``fileobj.tell()`` (Lib/tarfile.py: ``TarFile.__init__``, ``TarInfo._proc_builtin``), so a tar
    opened at an inner member's data offset yields offsets into the outer file. What tarfile does
    not check, we do: an inner tar without an end marker would run on into the outer archive, and
    a corrupt header past the first silently ends its member list.
    """
    f.seek(start)
    members = []
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
        for member in tar:
            if member.offset >= end:
                return members  # ran past an inner tar that lacks its end-of-archive blocks
            if member.offset_data + (0 if member.issparse() else _stored_size(member)) > end:
                raise UserError(
                    f"{where}: member {member.name} runs past the end of the archive "
                    "(truncated download?); re-download it"
                )
            members.append(member)
        stop = tar.offset
    except tarfile.ReadError as e:
        raise UserError(f"{where}: not a readable uncompressed tar ({e})") from None
    if stop < end:
        f.seek(stop)
        if f.read(min(_BLOCK, end - stop)).strip(b"\0"):
            raise UserError(f"{where}: corrupt tar header at byte {stop}; re-download the archive")
    return members


def _stored_size(member: tarfile.TarInfo) -> int:
    return member.size if member.isreg() else 0


# --------------------------------------------------------------------------------------------
# Labels of flat inputs: devkit (meta.mat + ground truth) or Kaggle's LOC_val_solution.csv


@dataclass
class _Devkit:
    where: str
    id_to_wnid: dict[int, str]  # the leaf classes: ILSVRC2012_ID -> wnid
    names: dict[str, str]  # wnid -> words, every synset
    ground_truth: list[int] | None  # ILSVRC2012_ID of val image 1, 2, ...; None if not present


@dataclass
class _ValLabels:
    wnid_of: dict[str, str]  # image name without extension -> wnid
    classes: list[str]  # default class order: sorted wnids
    names: dict[str, str] = field(default_factory=dict)
    where: str = ""


def _val_labels(src: str, split: str, kit: _Devkit | None, labels: str | None) -> _ValLabels:
    if labels is None and kit is None:
        raise UserError(
            f"{src}: a flat folder or archive of images has no class folders; give the "
            f"{split} labels with --devkit (ILSVRC2012_devkit_t12.tar.gz or its directory) "
            "or --labels (LOC_val_solution.csv)"
        )
    if labels is not None and not os.path.isfile(labels):
        raise UserError(f"{labels}: no such labels file")
    if labels is not None and _is_csv(labels):
        return _csv_labels(labels, kit)
    if kit is None:
        raise UserError(f"{labels}: ILSVRC2012_IDs need meta.mat to become wnids; give --devkit too")
    if labels is not None:
        with open(labels, encoding="utf-8", errors="replace") as fh:
            ids, where = _parse_ground_truth(fh.read(), labels), labels
    elif kit.ground_truth is not None:
        ids, where = kit.ground_truth, f"{kit.where} ({VAL_GROUND_TRUTH})"
    else:
        raise UserError(f"{kit.where}: has no {os.path.basename(VAL_GROUND_TRUTH)}; give it with --labels")
    wnid_of = {}
    for n, ilsvrc_id in enumerate(ids, start=1):
        if ilsvrc_id not in kit.id_to_wnid:
            raise UserError(
                f"{where}: line {n}: ILSVRC2012_ID {ilsvrc_id} is not a leaf class of "
                f"{kit.where}'s meta.mat; is this the ILSVRC2012 devkit?"
            )
        wnid_of[VAL_NAME.format(n)] = kit.id_to_wnid[ilsvrc_id]
    return _ValLabels(wnid_of, sorted(kit.id_to_wnid.values()), kit.names, where)


def _label_flat_entries(entries: list[_Entry], val: _ValLabels, src: str) -> None:
    unlabelled = []
    for entry in entries:
        entry.wnid = val.wnid_of.get(entry.name.split(".", 1)[0])
        if entry.wnid is None:
            unlabelled.append(entry.name)
    if unlabelled:
        raise UserError(
            f"{src}: {len(unlabelled)} image(s) have no label in {val.where} "
            f"(e.g. {', '.join(unlabelled[:3])}); remove them or give the right labels"
        )


def _is_csv(path: str) -> bool:
    if path.lower().endswith(".csv"):
        return True
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readline().startswith("ImageId")


def _csv_labels(path: str, kit: _Devkit | None) -> _ValLabels:
    """Kaggle's LOC_val_solution.csv: ``ImageId,PredictionString`` with the wnid first."""
    wnid_of = {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows, [])
        if header[:2] != ["ImageId", "PredictionString"]:
            raise UserError(f"{path}: expected the header 'ImageId,PredictionString' (LOC_val_solution.csv)")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise UserError(f"{path}: line {line}: expected 'ImageId,wnid x0 y0 x1 y1 ...'")
            wnid_of[row[0].strip()] = row[1].split()[0]
    if kit is not None:
        return _ValLabels(wnid_of, sorted(kit.id_to_wnid.values()), kit.names, path)
    names = _synset_mapping(os.path.join(os.path.dirname(path), SYNSET_MAPPING))
    # The mapping lists all 1000 classes; without it, the classes are those the CSV mentions.
    order = sorted(names) if names else sorted(set(wnid_of.values()))
    return _ValLabels(wnid_of, order, names, path)


def _synset_mapping(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        return {}
    names = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            wnid, _, words = line.strip().partition(" ")
            if wnid:
                names[wnid] = words.strip()
    return names


def _parse_ground_truth(text: str, where: str) -> list[int]:
    ids = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                ids.append(int(line))
            except ValueError:
                raise UserError(f"{where}: line {n}: expected an ILSVRC2012_ID, got {line.strip()[:40]!r}") from None
    return ids


def _load_devkit(devkit: str) -> _Devkit:
    """meta.mat (+ the val ground truth if present) from the devkit tarball, its directory, or a .mat."""
    if os.path.isdir(devkit):
        for base in (os.path.join(devkit, DEVKIT_DIR), devkit):
            meta = os.path.join(base, META_MAT)
            if os.path.isfile(meta):
                truth = os.path.join(base, VAL_GROUND_TRUTH)
                text = _read_bytes(truth) if os.path.isfile(truth) else None
                return _devkit(devkit, _read_bytes(meta), text)
        raise UserError(f"{devkit}: no {DEVKIT_DIR}/{META_MAT} in this directory; is it the ILSVRC2012 devkit?")
    if not os.path.isfile(devkit):
        raise UserError(f"{devkit}: no such devkit archive or directory")
    if devkit.endswith(".mat"):
        return _devkit(devkit, _read_bytes(devkit), None)
    try:
        with tarfile.open(devkit, "r:*") as tar:  # the devkit ships as .tar.gz: ~30 members, 2.5 MB
            wanted = {m.name.lstrip("./"): m for m in _devkit_members(tar, devkit) if m.isreg()}
            meta = _find_suffix(wanted, META_MAT)
            truth = _find_suffix(wanted, VAL_GROUND_TRUTH)
            if meta is None:
                raise UserError(f"{devkit}: has no {META_MAT}; is it ILSVRC2012_devkit_t12.tar.gz?")
            meta_bytes = _read_member(tar, meta, devkit)
            text = _read_member(tar, truth, devkit) if truth else None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{devkit}: cannot read the devkit archive ({e}); re-download it") from None
    return _devkit(devkit, meta_bytes, text)


def _devkit_members(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    for n, member in enumerate(tar, start=1):
        if n > MAX_DEVKIT_MEMBERS:
            raise UserError(
                f"{where}: more than {MAX_DEVKIT_MEMBERS} members, not the ILSVRC2012 devkit; "
                "is this the right archive?"
            )
        yield member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> bytes:
    """A member's bytes, refusing one that claims (or turns out) to be larger than a devkit's files."""
    if member.size > MAX_DEVKIT_MEMBER_BYTES:
        raise UserError(
            f"{where}: member {member.name} is {member.size >> 20} MB, far larger than the "
            "ILSVRC2012 devkit's; is this the right archive?"
        )
    data = tar.extractfile(member).read(MAX_DEVKIT_MEMBER_BYTES + 1)  # type: ignore[union-attr]
    if len(data) != member.size:
        raise UserError(f"{where}: member {member.name} ends early (truncated download?); re-download it")
    return data


def _read_bytes(path: str) -> bytes:
    try:
        return read_regular_file(path, MAX_DEVKIT_MEMBER_BYTES)
    except OSError as e:
        raise UserError(f"{path}: cannot read this devkit file ({e.strerror or e})") from None


def _find_suffix(members: dict[str, tarfile.TarInfo], suffix: str) -> tarfile.TarInfo | None:
    for name in sorted(members):
        if name == suffix or name.endswith("/" + suffix):
            return members[name]
    return None


def _devkit(where: str, meta_mat: bytes, ground_truth: bytes | None) -> _Devkit:
    id_to_wnid, names = _parse_meta(meta_mat, where)
    truth = None
    if ground_truth:
        truth = _parse_ground_truth(ground_truth.decode("utf-8", errors="replace"), f"{where} ({VAL_GROUND_TRUTH})")
    return _Devkit(where, id_to_wnid, names, truth)


_MAT5_HEADER = 128
_MI_COMPRESSED = 15


def _inflated_mat(meta_mat: bytes, where: str) -> bytes:
    """A MAT v5 file with its zlib-compressed variables inflated, at most MAX_DEVKIT_MEMBER_BYTES in all.

    scipy inflates compressed variables without a bound, so a small crafted meta.mat could take
    any amount of memory; inflating them here first, with a cap, bounds what scipy is given.
    Anything that is not MAT v5 is passed through for scipy to refuse.
    """
    if len(meta_mat) < _MAT5_HEADER or meta_mat[126:128] not in (b"IM", b"MI"):
        return meta_mat
    order = "<" if meta_mat[126:128] == b"IM" else ">"
    parts, total, pos = [meta_mat[:_MAT5_HEADER]], _MAT5_HEADER, _MAT5_HEADER
    while pos + 8 <= len(meta_mat):
        kind, size = struct.unpack(order + "II", meta_mat[pos : pos + 8])
        if kind == _MI_COMPRESSED:
            inflater = zlib.decompressobj()
            try:
                element = inflater.decompress(meta_mat[pos + 8 : pos + 8 + size], MAX_DEVKIT_MEMBER_BYTES - total + 1)
            except zlib.error as e:
                raise UserError(f"{where}: meta.mat is damaged ({e}); re-download the devkit") from None
            pos += 8 + size
        else:
            end = pos + 8 + size + (-size % 8)  # uncompressed elements are padded to 8 bytes
            element, pos = meta_mat[pos:end], end
        total += len(element)
        if total > MAX_DEVKIT_MEMBER_BYTES:
            raise UserError(
                f"{where}: meta.mat inflates to more than {MAX_DEVKIT_MEMBER_BYTES >> 20} MB, far "
                "more than the ILSVRC2012 devkit's; is this the right file?"
            )
        parts.append(element)
    return b"".join(parts)


def _parse_meta(meta_mat: bytes, where: str) -> tuple[dict[int, str], dict[str, str]]:
    """(ILSVRC2012_ID -> wnid of the leaf classes, wnid -> words) from meta.mat's ``synsets``."""
    import numpy as np
    import scipy.io

    meta_mat = _inflated_mat(meta_mat, where)
    try:
        synsets = np.atleast_1d(
            scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True, variable_names=["synsets"])["synsets"]
        )
        records = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"])) for s in synsets]
    except Exception as e:  # scipy raises a zoo of types for damaged files (MatReadError, zlib, struct...)
        detail = " ".join(str(e).split())[:100] or type(e).__name__
        raise UserError(
            f"{where}: meta.mat is damaged or not the ILSVRC2012 devkit's (expected synsets with "
            f"ILSVRC2012_ID, WNID, words, num_children): {detail}; re-download the devkit"
        ) from None
    # The classes are the leaves (num_children == 0): 1000 in ILSVRC2012, IDs 1..1000.
    id_to_wnid = {i: wnid for i, wnid, _, children in records if children == 0}
    if not id_to_wnid:
        raise UserError(f"{where}: meta.mat has no leaf synsets (num_children == 0)")
    return id_to_wnid, {wnid: words for _, wnid, words, _ in records}
