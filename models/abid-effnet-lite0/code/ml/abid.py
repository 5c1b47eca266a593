"""Amazon Bin Image Dataset records, selection, splits and manifests.

Pure standard library on purpose: the ingest Lambdas import this module as well as the trainer, so the
record format and the split are one code path in the cloud and on a laptop.

Layout of an ABID folder or S3 prefix (the public bucket's own)::

    bin-images/<image_id>.jpg
    metadata/<image_id>.json     {"EXPECTED_QUANTITY": 5, "BIN_FCSKU_DATA": {<asin>: {...}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_DIR = "bin-images"
METADATA_DIR = "metadata"
RECORDS_FILE = "records.jsonl"
SPLITS = ("train", "validation", "test")


class InvalidRecord(ValueError):
    """Metadata that cannot become a training record; the message is the reason kept in reports."""


@dataclass(frozen=True, order=True)
class AbidRecord:
    image_id: str
    quantity: int
    # Distinct products in the bin; None where the metadata has no product list (unknown, not zero).
    n_asins: int | None

    @property
    def image_key(self) -> str:
        return f"{IMAGE_DIR}/{self.image_id}.jpg"

    @property
    def metadata_key(self) -> str:
        return f"{METADATA_DIR}/{self.image_id}.json"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> AbidRecord:
        data = json.loads(line)
        return cls(image_id=str(data["image_id"]), quantity=int(data["quantity"]),
                   n_asins=optional_int(data.get("n_asins")))


# Bounds on one metadata document, so a hostile one is rejected alone instead of failing the batch or shard that
# holds it: ABID's documents are a few KB with three levels of nesting and counts in the tens.
MAX_METADATA_BYTES = 256 * 1024
MAX_METADATA_DEPTH = 16
MAX_INTEGER_DIGITS = 18  # below 2**63: what the trainer's int64 labels hold
MAX_EXPECTED_QUANTITY = 10_000  # far above any bin; the model's classes stop long before
# ABID's photos are tens to hundreds of KB; ingest and pack refuse a photo above this (reading at most this much
# of it), so one oversized object fails alone and cannot fill a packer's memory (32 reads run at once).
MAX_PHOTO_BYTES = 8 * 1024 * 1024


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InvalidRecord(f"metadata holds a {len(text)}-digit number (at most {MAX_INTEGER_DIGITS} digits)")
    return int(text)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed document, stopping once past ``limit``."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def parse_metadata(image_id: str, raw: bytes | str) -> AbidRecord:
    """Read one ``metadata/<id>.json`` document; raise :class:`InvalidRecord` saying what is wrong.

    Bounded before and while parsing: its size, the digits of any integer (Python refuses above 4,300 with a
    ValueError that is no JSON error), its depth (a deep one raises RecursionError) and EXPECTED_QUANTITY."""
    if len(raw) > MAX_METADATA_BYTES:
        raise InvalidRecord(f"metadata is {len(raw)} bytes, above the {MAX_METADATA_BYTES} a document may have")
    try:
        document = json.loads(raw, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRecord(f"metadata is not valid JSON: {error}") from None
    except InvalidRecord:
        raise
    except (RecursionError, ValueError) as error:
        raise InvalidRecord(f"metadata cannot be read: {type(error).__name__}: {str(error)[:200]}") from None
    if _depth(document, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise InvalidRecord(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
    if not isinstance(document, dict):
        raise InvalidRecord("metadata is not a JSON object")
    quantity = document.get("EXPECTED_QUANTITY")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        raise InvalidRecord(f"EXPECTED_QUANTITY is missing or not a non-negative integer: {quantity!r}")
    if quantity > MAX_EXPECTED_QUANTITY:
        raise InvalidRecord(f"EXPECTED_QUANTITY {quantity} is above {MAX_EXPECTED_QUANTITY}, more than a bin holds")
    products = document.get("BIN_FCSKU_DATA")
    if products is None:
        # Some republished copies kept EXPECTED_QUANTITY only: the number of distinct products is unknown,
        # except in an empty bin. Teaching "0 products" for these would be teaching a falsehood.
        return AbidRecord(image_id=image_id, quantity=quantity, n_asins=0 if quantity == 0 else None)
    if not isinstance(products, dict):
        raise InvalidRecord("BIN_FCSKU_DATA is not an object")
    return AbidRecord(image_id=image_id, quantity=quantity, n_asins=len(products))


def optional_int(value: object) -> int | None:
    """``n_asins`` as records carry it: an integer, or None/absent for an unknown product list."""
    return None if value is None or value == "" else int(value)  # type: ignore[arg-type]


def image_id_from_key(key: str) -> str:
    """``bin-images/01000.jpg`` or ``data/metadata/01000.json`` -> ``01000``."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


