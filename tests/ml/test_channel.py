"""Reading a training channel: shards and folders give the same photos, a stream splits them exactly once
across ranks and workers, and a sample that cannot be trained on is rejected with its reason."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ml import abid, channel, shards
from ml.channel import Part, PhotoStream, Selection
from ml.data import load_images
from ml.shards import Sample

SIZE = 32


@pytest.fixture(scope="module")
def folder(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    records, _ = abid.scan_folder(sample_dir)
    out = tmp_path_factory.mktemp("channel") / "folder"
    abid.materialize_channel(records[:30], sample_dir, out)
    return out


@pytest.fixture(scope="module")
def shard_dir(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("channel") / "shards"
    shards.pack_folder(folder, out, "train", photos_per_shard=7)  # 5 shards: 7, 7, 7, 7, 2 photos
    return out


def _stream_ids(stream: PhotoStream, workers: int = 0) -> list[str]:
    return [r.image_id for batch in DataLoader(stream, batch_size=None, num_workers=workers) for r in batch.records]


def test_shards_load_into_memory_as_the_same_records_and_pixels_as_their_folder(folder: Path,
                                                                                 shard_dir: Path) -> None:
    from_folder = load_images(folder, SIZE)
    parts, rejected = channel.channel_parts(shard_dir)
    from_shards = channel.load_parts(parts, SIZE)
    assert rejected == [] and from_shards.rejected == []
    assert from_shards.records == from_folder.records
    assert torch.equal(from_shards.images, from_folder.images)


def test_a_selection_keeps_the_same_photos_from_shards_as_from_a_folder(folder: Path, shard_dir: Path) -> None:
    selection = Selection(1, 3)
    folder_parts, _ = channel.channel_parts(folder, selection)
    shard_parts, _ = channel.channel_parts(shard_dir, selection)
    assert channel.load_parts(shard_parts, SIZE, selection).records == \
        channel.load_parts(folder_parts, SIZE, selection).records
    assert sum(channel.count_part(p, selection) for p in shard_parts) == \
        sum(len(p.records) for p in folder_parts) > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_epoch_split_over_two_replicated_ranks_sees_every_photo_once(folder: Path, shard_dir: Path,
                                                                               workers: int) -> None:
    records, _ = abid.scan_folder(folder)
    parts, _ = channel.channel_parts(shard_dir)
    for epoch in (0, 1):
        seen = Counter()
        per_rank = []
        for rank in (0, 1):
            stream = PhotoStream(parts, SIZE, 4, seed=3, reader=rank, readers=2, shuffle_buffer=5)
            stream.set_epoch(epoch)
            ids = _stream_ids(stream, workers)
            per_rank.append(len(ids))
            seen.update(ids)
        assert seen == Counter(r.image_id for r in records), epoch
        # Five shards over two ranks: the ranks' shares differ, which the trainer's Join absorbs.
        assert per_rank[0] != per_rank[1]


def test_the_shuffle_differs_by_epoch_and_repeats_for_the_same_epoch(shard_dir: Path) -> None:
    parts, _ = channel.channel_parts(shard_dir)
    stream = PhotoStream(parts, SIZE, 4, seed=3, shuffle_buffer=10)
    first = _stream_ids(stream)
    assert _stream_ids(stream) == first
    stream.set_epoch(1)
    assert _stream_ids(stream) != first and sorted(_stream_ids(stream)) == sorted(first)


def test_a_folder_streams_like_the_shards_packed_with_the_same_boundaries(folder: Path, tmp_path: Path) -> None:
    shards.pack_folder(folder, tmp_path, "train", photos_per_shard=channel.FOLDER_PART_PHOTOS)
    runs = []
    for source in (folder, tmp_path):
        parts, _ = channel.channel_parts(source)
        stream = PhotoStream(parts, SIZE, 4, seed=5, shuffle_buffer=8)
        batches = list(DataLoader(stream, batch_size=None))
        runs.append(([r.image_id for b in batches for r in b.records], torch.cat([b.images for b in batches])))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def _bad_shard(path: Path, photo: bytes, metadata: bytes) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in (("00001.jpg", photo), ("00001.json", metadata),
                              ("00002.jpg", b"not a jpeg at all"), ("00002.json", b'{"EXPECTED_QUANTITY": 2}'),
                              ("00003.jpg", photo),
                              ("00004.jpg", photo), ("00004.json", b'{"EXPECTED_QUANTITY": "two"}')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_corrupt_photo_or_an_incomplete_sample_in_a_shard_is_rejected_with_its_reason(
        tmp_path: Path, sample_photo: bytes, mode: str) -> None:
    _bad_shard(tmp_path / "train-000000.tar", sample_photo, b'{"EXPECTED_QUANTITY": 1}')
    parts, _ = channel.channel_parts(tmp_path)
    if mode == "memory":
        loaded = channel.load_parts(parts, SIZE)
        kept, rejected = [r.image_id for r in loaded.records], loaded.rejected
    else:
        batches = list(DataLoader(PhotoStream(parts, SIZE, 8, seed=1), batch_size=None))
        kept = [r.image_id for b in batches for r in b.records]
        rejected = [item for b in batches for item in b.rejected]
    assert kept == ["00001"]
    reasons = {item.image_id: item.reason for item in rejected}
    assert set(reasons) == {"00002", "00003", "00004"}
    assert reasons["00002"].startswith("not a decodable image")
    assert reasons["00003"] == "the shard has no 00003.json (in train-000000.tar)"
    assert "EXPECTED_QUANTITY is missing or not a non-negative integer" in reasons["00004"]


def test_limit_is_refused_on_a_shard_channel(shard_dir: Path) -> None:
    with pytest.raises(ValueError, match="shard channel"):
        channel.channel_parts(shard_dir, limit=5)


def test_a_photo_in_two_shards_of_a_channel_is_refused_naming_it_and_both_shards(shard_dir: Path,
                                                                                 tmp_path: Path) -> None:
    # Another plan's shard beside this one's: its second photo is also in train-000001.tar.
    mixed = tmp_path / "train"
    mixed.mkdir()
    for path in sorted(shard_dir.glob("*.tar")):
        (mixed / path.name).write_bytes(path.read_bytes())
    with (shard_dir / "train-000001.tar").open("rb") as handle:
        samples = list(shards.read_shard(handle))
    (mixed / "other-000000.tar").write_bytes(shards.pack(samples[1:3]))
    ids = [s.key for s in samples[1:3]]
    with pytest.raises(shards.ShardError, match=rf"duplicate key {ids[0]}: photo {ids[0]} is in two shards of "
                       rf"train/, other-000000\.tar and train-000001\.tar \(and 1 more photo ids in two shards\)"):
        channel.channel_parts(mixed)
    with pytest.raises(shards.ShardError, match=f"duplicate key {ids[0]}"):
        channel.load_channel(mixed, SIZE)  # the validation channel and ml.evaluate read through it too
    # Without the other plan's shard, the channel is read as before.
    (mixed / "other-000000.tar").unlink()
    assert len(channel.channel_parts(mixed)[0]) == 5


def test_auto_keeps_photos_in_memory_only_when_they_take_at_most_half_of_what_is_free() -> None:
    gib = 1 << 30
    # The full counting split: 360,000 photos of 3 x 224 x 224 bytes, 54 GB; a g5.2xlarge has 32 GiB of memory.
    full = 360_000 * 3 * 224 * 224
    assert channel.choose_data_mode("auto", full, 30 * gib, 22 * gib)[0] == "stream"
    assert channel.choose_data_mode("auto", 12_000 * 3 * 224 * 224, 30 * gib, 22 * gib)[0] == "memory"
    mode, why = channel.choose_data_mode("auto", 4 * gib, 30 * gib, 6 * gib)
    assert mode == "stream" and "GPU's free memory" in why
    assert channel.choose_data_mode("memory", full, gib, None)[0] == "memory"


def test_estimated_batches_count_each_workers_last_partial_batch() -> None:
    assert channel.estimated_batches(30, 4, 1) == 8
    assert channel.estimated_batches(30, 4, 3) == 10
    assert channel.estimated_batches(0, 4, 3) == 0


def test_reading_a_part_with_a_missing_photo_gives_a_reject(folder: Path, tmp_path: Path) -> None:
    records, _ = abid.scan_folder(folder)
    part = Part(tmp_path, tuple(records[:1]))  # the photo is not in tmp_path
    (item,) = channel.read_part(part, Selection())
    assert isinstance(item, abid.Rejected) and item.image_id == records[0].image_id
    assert "cannot be read" in item.reason


def test_a_sample_without_metadata_is_yielded_by_the_reader_not_dropped() -> None:
    data = shards.pack([Sample("00005", b"x", b"{}")])
    assert [s.key for s in shards.read_shard(io.BytesIO(data))] == ["00005"]


def test_a_single_photo_left_at_the_end_joins_the_last_batch_instead_of_training_alone(shard_dir: Path) -> None:
    parts, _ = channel.channel_parts(shard_dir)  # 30 photos
    sizes = [len(b.records) for b in DataLoader(PhotoStream(parts, SIZE, 29, seed=1), batch_size=None)]
    assert sizes == [30]
    sizes = [len(b.records) for b in DataLoader(PhotoStream(parts, SIZE, 7, seed=1), batch_size=None)]
    assert sizes == [7, 7, 7, 7, 2]
