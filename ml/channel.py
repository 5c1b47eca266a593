"""A training channel read as parts: the shards of a shard channel, or runs of a folder's photos.

Two ways to train from a channel (``ml.train --data-mode``):

- memory: every photo decoded once into one uint8 tensor (:func:`load_parts` -> ``ml.data.CachedImages``);
  fast for a few tens of thousands of photos, and the same tensor, record for record, whether the channel is
  a folder or the shards packed from it;
- stream: :class:`PhotoStream`, an ``IterableDataset`` that reads this process's parts in an epoch-seeded
  order through a seeded shuffle buffer and decodes in DataLoader workers; memory stays flat however many
  photos there are (the full counting split is ~54 GB decoded at 224 px).

A sample that cannot be trained on (a shard member missing, metadata that does not parse, a photo that does
not decode) becomes an ``ml.abid.Rejected`` with its reason on both paths, never a silent gap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ml import abid, shards
from ml.abid import AbidRecord, InvalidRecord, Rejected
from ml.data import CachedImages, ImageError, decode_image

# Photos per part of a folder read as a stream: the pack step's shard size, so a folder streams through the
# same boundaries, shuffle and worker split as the shards packed from it.
FOLDER_PART_PHOTOS = 1000
# auto picks memory when the decoded photos take at most this share of what is free: the rest is for the
# model, its activations, the DataLoader and the validation photos' predictions.
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Selection:
    """Which photos train: expected quantity in [min_count, max_count] (None: no upper bound)."""

    min_count: int = 0
    max_count: int | None = None

    def keeps(self, record: AbidRecord) -> bool:
        return record.quantity >= self.min_count and (self.max_count is None or record.quantity <= self.max_count)


@dataclass(frozen=True)
class Part:
    """A unit of reading: one shard file, or a run of a folder's records (``records`` set)."""

    path: Path
    records: tuple[AbidRecord, ...] | None = None

    @property
    def name(self) -> str:
        if self.records is None:
            return self.path.name
        return f"{self.path.name}[{self.records[0].image_id}..{self.records[-1].image_id}]" if self.records else "-"


def channel_parts(folder: Path, selection: Selection = Selection(),
                  limit: int = 0) -> tuple[list[Part], list[Rejected]]:
    """The parts of a channel in reading order, and the rejects found while listing it.

    A folder holding ``*.tar`` files is a shard channel; anything else is an ABID folder, whose selected records
    (the first ``limit`` of them when set) are cut into parts of ``FOLDER_PART_PHOTOS``. A shard channel's
    selection is applied as its records are read, so ``limit`` is refused there (it would need a pass over the
    metadata to know which photos are first)."""
    folder = Path(folder)
    files = shards.shard_files(folder)
    if files:
        if limit:
            raise ValueError("--limit takes the first photos of a folder; a shard channel has no cheap 'first N'")
        refuse_keys_in_two_shards(folder, files)
        return [Part(path) for path in files], []
    records, rejected = abid.scan_folder(folder)
    records = [r for r in records if selection.keeps(r)]
    if limit:
        records = records[:limit]
    parts = [Part(folder, tuple(records[i : i + FOLDER_PART_PHOTOS]))
             for i in range(0, len(records), FOLDER_PART_PHOTOS)]
    return parts, rejected


def refuse_keys_in_two_shards(folder: Path, files: Sequence[Path]) -> None:
    """Raises :class:`ml.shards.ShardError` naming the photo id and both shards when one id is in two shards of
    a channel: it would be trained twice (a shard refuses a key repeated inside itself, ml/shards.py). The pack
    plan puts each photo in one shard, so such a channel mixes shards of different plans or runs and is refused
    whole rather than trained on. Only the shards this host holds are seen (with ShardedByS3Key, each host's)."""
    first_seen: dict[str, str] = {}
    twice: list[tuple[str, str, str]] = []
    for path in files:
        name = str(path.relative_to(folder))
        for key in sorted(shards.shard_keys(path)):
            other = first_seen.setdefault(key, name)
            if other != name:
                twice.append((key, other, name))
    if twice:
        key, first, second = twice[0]
        more = f" (and {len(twice) - 1} more photo ids in two shards)" if len(twice) > 1 else ""
        raise shards.ShardError(f"duplicate key {key}: photo {key} is in two shards of {folder.name}/, {first} and "
                                f"{second}{more}; a channel must hold each photo once (one pack plan's shards)")


