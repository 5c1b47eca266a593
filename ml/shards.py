"""Shards: a split's photos and metadata packed into tar files, read as a stream.

Why shards: a training channel of one object per photo makes every instance fetch ~360,000 small objects
before its first step (again after each spot interruption, and once per host). A few hundred tar files of
~1,000 photos each are large sequential reads instead, and with several hosts each can take its own files.

Layout: WebDataset's tar convention, so a user's own tools (``webdataset``, ``tar``) read our shards as they
are. Each sample is consecutive members sharing a key, the basename up to its first dot::

    00123.jpg     the photo, byte for byte as stored under raw/bin-images/
    00123.json    its ABID metadata document, byte for byte as stored under raw/metadata/

The metadata is kept whole (not re-encoded into our own record format) so a shard is parsed with the same
``ml.abid.parse_metadata`` as a folder, and a record from a shard cannot differ from one read from a folder.

Written with the standard library's ``tarfile`` rather than the ``webdataset`` package: the packer runs in
a Lambda and the reader in SageMaker's stock PyTorch container, neither of which ships ``webdataset``, and
the convention is small enough that one module writes and reads it. Headers are fixed (mtime 0, owner 0,
mode 0444, ustar) so the same photos always give the same bytes: a rerun of the packer can tell an
unchanged shard by its digest and write nothing.

Pure standard library: the pack Lambda imports this module as well as the trainer.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SHARD_SUFFIX = ".tar"
IMAGE_EXTENSION = "jpg"
METADATA_EXTENSION = "json"


@dataclass(frozen=True)
class Sample:
    """One photo of a shard. ``image`` or ``metadata`` is None when the shard lacks that member."""

    key: str
    image: bytes | None
    metadata: bytes | None

    def missing(self) -> str | None:
        """Why this sample cannot be trained on, or None when it is whole."""
        absent = [ext for ext, part in ((IMAGE_EXTENSION, self.image), (METADATA_EXTENSION, self.metadata))
                  if part is None]
        return f"the shard has no {' or '.join(f'{self.key}.{ext}' for ext in absent)}" if absent else None


def shard_name(split: str, index: int) -> str:
    """``train-000012.tar``: zero-padded so a listing's order is the packing order."""
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(samples: Iterable[Sample], fileobj: IO[bytes]) -> int:
    """Write ``samples`` in the given order as one tar; returns how many were written."""
    written = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if "." in sample.key or "/" in sample.key or not sample.key:
                raise ValueError(f"a sample key must be a plain name without dots or slashes: {sample.key!r}")
            for extension, payload in ((IMAGE_EXTENSION, sample.image), (METADATA_EXTENSION, sample.metadata)):
                if payload is None:
                    raise ValueError(f"sample {sample.key} has no {extension} member to write")
                tar.addfile(_member(f"{sample.key}.{extension}", len(payload)), io.BytesIO(payload))
            written += 1
    return written


def pack(samples: Iterable[Sample]) -> bytes:
    """The bytes of one shard holding ``samples``."""
    buffer = io.BytesIO()
    write_shard(samples, buffer)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    """The shard's content digest (hex SHA-256), recorded so an unchanged shard is not written again."""
    return hashlib.sha256(data).hexdigest()


class ShardError(ValueError):
    """A shard that cannot be read whole: a corrupt header, a truncated member or archive, a duplicate key. The
    message names the shard and the member."""


_END_OF_ARCHIVE = "end of file header"  # tarfile's message for a zero block (tarfile.EOFHeaderError)


class _CheckedTar(tarfile.TarFile):
    """A tar read that notices what ``tarfile`` passes over in silence.

    In stream mode ``tarfile`` stops at the first header it cannot parse after the first member as if the
    archive had ended (TarFile.next catches InvalidHeaderError and TruncatedHeaderError there), so a corrupt
    header dropped the rest of a shard unnoticed. Opened with ``ignore_zeros``, it reports every block it skips
    (zero blocks and bad headers alike) through ``_dbg``; those are collected here, so a bad header is an error
    and a missing end-of-archive marker shows a truncated shard."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.skipped: list[str] = []  # before TarFile.__init__, which reads the first header
        super().__init__(*args, **kwargs)

    def _dbg(self, level: int, msg: str) -> None:
        self.skipped.append(msg)

    def corrupt(self) -> str | None:
        bad = [m for m in self.skipped if not m.endswith(_END_OF_ARCHIVE)]
        return bad[0] if bad else None

    def ended(self) -> bool:
        return any(m.endswith(_END_OF_ARCHIVE) for m in self.skipped)


def _members(fileobj: IO[bytes], name: str, wanted: tuple[str, ...]) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, bytes)`` of each member with a wanted extension, in order, read as a stream; raises
    :class:`ShardError` for a corrupt header, a truncated member or archive, or a key that comes back after
    another key's members."""
    last = "(none: the first header)"
    done: set[str] = set()
    current: str | None = None
    try:
        with _CheckedTar.open(fileobj=fileobj, mode="r|", ignore_zeros=True) as tar:
            for info in tar:
                if (problem := tar.corrupt()) is not None:
                    raise ShardError(f"{name}: corrupt tar header after member {last} ({problem}); "
                                     "the rest of the shard is unreadable")
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, _, extension = base.partition(".")
                if key != current:
                    if key in done:
                        raise ShardError(f"{name}: duplicate key {key} (member {info.name})")
                    if current is not None:
                        done.add(current)
                    current = key
                extracted = tar.extractfile(info)
                if extracted is not None and extension.lower() in wanted:
                    try:
                        data = extracted.read()
                    except tarfile.ReadError as error:
                        raise ShardError(f"{name}: member {info.name} is truncated ({error})") from None
                    yield key, extension.lower(), data
                last = info.name
            if (problem := tar.corrupt()) is not None:
                raise ShardError(f"{name}: corrupt tar header after member {last} ({problem}); "
                                 "the rest of the shard is unreadable")
            if not tar.ended():
                raise ShardError(f"{name}: truncated after member {last} (no end-of-archive marker)")
    except tarfile.TarError as error:
        raise ShardError(f"{name}: unreadable after member {last}: {error}") from None


