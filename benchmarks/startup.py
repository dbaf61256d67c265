"""Time from `python webui.py` to the UI answering HTTP 200, with the default model already built.

Baseline: a fresh interpreter that only imports torch, diffusers, transformers and gradio (the floor any app on
these libraries pays). Also reports the very first start, which builds the default model.

    .venv/bin/python benchmarks/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_server(data_dir: Path) -> float:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "webui.py"), "--port", str(port), "--data-dir", str(data_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("webui.py exited during startup")
            try:
                if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except requests.RequestException:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)


def time_imports() -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, diffusers, transformers, gradio; "
            "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = time_server(Path(tmp))
        warm = [time_server(Path(tmp)) for _ in range(args.repeats)]
    imports = [time_imports() for _ in range(args.repeats)]
    w, i = statistics.median(warm), statistics.median(imports)
    print(f"first start (builds the default model): {first:.2f} s")
    print(f"import floor (baseline): median {i:.2f} s over {args.repeats}")
    print(f"start to HTTP 200:       median {w:.2f} s over {args.repeats}")
    print(f"ratio start/baseline: {w / i:.2f}")


if __name__ == "__main__":
    main()