def read_part(part: Part, selection: Selection) -> Iterator[tuple[AbidRecord, bytes] | Rejected]:
    """The part's selected samples as (record, photo bytes), in order; a sample that cannot be read, as a reject."""
    if part.records is not None:
        for record in part.records:
            try:
                yield record, (part.path / record.image_key).read_bytes()
            except OSError as error:
                yield Rejected(record.image_id, f"image {record.image_key} cannot be read: {error.strerror or error}")
        return
    with part.path.open("rb") as handle:
        samples = shards.read_shard(handle, part.path.name)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except shards.ShardError as error:
                # The samples before the damage were yielded; the rest of the shard is recorded as one reject
                # naming the shard and member, and training goes on with the other shards.
                yield Rejected(f"{part.path.name}:unreadable", str(error))
                break
            missing = sample.missing()
            if missing:
                yield Rejected(sample.key, f"{missing} (in {part.path.name})")
                continue
            try:
                record = abid.parse_metadata(sample.key, sample.metadata)
            except InvalidRecord as error:
                yield Rejected(sample.key, f"{error} (in {part.path.name})")
                continue
            if selection.keeps(record):
                yield record, sample.image


def count_part(part: Part, selection: Selection) -> int:
    """Selected photos of a part, from the metadata alone (a shard is read through once, its photos not decoded)."""
    if part.records is not None:
        return len(part.records)
    kept = 0
    try:
        for key, metadata in shards.read_metadata(part.path):
            try:
                kept += selection.keeps(abid.parse_metadata(key, metadata))
            except InvalidRecord:
                continue
    except shards.ShardError:
        pass  # counted up to the damage, as read_part reads it (and rejects the rest, naming it)
    return kept


def load_parts(parts: Sequence[Part], size: int, selection: Selection = Selection(), *,
               progress: bool = False) -> CachedImages:
    """Decode every selected photo of ``parts`` into memory, in reading order (the memory path).

    The records, their order and every pixel equal ``ml.data.load_images`` on the folder the parts came from
    (the photos are decoded by the same function from the same bytes)."""
    records: list[AbidRecord] = []
    tensors: list[torch.Tensor] = []
    rejected: list[Rejected] = []
    for part in parts:
        for item in read_part(part, selection):
            if isinstance(item, Rejected):
                rejected.append(item)
                continue
            record, photo = item
            try:
                tensors.append(decode_image(photo, size))
            except ImageError as error:
                rejected.append(Rejected(record.image_id, str(error)))
                continue
            records.append(record)
            if progress and len(records) % 2000 == 0:
                print(f"decoded {len(records)} images", flush=True)
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return CachedImages(records, images, rejected)


def load_channel(folder: Path, size: int) -> CachedImages:
    """Every photo of a channel (an ABID folder or a folder of shards) decoded into memory, with every reject,
    those found while listing it first: what validation and ``ml.evaluate`` score."""
    parts, rejected = channel_parts(folder)
    loaded = load_parts(parts, size)
    loaded.rejected = rejected + loaded.rejected
    return loaded


