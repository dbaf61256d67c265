"""Draw docs/images/shapes-64-prompts.png: what the shipped default model makes of a few prompts.

    .venv/bin/python scripts/docs_images.py

Each tile is one txt2img generation (Euler a, 20 steps, CFG 7, 64x64, fixed seeds) through the product's own
services, shown 3x with its prompt underneath.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.generation.txt2img import Txt2ImgParams  # noqa: E402
from app.logs import quiet_libraries  # noqa: E402
from app.models.default_model import SHIPPED_MODEL  # noqa: E402
from app.shapes.efficacy import GEN, make_services  # noqa: E402

PROMPTS = [
    "a red circle on a blue background",
    "two yellow triangles on a purple background",
    "a large white square on a green background",
    "a small blue circle on the left on a yellow background",
    "a green triangle at the top on a gray background",
    "two purple squares on a white background",
]
SCALE = 3
LABEL_HEIGHT = 44


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="a diffusers folder (default: shipped)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "shapes-64-prompts.png")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        services = make_services(Path(tmp), args.model)
        tile = 64 * SCALE
        sheet = Image.new("RGB", (tile * len(PROMPTS), tile + LABEL_HEIGHT), "white")
        draw = ImageDraw.Draw(sheet)
        for i, prompt in enumerate(PROMPTS):
            image = services.txt2img.generate(Txt2ImgParams(prompt=prompt, seed=100 + i, **GEN)).images[0]
            sheet.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (i * tile, 0))
            words = prompt.split(" ")
            half = (len(words) + 1) // 2
            for row, text in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
                draw.text((i * tile + 4, tile + 4 + 18 * row), text, fill="black")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
