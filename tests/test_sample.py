"""The shipped ABID sample and the shared record/split code that every layer reads it with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from ml.abid import (
    AbidRecord,
    InvalidRecord,
    ids_from_challenge,
    ids_from_file_list,
    parse_metadata,
    parse_records_jsonl,
    records_jsonl,
    sagemaker_manifest,
    scan_folder,
    stratified_split,
)


def test_sample_is_small_credited_and_every_photo_decodes(sample_dir: Path):
    images = sorted((sample_dir / "bin-images").glob("*.jpg"))
    assert 200 <= len(images) <= 300
    assert sum(path.stat().st_size for path in sample_dir.rglob("*")) < 5 * 1024 * 1024
    assert "Amazon Bin Image Dataset" in (sample_dir / "README.md").read_text()
    for path in images:
        with Image.open(path) as image:
            image.verify()


def test_sample_labels_agree_with_the_metadata(sample_dir: Path):
    records, rejected = scan_folder(sample_dir)
    assert rejected == []
    with open(sample_dir / "labels.csv") as handle:
        labels = {row["image_id"]: int(row["expected_quantity"]) for row in csv.DictReader(handle)}
    assert {record.image_id: record.quantity for record in records} == labels
    # Ids below 01000 are kept for independent scoring and must never be shipped.
    assert min(labels) >= "01000"


def test_parse_metadata_reads_quantity_and_distinct_products(sample_dir: Path):
    raw = (sample_dir / "metadata" / "01046.json").read_bytes()
    record = parse_metadata("01046", raw)
    document = json.loads(raw)
    assert record.quantity == document["EXPECTED_QUANTITY"]
    assert record.n_asins == len(document["BIN_FCSKU_DATA"])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"BIN_FCSKU_DATA": {}}', "EXPECTED_QUANTITY is missing"),
        (b'{"EXPECTED_QUANTITY": -1}', "EXPECTED_QUANTITY is missing or not a non-negative integer"),
        (b'{"EXPECTED_QUANTITY": "3"}', "not a non-negative integer"),
    ],
)
def test_bad_metadata_is_refused_with_its_reason(raw: bytes, reason: str):
    with pytest.raises(InvalidRecord, match=reason):
        parse_metadata("00001", raw)


def test_scan_folder_reports_missing_images_and_corrupt_metadata_instead_of_failing(tmp_path: Path, sample_dir: Path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "bin-images").mkdir()
    for image_id in ("01046", "01062"):
        (tmp_path / "metadata" / f"{image_id}.json").write_bytes(
            (sample_dir / "metadata" / f"{image_id}.json").read_bytes()
        )
    (tmp_path / "bin-images" / "01046.jpg").write_bytes((sample_dir / "bin-images" / "01046.jpg").read_bytes())
    (tmp_path / "metadata" / "09999.json").write_text("{truncated")
    records, rejected = scan_folder(tmp_path)
    assert [record.image_id for record in records] == ["01046"]
    reasons = {item.image_id: item.reason for item in rejected}
    assert reasons["01062"] == "image bin-images/01062.jpg is missing"
    assert "not valid JSON" in reasons["09999"]


def test_split_is_stratified_deterministic_and_stable_when_data_grows(sample_dir: Path):
    records, _ = scan_folder(sample_dir)
    split = stratified_split(records, validation_fraction=0.2, test_fraction=0.2)
    assert split == stratified_split(list(reversed(records)), validation_fraction=0.2, test_fraction=0.2)
    assert sum(map(len, split.values())) == len(records)
    for quantity in range(6):  # the classes with 20-40 photos each; rarer counts round to 0 or 1 test photos
        in_class = [r for r in records if r.quantity == quantity]
        test_share = sum(1 for r in split["test"] if r.quantity == quantity) / len(in_class)
        assert test_share == pytest.approx(0.2, abs=0.05)
    # More data later must not move an image that was in the test split out of it.
    extra = [AbidRecord(image_id=f"2{i:04d}", quantity=i % 6, n_asins=1) for i in range(500)]
    grown = stratified_split(records + extra, validation_fraction=0.2, test_fraction=0.2)
    moved = set(r.image_id for r in split["test"]) - set(r.image_id for r in grown["test"])
    assert len(moved) <= len(split["test"]) * 0.1


def test_manifests_round_trip_and_point_at_both_files_of_a_record():
    records = [AbidRecord("01000", 5, 2), AbidRecord("01001", 6, 3)]
    assert parse_records_jsonl(records_jsonl(records)) == records
    assert sagemaker_manifest(records, "s3://bucket/raw") == [
        {"prefix": "s3://bucket/raw/"},
        "bin-images/01000.jpg",
        "metadata/01000.json",
        "bin-images/01001.jpg",
        "metadata/01001.json",
    ]


def test_public_lists_map_to_image_ids():
    assert ids_from_file_list({"3": ["data/metadata/100313.json", "data/metadata/09915.json"]}) == {
        "100313": 3,
        "09915": 3,
    }
    # The challenge split stores index = image id - 1.
    assert ids_from_challenge([[0, 2], [1233, 5]]) == {"00001": 2, "01234": 5}


def test_shared_copy_has_the_documented_size(shared_abid: Path):
    # 8,998 photos with ids 01000-09999 plus 3,040 republished originals (../shared/abid/README.md).
    records, rejected = scan_folder(shared_abid)
    assert len(records) == 12038
    assert rejected == []
    # 634 of the new photos carry EXPECTED_QUANTITY only: their number of distinct products is unknown.
    unknown = [r for r in records if r.n_asins is None]
    assert len(unknown) == 634
    assert min(int(r.image_id) for r in unknown) >= 10004


def test_metadata_without_a_product_list_has_an_unknown_not_zero_product_count():
    assert parse_metadata("10004", b'{"EXPECTED_QUANTITY": 5}').n_asins is None
    assert parse_metadata("10005", b'{"EXPECTED_QUANTITY": 0}').n_asins == 0
    assert parse_metadata("10006", b'{"EXPECTED_QUANTITY": 2, "BIN_FCSKU_DATA": {}}').n_asins == 0
    unknown = AbidRecord("10004", 5, None)
    assert parse_records_jsonl(records_jsonl([unknown])) == [unknown]
