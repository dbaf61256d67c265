"""Preprocess images for training: source folder -> destination folder at the training size. Never touches the
source. Center or focal-point crop, flipped copies, oversized images split into overlapping tiles, captions kept."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from app.errors import UserError
from app.fileio import atomic_write
from app.folders import FolderPolicy
from app.training.dataset import IMAGE_SUFFIXES, to_rgb

CROPS = ("center", "auto", "none")


@dataclass
class PreprocessOptions:
    src: str
    dst: str
    width: int = 512
    height: int = 512
    crop: str = "center"  # center | auto (focal point by edge energy) | none (resize, may distort)
    flip: bool = False
    split: bool = False
    split_threshold: float = 0.5  # split when the image is this much longer than the target's aspect allows
    overlap_ratio: float = 0.2
    keep_captions: bool = True


@dataclass
class PreprocessResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _validate(o: PreprocessOptions, folders: FolderPolicy | None) -> tuple[Path, Path]:
    if not o.src:
        raise UserError("Source directory is empty: give the folder that holds your images.")
    if not o.dst:
        raise UserError("Destination directory is empty: give a folder for the processed images.")
    if folders is not None:
        # Before looking at the disk: a confined server does not say whether a folder outside exists.
        folders.check(o.src, "Source directory")
        folders.check(o.dst, "Destination directory")
    if not Path(o.src).is_dir():
        raise UserError(f"Source directory '{o.src}' does not exist or is not a folder.")
    src, dst = Path(o.src).resolve(), Path(o.dst).resolve()
    if src == dst or src in dst.parents:
        raise UserError("The destination must be outside the source directory: the source is never modified.")
    for label, value, key in (("Width", o.width, "process_width"), ("Height", o.height, "process_height")):
        if not 64 <= int(value) <= 2048 or int(value) % 8:
            raise UserError(f"{label} must be a multiple of 8 between 64 and 2048, got {value}.", key)
    if o.crop not in CROPS:
        raise UserError(f"Crop must be one of {', '.join(CROPS)}.")
    if not 0 <= o.split_threshold <= 10:
        raise UserError(
            f"Split threshold must be between 0 and 10, got {o.split_threshold}.", "process_split_threshold"
        )
    if not 0 <= o.overlap_ratio < 0.9:
        raise UserError(
            f"Overlap ratio must be at least 0 and below 0.9, got {o.overlap_ratio}.", "process_overlap_ratio"
        )
    return src, dst


def focal_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The crop of the target aspect with the most edge detail (a cheap stand-in for a subject detector)."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    edges = np.asarray(resized.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    if resized.width > width:
        energy = np.convolve(edges.sum(axis=0), np.ones(width), mode="valid")
        left, top = int(np.argmax(energy)), 0
    else:
        energy = np.convolve(edges.sum(axis=1), np.ones(height), mode="valid")
        left, top = 0, int(np.argmax(energy))
    return resized.crop((left, top, left + width, top + height))


def split_tiles(image: Image.Image, width: int, height: int, threshold: float, overlap: float) -> list[Image.Image]:
    """Overlapping tiles along the long side when the image is much longer than the target aspect."""
    scale = max(width / image.width, height / image.height)
    w, h = round(image.width * scale), round(image.height * scale)
    along_x = w / width >= h / height
    ratio = (w / width) if along_x else (h / height)
    if ratio <= 1 + threshold:
        return [image]
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    tile, length = (width, w) if along_x else (height, h)
    stride = tile * (1 - overlap)
    count = max(2, math.ceil((length - tile) / stride) + 1)
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    if along_x:
        return [resized.crop((s, 0, s + width, height)) for s in starts]
    return [resized.crop((0, s, width, s + height)) for s in starts]


def shape(image: Image.Image, width: int, height: int, crop: str) -> Image.Image:
    if crop == "center":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if crop == "auto":
        return focal_crop(image, width, height)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def preprocess(
    o: PreprocessOptions,
    progress: Callable[[int, int], None] | None = None,
    folders: FolderPolicy | None = None,
) -> PreprocessResult:
    """Write the processed images; `folders` (the server's FolderPolicy) decides which folders may be named."""
    src, dst = _validate(o, folders)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"Source directory {src} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    result = PreprocessResult()
    for index, path in enumerate(files):
        try:
            with Image.open(path) as raw:
                raw.load()
                image = to_rgb(raw)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            result.skipped.append(f"{path.name}: {e}")
            continue
        caption = path.with_suffix(".txt")
        parts = split_tiles(image, o.width, o.height, o.split_threshold, o.overlap_ratio) if o.split else [image]
        for sub, part in enumerate(parts):
            out = shape(part, o.width, o.height, o.crop)
            variants = [("", out)] + ([("-flipped", ImageOps.mirror(out))] if o.flip else [])
            for suffix, variant in variants:
                target = dst / f"{index:05d}-{sub}-{path.stem}{suffix}.png"
                atomic_write(target, lambda tmp, v=variant: v.save(tmp, format="PNG"))
                if o.keep_captions and caption.is_file():
                    shutil.copyfile(caption, target.with_suffix(".txt"))
                result.written.append(target)
        if progress:
            progress(index + 1, len(files))
    return result