# --- selection ------------------------------------------------------------------------------------------


def ids_from_file_list(file_list: dict[str, list[str]]) -> dict[str, int]:
    """The classic 10,441-image list (``{"1": ["data/metadata/100313.json", ...], ...}``) -> id: count."""
    return {image_id_from_key(path): int(label) for label, paths in file_list.items() for path in paths}


def ids_from_challenge(pairs: Iterable[tuple[int, int] | list[int]]) -> dict[str, int]:
    """ABID counting-challenge pairs ``[index, quantity]``; the index is the image id minus one."""
    return {f"{int(index) + 1:05d}": int(quantity) for index, quantity in pairs}


def in_count_range(records: Iterable[AbidRecord], min_count: int, max_count: int) -> list[AbidRecord]:
    return [record for record in records if min_count <= record.quantity <= max_count]


# Ids are used to build S3 keys and local paths, so anything that could climb out of a prefix is refused.
_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_image_id(value: str) -> bool:
    return bool(_IMAGE_ID.fullmatch(value))


def parse_id_list(text: str) -> list[str]:
    """Image ids from a user-supplied list, in its order, first occurrence kept.

    Accepts what people already have: one id or key per line (``01046``, ``bin-images/01046.jpg``,
    ``metadata/01046.json``, a CSV whose first column is that, with or without an ``image_id`` header),
    a JSON array of ids or keys, a SageMaker ManifestFile (``[{"prefix": ...}, "bin-images/01046.jpg", ...]``)
    or records JSON lines (``{"image_id": "01046", ...}``). Raises ``ValueError`` naming the first bad entry.
    """
    stripped = text.strip()
    entries: list[str] = []
    if stripped.startswith("["):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ValueError(f"the list looks like JSON but does not parse: {error}") from None
        if not isinstance(document, list):
            raise ValueError("the list looks like JSON but is not an array of ids, keys or records")
        for number, entry in enumerate(document, start=1):
            if isinstance(entry, dict) and "prefix" in entry:
                continue
            if isinstance(entry, dict):
                entry = entry.get("image_id")
            # None ("[null]") or a record without image_id must not become the id "None"; nor may a bool or list.
            if not isinstance(entry, str | int) or isinstance(entry, bool):
                raise ValueError(f"entry {number} is not an id, a key or a record with an image_id: "
                                 f"{json.dumps(document[number - 1])[:80]}")
            entries.append(str(entry))
    else:
        for number, line in enumerate(stripped.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    image_id = json.loads(line)["image_id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    image_id = None
                if not isinstance(image_id, str | int) or isinstance(image_id, bool):
                    raise ValueError(f"line {number} is not a record with an image_id: {line[:80]!r}")
                entries.append(str(image_id))
                continue
            first = line.split(",", 1)[0].strip().strip('"')
            if number == 1 and first.lower() in {"image_id", "imageid", "id", "key"}:
                continue
            entries.append(first)
    ids: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        image_id = image_id_from_key(entry)
        if not is_image_id(image_id):
            raise ValueError(f"{entry[:80]!r} is not an ABID image id or key")
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


# --- split ----------------------------------------------------------------------------------------------


def hash_rank(image_id: str, seed: str) -> str:
    """A stable, order-free rank for an image: the same for the same (seed, id) on every machine and run."""
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def stratified_split(
    records: Iterable[AbidRecord],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: str = "invmon",
) -> dict[str, list[AbidRecord]]:
    """Split per count class, ordering each class by a hash of (seed, image id).

    The hash makes an image's split independent of which other images were selected or in what order
    they were listed, so a rerun over more data keeps every earlier test image in the test split.
    """
    by_class: dict[int, list[AbidRecord]] = defaultdict(list)
    for record in records:
        by_class[record.quantity].append(record)
    split: dict[str, list[AbidRecord]] = {name: [] for name in SPLITS}
    for quantity in sorted(by_class):
        ranked = sorted(by_class[quantity], key=lambda r: hash_rank(r.image_id, seed))
        n_test = round(len(ranked) * test_fraction)
        n_validation = round(len(ranked) * validation_fraction)
        split["test"] += ranked[:n_test]
        split["validation"] += ranked[n_test : n_test + n_validation]
        split["train"] += ranked[n_test + n_validation :]
    return {name: sorted(part) for name, part in split.items()}


# --- manifests ------------------------------------------------------------------------------------------


def records_jsonl(records: Iterable[AbidRecord]) -> str:
    return "".join(record.to_json() + "\n" for record in records)


def parse_records_jsonl(text: str) -> list[AbidRecord]:
    return [AbidRecord.from_json(line) for line in text.splitlines() if line.strip()]


def sagemaker_manifest(records: Iterable[AbidRecord], s3_prefix: str) -> list:
    """A SageMaker ``ManifestFile`` channel: the listed keys land in the channel folder in ABID layout.

    With this, every channel a training job sees is an ordinary ABID folder holding only its split.
    """
    prefix = s3_prefix if s3_prefix.endswith("/") else s3_prefix + "/"
    keys: list[str] = []
    for record in records:
        keys += [record.image_key, record.metadata_key]
    return [{"prefix": prefix}, *keys]


# --- local folders --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    image_id: str
    reason: str


def scan_folder(root: Path) -> tuple[list[AbidRecord], list[Rejected]]:
    """Every record of an ABID folder; a channel's ``records.jsonl``, where present, limits the set.

    Missing images and unreadable metadata are returned as rejects, never raised, so one bad file cannot
    stop a run over thousands.
    """
    root = Path(root)
    listed = root / RECORDS_FILE
    records: list[AbidRecord] = []
    rejected: list[Rejected] = []
    if listed.exists():
        candidates: Iterator[tuple[str, AbidRecord | None]] = (
            (r.image_id, r) for r in parse_records_jsonl(listed.read_text())
        )
    else:
        candidates = ((path.stem, None) for path in sorted((root / METADATA_DIR).glob("*.json")))
    for image_id, known in candidates:
        record = known
        if record is None:
            try:
                record = parse_metadata(image_id, (root / METADATA_DIR / f"{image_id}.json").read_bytes())
            except (OSError, InvalidRecord) as error:
                rejected.append(Rejected(image_id, str(error)))
                continue
        if not (root / record.image_key).is_file():
            rejected.append(Rejected(image_id, f"image {record.image_key} is missing"))
            continue
        records.append(record)
    return records, rejected


def materialize_channel(records: Iterable[AbidRecord], source: Path, channel: Path) -> int:
    """Lay out a local channel folder the way SageMaker's ManifestFile download does; returns the count."""
    count = 0
    for sub in (IMAGE_DIR, METADATA_DIR):
        (channel / sub).mkdir(parents=True, exist_ok=True)
    chosen = list(records)
    for record in chosen:
        for key in (record.image_key, record.metadata_key):
            shutil.copyfile(source / key, channel / key)
        count += 1
    (channel / RECORDS_FILE).write_text(records_jsonl(chosen))
    return count
