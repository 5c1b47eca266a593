"""ABID images for training and evaluation: read, select, split, decode, cache, augment.

A channel is an ABID folder (``bin-images/``, ``metadata/``, optionally ``records.jsonl``), local or
under an S3 prefix. Images are decoded once into one uint8 tensor: on a CPU the JPEG decode would
otherwise cost as much as a frozen-backbone forward pass, every epoch.

``python -m ml.data split --source DIR --out DIR`` writes the deterministic stratified split as three
channel folders (train/, validation/, test/) plus ``split.json`` with the sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ml import abid
from ml.abid import AbidRecord, Rejected

# The pixel count above which an image is refused before it is decoded. Pillow's own limit only warns at
# MAX_IMAGE_PIXELS and raises at twice it (an 80 Mpx photo took 1.3 s and 1.66 GB to decode under a 40 Mpx
# setting), so the check is ours, on the header's width x height; Pillow's stays as a backstop. 25 Mpx holds
# any phone or warehouse camera photo (12-24 Mpx); ABID originals are well under 1 Mpx.
MAX_IMAGE_PIXELS = 25_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# The only Pillow plugins a body may reach: every other format (and the EPS plugin, which runs Ghostscript) is
# refused even when the sender calls it image/jpeg.
SERVED_FORMATS = ("JPEG", "PNG")
# Images Pillow could read but we do not serve, by their magic bytes (offset, bytes), named for the message.
_OTHER_IMAGES: tuple[tuple[int, bytes, str], ...] = (
    (8, b"WEBP", "WebP"), (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"), (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (0, b"\xffO\xffQ", "JPEG 2000"), (0, b"%!PS", "EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"), (4, b"ftypheic", "HEIC"), (4, b"ftypavif", "AVIF"), (0, b"8BPS", "PSD"),
)
# Pillow's messages name the stream object ("<_io.BytesIO object at 0x...>"): not for a caller's eyes.
_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def without_reprs(text: str) -> str:
    """A message without object reprs such as ``<_io.BytesIO object at 0x7f...>``."""
    return _REPR.sub("", text)


class ImageError(ValueError):
    """An image that cannot be decoded; the message says why and is kept in reports."""


class ImageTooLarge(ImageError):
    """More pixels than allowed: refused from the header, before any decoding."""


class UnsupportedImage(ImageError):
    """An image in a format we do not serve (only JPEG and PNG)."""


def _format_of(head: bytes) -> str | None:
    return next((name for offset, magic, name in _OTHER_IMAGES if head[offset : offset + len(magic)] == magic), None)


def decode(
    data: bytes | Path, size: int, *, draft: bool = False, min_side: int = 1, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, int]:
    """JPEG/PNG bytes or a file -> (uint8 tensor (3, size, size), the image's pixel count).

    EXIF orientation is applied. The photo is squashed to a square rather than cropped: cropping could cut
    objects out of the bin and change the very count the model must give. ``draft`` lets a JPEG larger than
    the model's input decode at a reduced scale (1/2, 1/4 or 1/8, never below ``size``) before the resize:
    several times faster for a camera photo, and the same answer (tests/ml/test_inference.py).
    """
    try:
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else Path(data)
        with Image.open(source, formats=SERVED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image is too large: {width}x{height} pixels ({width * height:,}); the limit "
                                    f"is {max_pixels:,}")
            if min(width, height) < min_side:
                raise ImageError(f"image is {width}x{height} pixels; a bin photo is at least {min_side} pixels "
                                 "on each side")
            if draft and image.format == "JPEG" and width > size and height > size:
                image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image is too large: {without_reprs(str(error))}") from None
    except UnidentifiedImageError:
        head = bytes(data[:32]) if isinstance(data, bytes | bytearray) else Path(data).read_bytes()[:32]
        name = _format_of(head)
        if name:
            raise UnsupportedImage(f"unsupported image format: {name}; only JPEG and PNG are counted") from None
        raise ImageError("not a decodable image: the bytes are not a JPEG or PNG image") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"not a decodable image: {without_reprs(str(error))}") from None
    return array.view(size, size, 3).permute(2, 0, 1).contiguous(), width * height


def decode_image(data: bytes | Path, size: int) -> torch.Tensor:
    """JPEG/PNG bytes or a file -> uint8 tensor (3, size, size), EXIF orientation applied: what training and
    evaluation decode. With the JPEG draft, as serving decodes: the model learns from the pixels it will be
    given, and at ABID's original sizes decoding is what a GPU waits on (a 500 px photo decoded 217-247 photos/s
    on one core at full scale and 476-518 with the draft, here). A photo under twice ``size`` a side, such as
    the 224 px copies in ../shared, decodes exactly as at full scale."""
    return decode(data, size, draft=True)[0]


def count_class(quantity: int, max_count: int, overflow: bool) -> int | None:
    """The class index of a count: 0..max_count, plus max_count+1 for "more" when ``overflow``."""
    if quantity <= max_count:
        return quantity
    return max_count + 1 if overflow else None


def select(
    records: Iterable[AbidRecord], min_count: int = 0, max_count: int | None = None
) -> list[AbidRecord]:
    return [r for r in records if r.quantity >= min_count and (max_count is None or r.quantity <= max_count)]


def select_by_list(records: Iterable[AbidRecord], list_file: Path) -> list[AbidRecord]:
    """Keep the records named by an ABID list (the 10,441 file list, or a counting-challenge split)."""
    document = json.loads(Path(list_file).read_text())
    wanted = abid.ids_from_file_list(document) if isinstance(document, dict) else abid.ids_from_challenge(document)
    return [r for r in records if r.image_id in wanted]


def fetch_s3_prefix(uri: str, destination: Path) -> Path:
    """Copy an ABID-layout S3 prefix (``s3://bucket/prefix``) to a local folder; returns the folder."""
    import boto3  # only this path needs AWS

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if relative.split("/", 1)[0] in (abid.IMAGE_DIR, abid.METADATA_DIR) or relative == abid.RECORDS_FILE:
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
    return destination


def resolve_data(location: str | Path) -> Path:
    """A local folder as is; an S3 prefix downloaded to a temporary folder."""
    if str(location).startswith("s3://"):
        return fetch_s3_prefix(str(location), Path(tempfile.mkdtemp(prefix="abid-")))
    return Path(location)


@dataclass
class CachedImages:
    """Decoded images of one channel: ``images[i]`` belongs to ``records[i]``."""

    records: list[AbidRecord]
    images: torch.Tensor  # (N, 3, S, S) uint8
    rejected: list[Rejected]

    @property
    def quantities(self) -> torch.Tensor:
        return torch.tensor([r.quantity for r in self.records], dtype=torch.long)


def load_images(
    root: Path, size: int, records: Sequence[AbidRecord] | None = None, *, progress: bool = False
) -> CachedImages:
    """Decode every usable image of a folder; corrupt or missing ones are rejected with their reason."""
    root = Path(root)
    rejected: list[Rejected] = []
    if records is None:
        records, rejected = abid.scan_folder(root)
    kept: list[AbidRecord] = []
    tensors: list[torch.Tensor] = []
    for index, record in enumerate(records):
        try:
            tensors.append(decode_image(root / record.image_key, size))
        except (ImageError, OSError) as error:
            rejected.append(Rejected(record.image_id, str(error)))
            continue
        kept.append(record)
        if progress and (index + 1) % 2000 == 0:
            print(f"decoded {index + 1}/{len(records)} images from {root}", flush=True)
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return CachedImages(kept, images, rejected)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, normalised the way the backbone was trained."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: a bin photo has no up, and mirrored bins are still bins."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def augment(images: torch.Tensor, generator: torch.Generator, jitter: float = 0.2) -> torch.Tensor:
    """Random dihedral symmetry per image plus brightness/contrast jitter; input normalised float.

    The random draws come from ``generator`` on the CPU wherever the images are, so a run draws the same
    augmentations on a GPU as on a CPU and a resumed run continues the same sequence."""
    n = images.shape[0]
    choice = torch.randint(0, 8, (n,), generator=generator).to(images.device)
    out = torch.empty_like(images)
    for k in range(8):
        chosen = (choice == k).nonzero(as_tuple=True)[0]
        if len(chosen):
            out[chosen] = dihedral(images[chosen], k)
    if jitter:
        contrast = (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter).to(images.device)
        brightness = ((torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter).to(images.device)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + brightness
    return out


# --- split command --------------------------------------------------------------------------------------


def write_split(
    source: Path,
    out: Path,
    *,
    min_count: int = 0,
    max_count: int | None = None,
    list_file: Path | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: str = "invmon",
) -> dict:
    records, rejected = abid.scan_folder(source)
    chosen = select_by_list(records, list_file) if list_file else records
    chosen = select(chosen, min_count, max_count)
    parts = abid.stratified_split(
        chosen, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed
    )
    for name, part in parts.items():
        abid.materialize_channel(part, source, out / name)
    summary = {
        "source": str(source),
        "seed": seed,
        "selection": {"min_count": min_count, "max_count": max_count, "list": str(list_file) if list_file else None},
        "fractions": {"validation": validation_fraction, "test": test_fraction},
        "sizes": {name: len(part) for name, part in parts.items()},
        "counts": {
            name: dict(sorted(Counter(r.quantity if r.quantity <= 5 else "6+" for r in part).items(), key=str))
            for name, part in parts.items()
        },
        "rejected": [{"image_id": r.image_id, "reason": r.reason} for r in rejected],
        # Which photos a model trained on this split never saw: the demo uploads only those, and a later copy
        # of ABID can be scored without them leaking into a comparison.
        "ids": {name: [r.image_id for r in part] for name, part in parts.items() if name != "train"},
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="write train/validation/test channel folders")
    split.add_argument("--source", required=True, help="ABID folder or s3:// prefix")
    split.add_argument("--out", type=Path, required=True)
    split.add_argument("--min-count", type=int, default=1, help="the classic task: 1-5 objects")
    split.add_argument("--max-count", type=int, default=5, help="-1: no upper limit")
    split.add_argument("--list", type=Path, default=None, help="an ABID list file (lists/*.json)")
    split.add_argument("--validation-fraction", type=float, default=0.1)
    split.add_argument("--test-fraction", type=float, default=0.1)
    split.add_argument("--seed", default="invmon")
    args = parser.parse_args(argv)
    summary = write_split(
        resolve_data(args.source),
        args.out,
        min_count=args.min_count,
        max_count=None if args.max_count < 0 else args.max_count,
        list_file=args.list,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    printed = {k: v for k, v in summary.items() if k not in ("rejected", "ids")}
    json.dump(printed | {"rejected": len(summary["rejected"])}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
