"""Embedding folder scans and the cost of embeddings in a prompt.

1. Scan of a folder of 2,000 generated `.pt` embeddings: cold (the first scan parses every file) vs. a rescan
   after one file changed (unchanged files are not re-read) and the no-change check run before every
   generation. Baseline: the cold scan.
2. Encoding a prompt that uses 5 embeddings vs. the same prompt with plain words in their place (baseline).

    .venv/bin/python benchmarks/embeddings_scan.py [--files 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.embeddings.database import EmbeddingDatabase
from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        folder = data / "embeddings"
        folder.mkdir()
        for i in range(args.files):
            torch.save(
                {
                    "string_to_token": {"*": 265},
                    "string_to_param": {"*": torch.randn(2, 64)},
                    "name": f"e{i}",
                    "step": 0,
                },
                folder / f"emb{i:05d}.pt",
            )
        services = build_services(Settings(data_dir=data))
        model = services.models.get()
        db = EmbeddingDatabase(folder)
        cold = timed(lambda: db.set_model(model.pipe.tokenizer, model.text_width))  # first scan: parses every file
        (folder / "emb00000.pt").touch()
        warm = timed(lambda: (Path(folder / "emb00001.pt").touch(), db.refresh_if_changed()), repeats=5)
        check = timed(db.refresh_if_changed, repeats=20)
        print(f"{args.files} embedding files")
        print(f"cold scan (baseline):                      {cold * 1000:8.1f} ms")
        print(f"rescan after one file changed:             {warm * 1000:8.1f} ms  ratio {warm / cold:.3f}")
        print(f"no-change check before each generation:    {check * 1000:8.1f} ms  ratio {check / cold:.3f}")

        emb_dir = services.settings.embeddings_dir
        for i in range(5):
            torch.save({"emb_params": torch.randn(1, model.text_width)}, emb_dir / f"token{i}x.pt")
        services.embeddings.refresh()
        with_emb = "a photo of token0x, token1x, token2x in a token3x style with token4x lighting"
        without = "a photo of cat, dog, fox in a bird style with tree lighting"
        encoder = model.encoder
        with torch.no_grad():
            for _ in range(5):
                encoder.encode([with_emb]), encoder.encode([without])
            a = timed(lambda: encoder.encode([with_emb]), repeats=200)
            b = timed(lambda: encoder.encode([without]), repeats=200)
        print(f"prompt encoding without embeddings (baseline): {b * 1000:.2f} ms")
        print(f"prompt encoding with 5 embeddings:             {a * 1000:.2f} ms  ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
