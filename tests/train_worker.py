"""Run by test_training_kill.py in a subprocess: train an embedding until killed or done.

python tests/train_worker.py DATA_DIR DATASET STEPS
"""

import sys
from pathlib import Path

from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings
from app.training.config import TrainConfig


def main() -> int:
    data_dir, dataset, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    quiet_libraries()
    services = build_services(Settings(data_dir=data_dir))
    if services.embeddings.db.get("zqkill") is None:
        services.embeddings.create("zqkill", 2, "star")
    print("READY", flush=True)
    result = services.training.train_embedding(
        TrainConfig(
            name="zqkill",
            data_root=dataset,
            training_width=64,
            training_height=64,
            steps=steps,
            save_every=1,
            create_image_every=3,
            template_filename="subject_filewords.txt",
            seed=5,
        )
    ).wait()
    print(f"DONE {result.step} {result.error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
