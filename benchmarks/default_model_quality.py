"""Does the default model draw what the prompt says? Prompt adherence of shapes-64, measured.

For N random scenes of the base world (fixed seed), the full caption ("a small red circle on the left on a blue
background") is the prompt; each generated image is read by the fixed detector of `app/shapes/detect.py`
(background, colour, count, shape, position) and compared with the caption. Baseline, in the same run: real
renders of the same scenes, the detector's ceiling; and per model, the renders sent through its VAE and back, the
ceiling of what its UNet could draw through that VAE. Printed: the share of images right on each attribute, for the
model and the renders, and the ratio model / renders. `--model` more than once compares several model folders.

    .venv/bin/python benchmarks/default_model_quality.py [--n 96] [--model models/Stable-diffusion/shapes-64 ...]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.logs import quiet_libraries
from app.models.default_model import SHIPPED_MODEL
from app.shapes.detect import ATTRIBUTES, accuracy
from app.shapes.efficacy import GEN, generate_images, make_services
from app.shapes.round_trip import vae_round_trip
from app.shapes.scenes import caption, render, sample_scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="scenes (prompts)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--model", type=Path, action="append", help="diffusers folder(s); default: the shipped model")
    args = p.parse_args()
    quiet_libraries()
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.n)]
    prompts = [caption(s) for s in scenes]
    columns = (*ATTRIBUTES, "all")
    print(f"{args.n} prompts, {GEN['steps']} steps {GEN['sampler_name']}, CFG {GEN['cfg_scale']}, 64x64")
    print(f"{'':36s}" + "".join(f"{c:>11s}" for c in columns))
    reference = accuracy(scenes, [render(s) for s in scenes])
    print(f"{'real renders (baseline)':36s}" + "".join(f"{reference[c]:11.3f}" for c in columns))
    for model in args.model or [SHIPPED_MODEL]:
        with tempfile.TemporaryDirectory() as tmp:
            services = make_services(Path(tmp), model)
            start = time.perf_counter()
            images = generate_images(services, prompts, seed=args.seed)
            seconds = (time.perf_counter() - start) / len(prompts)
            through_vae = accuracy(scenes, vae_round_trip(services.models.get().pipe.vae, scenes))
        got = accuracy(scenes, images)
        print(f"{'  renders through its VAE':36s}" + "".join(f"{through_vae[c]:11.3f}" for c in columns))
        label = f"{model.name} ({seconds:.2f} s/image)"
        print(f"{label:36s}" + "".join(f"{got[c]:11.3f}" for c in columns))
        ratio = {c: got[c] / reference[c] if reference[c] else float("nan") for c in columns}
        print(f"{'  ratio to renders':36s}" + "".join(f"{ratio[c]:11.3f}" for c in columns))


if __name__ == "__main__":
    main()
