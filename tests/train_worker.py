"""Run by test_training_kill.py in a subprocess: train until killed or done.

python tests/train_worker.py DATA_DIR DATASET STEPS [embedding|hypernetwork|lora|pivotal] [KILL_AT]

KILL_AT (`<point>:<n>`) makes the process SIGKILL itself the n-th time training reaches `point`: `latents` (a VAE
encode), `unet` (a UNet forward), `rename:<glob>` (just before a file matching the glob is published by its
rename), `csv` (half-way through writing a loss-log row). The hooks sit at the OS boundary and on modules; the
training code runs unchanged.
"""

import fnmatch
import os
import signal
import sys
from pathlib import Path

from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings
from app.training.config import LoraNetwork, PivotalEmbedding, TrainConfig


def arm(spec: str, services) -> None:
    point, n = spec.rsplit(":", 1)
    remaining = [int(n)]

    def reached() -> bool:
        remaining[0] -= 1
        return remaining[0] == 0

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    pipe = services.models.get().pipe
    if point == "latents":
        pipe.vae.encoder.register_forward_pre_hook(lambda *args: die() if reached() else None)
    elif point == "unet":
        pipe.unet.register_forward_pre_hook(lambda *args: die() if reached() else None)
    elif point.startswith("rename:"):
        pattern, real_replace = point.removeprefix("rename:"), os.replace

        def replace(src, dst, *args, **kwargs):
            if fnmatch.fnmatch(Path(dst).as_posix(), pattern) and reached():
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif point == "csv":
        import app.training.csv_log as csv_log_module

        real_open = open

        class TornWriter:
            def __init__(self, f):
                self.f = f

            def write(self, text):
                if reached():
                    self.f.write(text[: len(text) // 2])
                    self.f.flush()
                    die()
                return self.f.write(text)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        csv_log_module.open = lambda file, mode="r", *a, **k: (
            TornWriter(real_open(file, mode, *a, **k)) if "a" in mode else real_open(file, mode, *a, **k)
        )
    else:
        raise SystemExit(f"unknown kill point {spec}")


def main() -> int:
    data_dir, dataset, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) > 4 else "embedding"
    quiet_libraries()
    services = build_services(Settings(data_dir=data_dir))
    cfg = TrainConfig(
        name="zqkill",
        data_root=dataset,
        training_width=64,
        training_height=64,
        steps=steps,
        save_every=1,
        create_image_every=3,
        seed=5,
    )
    if kind == "embedding":
        if services.embeddings.db.get("zqkill") is None:
            services.embeddings.create("zqkill", 2, "star")
        cfg.template_filename = "subject_filewords.txt"
        train = services.training.train_embedding
    elif kind == "lora":
        cfg.template_filename, cfg.learn_rate = "hypernetwork.txt", "0.001"

        def train(cfg):  # rank 4, alpha 2, the text encoder trained too: every kind of tensor the file holds
            return services.training.train_lora(cfg, LoraNetwork(rank=4, alpha=2.0, train_text_encoder=True))
    elif kind == "pivotal":  # a LoRA with a bundled embedding (its word through subject.txt's [name]), max-norm on
        cfg.template_filename, cfg.learn_rate = "subject.txt", "0.001"  # max-norm 0.01 binds: layers get scaled

        def train(cfg):
            return services.training.train_lora(
                cfg,
                LoraNetwork(rank=4, alpha=2.0, scale_weight_norms=0.01),
                PivotalEmbedding(name="zqword", init_text="star"),
            )
    else:
        if "zqkill" not in services.hypernetworks.names():
            import torch

            torch.manual_seed(0)  # new layers start random: the same start in every data folder, to compare runs
            services.hypernetworks.create(
                "zqkill", [64, 32], "1, 2, 1", "relu", use_dropout=True, dropout_structure="0, 0.1, 0"
            )
        cfg.template_filename, cfg.learn_rate = "hypernetwork.txt", "0.0001"
        train = services.training.train_hypernetwork
    if len(sys.argv) > 5 and sys.argv[5]:
        arm(sys.argv[5], services)
    print("READY", flush=True)
    result = train(cfg).wait()
    print(f"DONE {result.step} {result.error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
