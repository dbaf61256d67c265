"""Run by test_training_kill.py in a subprocess: train until killed or done.

python tests/train_worker.py DATA_DIR DATASET STEPS [embedding|hypernetwork]
"""

import sys
from pathlib import Path

from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings
from app.training.config import TrainConfig


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
    else:
        if "zqkill" not in services.hypernetworks.names():
            services.hypernetworks.create(
                "zqkill", [64, 32], "1, 2, 1", "relu", use_dropout=True, dropout_structure="0, 0.1, 0"
            )
        cfg.template_filename, cfg.learn_rate = "hypernetwork.txt", "0.0001"
        train = services.training.train_hypernetwork
    print("READY", flush=True)
    result = train(cfg).wait()
    print(f"DONE {result.step} {result.error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