def read_shard(fileobj: IO[bytes], name: str | None = None) -> Iterator[Sample]:
    """Samples of one tar, in order, read as a stream (no seeking, so an S3 body or a pipe works).

    Members are grouped by key as WebDataset groups them: consecutive members with the same basename up to
    the first dot. Members with other extensions are skipped; a sample lacking one of its two members is
    still yielded, so the caller can reject it with :meth:`Sample.missing` instead of losing it silently.
    A shard that cannot be read whole raises :class:`ShardError` naming ``name`` (the file's name by default)
    and the member, after yielding the samples before it.
    """
    name = name or str(getattr(fileobj, "name", "shard"))
    key: str | None = None
    parts: dict[str, bytes] = {}
    for member_key, extension, data in _members(fileobj, name, (IMAGE_EXTENSION, METADATA_EXTENSION)):
        if member_key != key:
            if key is not None:
                yield Sample(key, parts.get(IMAGE_EXTENSION), parts.get(METADATA_EXTENSION))
            key, parts = member_key, {}
        if extension in parts:
            raise ShardError(f"{name}: duplicate member {member_key}.{extension}")
        parts[extension] = data
    if key is not None:
        yield Sample(key, parts.get(IMAGE_EXTENSION), parts.get(METADATA_EXTENSION))


def shard_files(folder: Path) -> list[Path]:
    """The shards of a channel folder, in name order (empty for a folder in the ABID layout)."""
    folder = Path(folder)
    return sorted(path for path in folder.rglob(f"*{SHARD_SUFFIX}") if path.is_file())


def is_shard_channel(folder: Path) -> bool:
    """True when a channel holds shards rather than ``bin-images/`` and ``metadata/``."""
    return bool(shard_files(folder))


def read_metadata(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(key, metadata bytes)`` of each sample of a shard file: what a trainer reads to count a channel's photos
    before its first step.

    Read front to back, not by seeking from header to header: a FastFile channel is S3 behind a file system,
    which "works best when the data is read sequentially" (SageMaker API reference, TrainingInputMode), and
    seeking would cost two small reads per photo. On a local disk both ways took about 1 s for 249 MB of
    shards here."""
    with path.open("rb") as handle:
        for key, _, data in _members(handle, path.name, (METADATA_EXTENSION,)):
            yield key, data


def shard_keys(path: Path) -> set[str]:
    """The sample keys of a shard file, from its tar headers alone: each member's data is seeked over, not read
    (two 512-byte headers per photo against ~37 KB of photo and metadata), so a channel's keys are known before
    its first step at little cost. A header that cannot be parsed ends the listing: reading the shard
    (:func:`read_shard`) is what reports the damage, naming the shard and the member."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                if info.isfile():
                    keys.add(info.name.rsplit("/", 1)[-1].partition(".")[0])
                tar.members.clear()  # the TarInfo list would grow with every member; only the keys are kept
    except tarfile.TarError:
        pass
    return keys


def pack_folder(folder: Path, out_dir: Path, split: str, photos_per_shard: int = 1000) -> tuple[list[Path], list]:
    """Pack an ABID folder into ``<split>-000000.tar ...`` of ``photos_per_shard`` photos, in image-id order.

    For tests and benchmarks (the pipeline's pack step writes shards from raw/): returns the shard paths and
    the folder's rejects (``ml.abid.Rejected``: a missing photo or unreadable metadata), which are not packed.
    Image-id order is the order ``ml.abid.scan_folder`` lists a folder without ``records.jsonl``, so the
    shards hold a folder's photos in the order the trainer reads that folder.
    """
    from ml import abid  # pure standard library too; imported here so the format itself stands alone

    if photos_per_shard < 1:
        raise ValueError(f"photos_per_shard must be at least 1, got {photos_per_shard}")
    folder, out_dir = Path(folder), Path(out_dir)
    records, rejected = abid.scan_folder(folder)
    records = sorted(records, key=lambda record: record.image_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, start in enumerate(range(0, len(records), photos_per_shard)):
        chunk = records[start : start + photos_per_shard]
        path = out_dir / shard_name(split, index)
        with path.open("wb") as handle:
            write_shard((Sample(r.image_id, (folder / r.image_key).read_bytes(),
                                (folder / r.metadata_key).read_bytes()) for r in chunk), handle)
        written.append(path)
    return written, rejected
