"""Training images: loading any image the user has, captions, and the per-image template choice."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import UserError
from app.training.buckets import bucket_sizes, nearest_bucket
from app.training.templates import fill

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_LEADING_NUMBER = re.compile(r"^[-\d]+\s*")
# kohya's dataset layout: subfolders named "<repeats>_<name>" (e.g. "10_sks dog"), each image used <repeats> times
# per epoch; <name> is the caption of images that have no caption file
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
REG_TEMPLATE = "[filewords]"  # a regularization image's prompt: its class caption, never the trained name


@dataclass
class TrainingImage:
    path: Path
    image: Image.Image  # RGB: the training size, its bucket's size, or its own size rounded to 8 ("do not resize")
    filewords: str
    template: str  # the template line picked for this image when the dataset was built
    alpha: Image.Image | None = None  # the image's alpha channel, cropped and resized like it (for use_weight)
    # SDXL's size conditioning: the (height, width) of the file before resizing, and the top-left corner of the crop
    # taken from it, in the trained image's pixels (as SDXL itself was trained).
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    repeats: int = 1  # times per epoch (kohya's "<repeats>_<name>" folders)
    # a regularization image (kohya's reg_data_dir, DreamBooth's prior preservation): trained on its own caption
    # alone, without the trained name, so the network keeps what the model already made of that class
    is_reg: bool = False
    # held out for the validation loss (kohya's validation_split): never trained on
    is_validation: bool = False

    def time_ids(self) -> list[float]:
        """SDXL's six size numbers: original (h, w), crop (top, left), target (h, w)."""
        target = (self.image.height, self.image.width)
        return [float(v) for v in (*(self.original_size or target), *self.crop_top_left, *target)]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: EXIF rotation applied, transparency over white, 16-bit and float scaled to 8-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The transparency of an image (EXIF rotation applied), or None when it has none."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.getchannel("A") if "A" in image.getbands() else None


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Center-crop to the target aspect ratio, then resize (no distortion)."""
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def crop_of_fit(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """Where `fit` crops an image of `size` (w, h): the (top, left) of the kept box, in output pixels."""
    w, h = size
    if w * height > h * width:  # wider than the target: the sides are cut
        kept_w, kept_h = h * width / height, h
    else:
        kept_w, kept_h = w, w * height / width
    scale = width / kept_w
    return round((h - kept_h) / 2 * scale), round((w - kept_w) / 2 * scale)


def round_to_8(image: Image.Image) -> Image.Image:
    w, h = image.width - image.width % 8, image.height - image.height % 8
    if w < 8 or h < 8:
        raise ValueError(f"{image.width}x{image.height} is too small")
    return ImageOps.fit(image, (w, h), Image.Resampling.LANCZOS) if (w, h) != image.size else image


def caption_for(path: Path, folder_caption: str = "") -> str:
    """The `<stem>.txt` beside the image (A1111; kohya's `.caption` too), else the name of its kohya folder
    (`folder_caption`), else the file name without a leading number (A1111)."""
    for suffix in (".txt", ".caption"):
        text_file = path.with_suffix(suffix)
        if text_file.is_file():
            return text_file.read_text(encoding="utf-8").strip()
    return folder_caption or _LEADING_NUMBER.sub("", path.stem)


def image_files(root: Path) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """(path, repeats, folder caption) of every image: those in `root` itself once each, and those in kohya's
    `<repeats>_<name>` subfolders <repeats> times each; and the names of the subfolders that were not read."""
    found: list[tuple[Path, int, str]] = []
    ignored: list[str] = []

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    found += [(p, 1, "") for p in images_in(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = KOHYA_FOLDER.match(sub.name)
        if match is None or int(match.group(1)) < 1:
            ignored.append(sub.name)
            continue
        found += [(p, int(match.group(1)), match.group(2).strip()) for p in images_in(sub)]
    return found, ignored


def load_dataset(
    folder: str | Path,
    width: int,
    height: int,
    templates: list[str],
    seed: int,
    varsize: bool = False,
    bucketing: bool = False,
    regularization: bool = False,
) -> tuple[list[TrainingImage], list[str]]:
    """All usable images in `folder` (sorted), and a warning line per file that could not be used. Each is cropped
    to the training size, kept at its own size (`varsize`), or cropped to its aspect-ratio bucket (`bucketing`).
    `regularization`: the folder holds regularization images (their prompt is their caption alone)."""
    what = "Regularization image directory" if regularization else "Dataset directory"
    root = Path(folder) if folder else None
    if root is None or not str(folder).strip():
        raise UserError(f"{what} is empty: give the folder that holds your training images.")
    if not root.is_dir():
        raise UserError(f"{what} {root} does not exist or is not a folder.")
    rng = random.Random(seed)
    buckets = bucket_sizes(width, height) if bucketing else None
    images: list[TrainingImage] = []
    problems: list[str] = []
    files, ignored = image_files(root)
    for path, repeats, folder_caption in files:
        name = path.name if path.parent == root else f"{path.parent.name}/{path.name}"
        try:
            with Image.open(path) as raw:
                raw.load()
                rgb = to_rgb(raw)
                alpha = alpha_channel(raw)
            original = rgb.size
            if varsize:
                rgb = round_to_8(rgb)
                crop = crop_of_fit(original, rgb.width, rgb.height)
            else:
                w, h = nearest_bucket(original, buckets) if buckets else (width, height)
                rgb, crop = fit(rgb, w, h), crop_of_fit(original, w, h)
            if alpha is not None:
                alpha = alpha.resize(rgb.size, Image.Resampling.BILINEAR) if varsize else fit(alpha, *rgb.size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            problems.append(f"{name}: {e}")
            continue
        caption = caption_for(path, folder_caption)
        template = REG_TEMPLATE if regularization else rng.choice(templates)
        images.append(
            TrainingImage(
                path, rgb, caption, template, alpha, (original[1], original[0]), crop, repeats, regularization
            )
        )
    for problem in problems:
        log.warning("Skipped %s image %s", "regularization" if regularization else "training", problem)
    if not images:
        detail = f" ({len(problems)} unreadable: {'; '.join(problems[:5])})" if problems else ""
        folders = (
            f" Subfolders are read only when named as kohya's are, <repeats>_<name> (e.g. 10_{ignored[0]}); "
            f"not read: {', '.join(ignored[:5])}."
            if ignored
            else ""
        )
        raise UserError(f"{what} {root} has no usable images{detail}. Supported: {', '.join(IMAGE_SUFFIXES)}.{folders}")
    return images, problems


def epoch_items(images: list[TrainingImage]) -> list[int]:
    """The image indices of one epoch: each training image `repeats` times (not those held out for validation),
    then as many regularization samples
    as there are training samples (kohya's balance: the regularization images with their repeats, in order, cycled
    when they are fewer and cut off when they are more), so prior preservation weighs as much as the subject."""
    train = [i for i, im in enumerate(images) if not im.is_reg and not im.is_validation for _ in range(im.repeats)]
    pool = [i for i, im in enumerate(images) if im.is_reg for _ in range(im.repeats)]
    return train + ([pool[k % len(pool)] for k in range(len(train))] if pool else [])


def prompt_for(
    item: TrainingImage,
    name: str,
    templates: list[str],
    rng: random.Random,
    shuffle_tags: bool,
    tag_drop_out: float,
    keep_tokens: int = 0,
    caption_dropout: float = 0.0,
) -> str:
    """The training prompt of one sample. With shuffle/drop-out a line and the tags are drawn per sample (A1111);
    the first `keep_tokens` tags (kohya: comma-separated "tokens", e.g. a trigger word) stay first and are never
    dropped. `caption_dropout` (kohya's `caption_dropout_rate`): the share of samples trained with an empty prompt,
    so the model also learns the images unconditioned (drawn only when set: without it no other draw moves)."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    if not shuffle_tags and not tag_drop_out:
        return fill(item.template, name, item.filewords)
    tags = item.filewords.split(",")
    kept, tags = tags[:keep_tokens], tags[keep_tokens:]
    if tag_drop_out:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    line = item.template if item.is_reg else rng.choice(templates)
    return fill(line, name, ",".join(kept + tags))
