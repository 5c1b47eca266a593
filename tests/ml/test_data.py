from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ml import abid
from ml import data as mldata


def _jpeg(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save_args)
    return buffer.getvalue()


def test_decode_image_honours_exif_orientation() -> None:
    # A tall image stored sideways: orientation 6 says "rotate 90° clockwise to display".
    upright = Image.new("RGB", (40, 80), "white")
    upright.paste((255, 0, 0), (0, 0, 40, 20))  # red band on top when displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera would write, sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = mldata.decode_image(_jpeg(stored, exif=exif.tobytes(), quality=95), 32)
    top, bottom = decoded[:, :6].float().mean(dim=(1, 2)), decoded[:, -6:].float().mean(dim=(1, 2))
    assert top[0] > 200 and top[1] < 80, "the red band should be on top after applying EXIF orientation"
    assert bottom.min() > 200


def test_decode_image_squashes_any_size_to_the_model_square() -> None:
    assert mldata.decode_image(_jpeg(Image.new("RGB", (640, 300), "gray")), 48).shape == (3, 48, 48)


@pytest.mark.parametrize("body", [b"", b"not an image", _jpeg(Image.new("RGB", (20, 20)))[:100]])
def test_decode_image_rejects_what_is_not_a_decodable_image(body: bytes) -> None:
    with pytest.raises(mldata.ImageError):
        mldata.decode_image(body, 32)


def test_load_images_skips_and_reports_corrupt_and_missing_images(sample_dir: Path, tmp_path: Path) -> None:
    records, _ = abid.scan_folder(sample_dir)
    chosen = records[:5]
    abid.materialize_channel(chosen, sample_dir, tmp_path)
    (tmp_path / chosen[1].image_key).write_bytes(b"\xff\xd8 truncated jpeg")
    (tmp_path / chosen[3].image_key).unlink()
    cached = mldata.load_images(tmp_path, 32)
    assert [r.image_id for r in cached.records] == [chosen[i].image_id for i in (0, 2, 4)]
    assert cached.images.shape == (3, 3, 32, 32) and cached.images.dtype == torch.uint8
    reasons = {r.image_id: r.reason for r in cached.rejected}
    assert set(reasons) == {chosen[1].image_id, chosen[3].image_id}
    assert "not a decodable image" in reasons[chosen[1].image_id]
    assert "missing" in reasons[chosen[3].image_id]


def test_count_class_maps_large_counts_to_the_overflow_class() -> None:
    assert [mldata.count_class(q, 5, True) for q in (0, 3, 5, 6, 40)] == [0, 3, 5, 6, 6]
    assert mldata.count_class(6, 5, False) is None


def test_dihedral_gives_eight_distinct_symmetries() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    variants = {tuple(mldata.dihedral(image, k).flatten().tolist()) for k in range(8)}
    assert len(variants) == 8


def test_augment_is_reproducible_from_the_generator() -> None:
    images = torch.randn(6, 3, 8, 8)
    first = mldata.augment(images, torch.Generator().manual_seed(3))
    again = mldata.augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not torch.equal(first, images)


def test_split_writes_disjoint_stratified_channels_deterministically(sample_dir: Path, tmp_path: Path) -> None:
    summary = mldata.write_split(sample_dir, tmp_path / "a", min_count=1, max_count=5)
    mldata.write_split(sample_dir, tmp_path / "b", min_count=1, max_count=5)
    ids = {}
    for name in abid.SPLITS:
        records, rejected = abid.scan_folder(tmp_path / "a" / name)
        assert not rejected
        ids[name] = {r.image_id for r in records}
        assert all(1 <= r.quantity <= 5 for r in records)
        assert (tmp_path / "a" / name / "records.jsonl").read_text() == (
            tmp_path / "b" / name / "records.jsonl"
        ).read_text()
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert summary["sizes"] == {name: len(ids[name]) for name in abid.SPLITS}
    # Stratified: every count class present in the selection shows up in validation.
    assert set(summary["counts"]["validation"]) == set(summary["counts"]["train"])
    assert json.loads((tmp_path / "a" / "split.json").read_text())["sizes"] == summary["sizes"]
    # The held-out ids are listed, so a model's never-seen photos can be found without the source copy.
    for name in ("validation", "test"):
        listed = (tmp_path / "a" / name / "records.jsonl").read_text()
        assert sorted(summary["ids"][name]) == sorted(json.loads(line)["image_id"] for line in listed.splitlines())


def test_split_by_abid_list_keeps_only_listed_ids(sample_dir: Path, tmp_path: Path) -> None:
    records, _ = abid.scan_folder(sample_dir)
    listed = records[:30]
    document = {str(q): [f"data/metadata/{r.image_id}.json" for r in listed if r.quantity == q] for q in range(1, 6)}
    list_file = tmp_path / "file_list.json"
    list_file.write_text(json.dumps(document))
    summary = mldata.write_split(sample_dir, tmp_path / "out", list_file=list_file, min_count=1, max_count=5)
    expected = sum(1 for r in listed if 1 <= r.quantity <= 5)
    assert sum(summary["sizes"].values()) == expected


def test_fetch_s3_prefix_lays_out_an_abid_folder(sample_dir: Path, tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto import mock_aws

    records, _ = abid.scan_folder(sample_dir)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        for record in records[:3]:
            for key in (record.image_key, record.metadata_key):
                s3.put_object(Bucket="data", Key=f"raw/{key}", Body=(sample_dir / key).read_bytes())
        s3.put_object(Bucket="data", Key="raw/unrelated.txt", Body=b"x")
        folder = mldata.fetch_s3_prefix("s3://data/raw", tmp_path / "channel")
    found, rejected = abid.scan_folder(folder)
    assert [r.image_id for r in found] == [r.image_id for r in records[:3]] and not rejected
    assert not (folder / "unrelated.txt").exists()
    shutil.rmtree(folder)
