"""Training efficacy vs. steps: does Textual Inversion / hypernetwork training learn, and how fast?

On the shipped shapes model, through the product's own training service (see app/shapes/efficacy.py), for several
step counts: the held-out denoising loss of the trained embedding / hypernetwork as a ratio to the baselines
measured in the same run (the initial embedding, a random embedding; the fresh hypernetwork, no hypernetwork), and
the concept share of generated images (orange share with the embedding vs. the init text "red"; dark-pixel share
with the outline hypernetwork vs. without). Later speed work can show "same quality in fewer seconds" with it.
`--only lora` runs the LoRA experiments instead: outlines, the colour word, and pivotal tuning (a LoRA with a
bundled embedding vs. the same LoRA with a plain word), at `--lora-lr` and `--embedding-lr`.

    .venv/bin/python benchmarks/efficacy.py [--steps 50 100 200 400] [--grids docs/images]
        [--model models/Stable-diffusion/shapes-xl]   (the SDXL-architecture twin)
    .venv/bin/python benchmarks/efficacy.py --only lora --steps 100 [--lora-lr 0.005] [--embedding-lr 0.02]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.logs import quiet_libraries
from app.models.default_model import SHIPPED_MODEL
from app.shapes.efficacy import (
    grid,
    make_services,
    run_embedding,
    run_hypernetwork,
    run_lora_colour,
    run_lora_outline,
    run_lora_pivotal,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grids", type=Path, default=None, help="write before/after image grids here")
    p.add_argument("--only", choices=("embedding", "hypernetwork", "lora"), default=None)
    p.add_argument("--lora-lr", default="0.005", help="LoRA experiments: the LoRA's learning rate")
    p.add_argument("--embedding-lr", default="0.02", help="pivotal tuning: the bundled embedding's learning rate")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="a shapes model folder (default: shapes-64)")
    args = p.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        services = make_services(work, args.model)
        rows = []
        for steps in args.steps:
            if args.only == "lora":
                lr = args.lora_lr
                print_lora_row(run_lora_outline(services, work, steps, seed=args.seed, learn_rate=lr))
                print_lora_row(run_lora_colour(services, work, steps, seed=args.seed, learn_rate=lr))
                pivotal = run_lora_pivotal(
                    services, work, steps, seed=args.seed, learn_rate=lr, embedding_lr=args.embedding_lr
                )
                print_lora_row(pivotal)
                continue
            if args.only != "hypernetwork":
                rows.append(run_embedding(services, work, steps, seed=args.seed))
                print_row(rows[-1])
            if args.only != "embedding":
                rows.append(run_hypernetwork(services, work, steps, seed=args.seed))
                print_row(rows[-1])
        if args.grids:
            args.grids.mkdir(parents=True, exist_ok=True)
            for kind in ("embedding", "hypernetwork"):
                done = [r for r in rows if r.kind == kind]
                if done:
                    suffix = "" if args.model == SHIPPED_MODEL else f"-{args.model.name}"
                    path = args.grids / f"efficacy-{kind}{suffix}.png"
                    grid(done[-1].images).save(path)
                    print(f"wrote {path} ({done[-1].steps} steps; rows: {', '.join(done[-1].images)})")


def print_row(r) -> None:
    base = "initial"
    other = "random" if r.kind == "embedding" else "none"
    share_base = "init text" if r.kind == "embedding" else "without"
    print(
        f"{r.kind:12s} steps {r.steps:4d}  train {r.train_seconds:6.1f} s  "
        f"held-out loss {r.loss['trained']:.4f} (initial {r.loss[base]:.4f}, {other} {r.loss[other]:.4f}; "
        f"ratio {r.loss['trained'] / r.loss[base]:.3f} / {r.loss['trained'] / r.loss[other]:.3f})  "
        f"concept share {r.share['trained']:.3f} vs {share_base} {r.share[share_base]:.3f} "
        f"(real images {r.share['reference']:.3f})",
        flush=True,
    )


def print_lora_row(r) -> None:
    """The LoRA experiments' baselines differ (none; the plain word and neither), so print each one by name."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in r.loss.items() if k != "trained")
    shares = ", ".join(f"{k} {v:.3f}" for k, v in r.share.items() if k != "trained")
    print(
        f"{r.kind} steps {r.steps:4d}  train + measure {r.train_seconds:6.1f} s  "
        f"held-out loss {r.loss['trained']:.4f} ({losses})  share {r.share['trained']:.3f} ({shares})",
        flush=True,
    )


if __name__ == "__main__":
    main()