def epoch_parts(parts: Sequence[Part], seed: int, epoch: int) -> list[Part]:
    """Every part in this epoch's order: the same on every rank, so each can take its own stride of it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [parts[i] for i in torch.randperm(len(parts), generator=generator).tolist()]


class StreamBatch(NamedTuple):
    """A batch as the stream delivers it: uint8 photos (N, 3, S, S), their records, and the samples rejected
    since the previous batch (N may be 0 when a batch's worth of samples were all rejected at the end)."""

    images: torch.Tensor
    records: list[AbidRecord]
    rejected: list[Rejected]


class PhotoStream(IterableDataset):
    """This process's share of a channel, read part by part through a shuffle buffer and decoded in workers.

    Each epoch: the parts are permuted with the epoch's seed (the same order on every rank); this process takes
    parts ``reader, reader + readers, ...`` of that order; each DataLoader worker takes its own stride of those;
    a worker's samples pass a shuffle buffer of ``shuffle_buffer`` encoded photos (36 KB each for a 500 px JPEG
    at quality 90, against 150 KB decoded at 224 px) seeded by (seed, epoch, reader, worker), are decoded, and
    leave as batches of ``batch_size`` (each worker's last batch may be smaller, or one larger rather than a
    batch of one). Every selected photo of the reader's parts comes out exactly once per epoch, as a photo or
    a reject.
    """

    def __init__(self, parts: Sequence[Part], size: int, batch_size: int, *, seed: int, reader: int = 0,
                 readers: int = 1, selection: Selection = Selection(), shuffle_buffer: int = 2000) -> None:
        super().__init__()
        if not 0 <= reader < readers:
            raise ValueError(f"reader {reader} of {readers}")
        self.parts, self.size, self.batch_size = list(parts), size, batch_size
        self.seed, self.reader, self.readers = seed, reader, readers
        self.selection, self.shuffle_buffer = selection, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's iterator is made (workers are forked with the dataset as it is then)."""
        self.epoch = epoch

    def my_parts(self) -> list[Part]:
        return epoch_parts(self.parts, self.seed, self.epoch)[self.reader :: self.readers]

    def _shuffled(self, parts: list[Part], rng: random.Random) -> Iterator[tuple[AbidRecord, bytes] | Rejected]:
        buffer: list[tuple[AbidRecord, bytes]] = []
        for part in parts:
            for item in read_part(part, self.selection):
                if isinstance(item, Rejected) or self.shuffle_buffer <= 1:
                    yield item
                else:
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        chosen = rng.randrange(len(buffer))
                        buffer[chosen], buffer[-1] = buffer[-1], buffer[chosen]
                        yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.reader}/{worker}")
        images: list[torch.Tensor] = []
        records: list[AbidRecord] = []
        rejected: list[Rejected] = []
        # The last full batch is held back until the next one is complete: a worker's stream ending with a single
        # photo puts it in that batch instead of a batch of one (BatchNorm cannot train on one photo whose last
        # feature map is 1x1, as at 32 px), and no photo is dropped.
        held: tuple[list[torch.Tensor], list[AbidRecord], list[Rejected]] | None = None
        for item in self._shuffled(self.my_parts()[worker::workers], rng):
            if isinstance(item, Rejected):
                rejected.append(item)
                continue
            record, photo = item
            try:
                images.append(decode_image(photo, self.size))
            except ImageError as error:
                rejected.append(Rejected(record.image_id, str(error)))
                continue
            records.append(record)
            if len(records) == self.batch_size:
                if held is not None:
                    yield self._batch(*held)
                held, images, records, rejected = (images, records, rejected), [], [], []
        if held is not None and len(records) < 2:
            held = (held[0] + images, held[1] + records, held[2] + rejected)
            images, records, rejected = [], [], []
        if held is not None:
            yield self._batch(*held)
        if records or rejected:
            yield self._batch(images, records, rejected)

    def _batch(self, images: list[torch.Tensor], records: list[AbidRecord], rejected: list[Rejected]) -> StreamBatch:
        stacked = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return StreamBatch(stacked, records, rejected)


def estimated_batches(photos: int, batch_size: int, workers: int) -> int:
    """Batches a stream of ``photos`` gives: each of ``workers`` workers ends with its own partial batch."""
    if photos <= 0:
        return 0
    return math.ceil(photos / batch_size) + max(0, min(workers, photos) - 1)


def choose_data_mode(requested: str, decoded_bytes: int, host_free: int, gpu_free: int | None) -> tuple[str, str]:
    """(memory or stream, why): auto takes memory when the decoded photos fit ``MEMORY_SHARE`` of the host's
    available memory and, on a GPU (where the memory path keeps them), of the GPU's free memory."""
    gib = 1 << 30
    need = f"the decoded photos take {decoded_bytes / gib:.2f} GiB"
    if requested != "auto":
        return requested, f"--data-mode {requested} ({need})"
    limits = [("the host's available memory", host_free)] + ([("the GPU's free memory", gpu_free)]
                                                             if gpu_free is not None else [])
    for what, free in limits:
        if decoded_bytes > MEMORY_SHARE * free:
            return "stream", f"{need}, more than {MEMORY_SHARE:.0%} of {what} ({free / gib:.1f} GiB)"
    where = " and ".join(f"{what} ({free / gib:.1f} GiB)" for what, free in limits)
    return "memory", f"{need}, at most {MEMORY_SHARE:.0%} of {where}"


def host_available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
