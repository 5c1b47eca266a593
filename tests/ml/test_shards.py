"""The shard format: WebDataset's tar convention, deterministic bytes, samples read back whole."""

from __future__ import annotations

import io
import tarfile

import pytest

from ml import shards
from ml.shards import Sample


def _samples() -> list[Sample]:
    return [Sample("00012", b"\xff\xd8photo-12", b'{"EXPECTED_QUANTITY": 3}'),
            Sample("00007", b"\xff\xd8photo-7", b'{"EXPECTED_QUANTITY": 0}')]


def test_a_shard_reads_back_the_same_samples_in_the_same_order() -> None:
    data = shards.pack(_samples())
    assert list(shards.read_shard(io.BytesIO(data))) == _samples()


def test_the_same_samples_always_pack_to_the_same_bytes() -> None:
    assert shards.digest(shards.pack(_samples())) == shards.digest(shards.pack(_samples()))


def test_members_follow_the_webdataset_key_dot_extension_convention() -> None:
    with tarfile.open(fileobj=io.BytesIO(shards.pack(_samples()))) as tar:
        names = tar.getnames()
        assert names == ["00012.jpg", "00012.json", "00007.jpg", "00007.json"]
        assert {member.mtime for member in tar.getmembers()} == {0}


def test_a_sample_missing_a_member_is_yielded_with_the_reason_instead_of_dropped() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("00099.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (sample,) = shards.read_shard(io.BytesIO(buffer.getvalue()))
    assert sample.key == "00099" and sample.metadata is None
    assert sample.missing() == "the shard has no 00099.json"


@pytest.mark.parametrize("key", ["", "a.b", "dir/00001"])
def test_a_key_that_would_break_the_grouping_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="plain name"):
        shards.pack([Sample(key, b"x", b"{}")])


def test_a_channel_with_tar_files_is_a_shard_channel(tmp_path) -> None:
    assert not shards.is_shard_channel(tmp_path)
    (tmp_path / shards.shard_name("train", 1)).write_bytes(shards.pack(_samples()))
    (tmp_path / shards.shard_name("train", 0)).write_bytes(shards.pack(_samples()[:1]))
    assert [p.name for p in shards.shard_files(tmp_path)] == ["train-000000.tar", "train-000001.tar"]
    assert shards.is_shard_channel(tmp_path)


def test_pack_folder_packs_a_folder_in_image_id_order_and_returns_what_it_could_not_pack(sample_dir, tmp_path) -> None:
    from ml import abid

    records, _ = abid.scan_folder(sample_dir)
    folder = tmp_path / "folder"
    abid.materialize_channel(records[:5], sample_dir, folder)
    (folder / records[2].image_key).unlink()  # a photo gone missing
    written, rejected = shards.pack_folder(folder, tmp_path / "out", "validation", photos_per_shard=3)
    assert [p.name for p in written] == ["validation-000000.tar", "validation-000001.tar"]
    keys = [s.key for path in written for s in shards.read_shard(path.open("rb"))]
    assert keys == sorted(r.image_id for r in records[:5] if r != records[2])
    assert [r.image_id for r in rejected] == [records[2].image_id]
    assert "missing" in rejected[0].reason
    assert [key for key, _ in shards.read_metadata(written[0])] == keys[:3]


# --- damaged shards: an error naming the shard and the member, never a silent drop ----------------------------

SIX = [Sample(f"{i:05d}", b"\xff\xd8photo" * 50, b'{"EXPECTED_QUANTITY": 1}') for i in range(6)]


def member_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info.offset for info in tar.getmembers()}


def test_a_corrupt_header_mid_shard_is_an_error_naming_the_shard_and_the_member_before_it() -> None:
    data = bytearray(shards.pack(SIX))
    offset = member_offsets(bytes(data))["00002.jpg"]
    data[offset + 148 : offset + 156] = b"garbage!"  # the header's checksum field
    read = []
    with pytest.raises(shards.ShardError, match=r"train-000003.tar: corrupt tar header after member 00001.json"):
        for sample in shards.read_shard(io.BytesIO(bytes(data)), "train-000003.tar"):
            read.append(sample.key)
    assert read == ["00000"]  # what came before the damage; 00001 is held back until its group ends


def test_a_truncated_member_is_an_error_naming_it() -> None:
    data = shards.pack(SIX)
    offset = member_offsets(data)["00005.jpg"]
    with pytest.raises(shards.ShardError, match=r"s.tar: member 00005.jpg is truncated"):
        list(shards.read_shard(io.BytesIO(data[: offset + 512 + 100]), "s.tar"))


def test_a_shard_cut_at_a_member_boundary_is_an_error_not_a_shorter_shard(tmp_path) -> None:
    data = shards.pack(SIX)
    offset = member_offsets(data)["00004.jpg"]
    with pytest.raises(shards.ShardError, match=r"s.tar: truncated after member 00003.json"):
        list(shards.read_shard(io.BytesIO(data[:offset]), "s.tar"))
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(data[:offset])
    with pytest.raises(shards.ShardError, match=r"train-000000.tar: truncated after member 00003.json"):
        list(shards.read_metadata(cut))


def test_a_duplicate_key_in_a_shard_is_refused() -> None:
    data = shards.pack([SIX[0], SIX[1], SIX[0]])
    with pytest.raises(shards.ShardError, match=r"s\.tar: duplicate key 00000"):
        list(shards.read_shard(io.BytesIO(data), "s.tar"))


def test_a_shards_keys_are_listed_from_its_headers_and_a_damaged_one_lists_up_to_the_damage(tmp_path) -> None:
    whole = tmp_path / "whole.tar"
    whole.write_bytes(shards.pack(SIX))
    assert shards.shard_keys(whole) == {s.key for s in SIX}
    data = bytearray(shards.pack(SIX))
    offset = member_offsets(bytes(data))["00002.jpg"]
    data[offset + 148 : offset + 156] = b"garbage!"
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    assert shards.shard_keys(damaged) == {"00000", "00001"}  # read_shard reports the damage itself


def test_an_intact_shard_reads_whole_through_the_checked_reader() -> None:
    assert [s.key for s in shards.read_shard(io.BytesIO(shards.pack(SIX)), "s.tar")] == [s.key for s in SIX]
