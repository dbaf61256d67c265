"""Everything at once against one server (issue 15, item 5): generation clients, a training run, listing routes,
option changes and checkpoint-switch attempts, for a while. Reports every answer's status (no 5xx, no request left
without an answer, every client thread back) and the listing routes' latency, p50/p99, under load against the same
routes on the same server while idle (the baseline, measured first in the same run).

The training run takes the first half of the window and is then interrupted (it saves); generation requests queue
behind it, as on any one-model server, and run in the second half. Listing routes never wait for either.

    .venv/bin/python benchmarks/load.py [--seconds 180] [--url http://127.0.0.1:7860]

Without --url it starts `webui.py --api` on a fresh data folder holding the default model and a tiny dataset.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LISTING = ["sd-models", "embeddings", "hypernetworks", "loras", "samplers", "options", "progress", "memory", "sd-vae"]
EMBEDDING = "loadtest"


@dataclass
class Answer:
    kind: str
    status: int  # 0: no answer (connection error or client timeout)
    seconds: float
    phase: str


@dataclass
class LoadReport:
    answers: list[Answer] = field(default_factory=list)
    stuck_threads: list[str] = field(default_factory=list)
    training_info: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def statuses(self) -> Counter:
        return Counter((a.kind, a.status) for a in self.answers)

    def server_errors(self) -> list[Answer]:
        return [a for a in self.answers if a.status >= 500]

    def unanswered(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 0]

    def latencies(self, phase: str) -> list[float]:
        return sorted(a.seconds for a in self.answers if a.kind == "listing" and a.phase == phase)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def timed(report: LoadReport, kind: str, phase: str, method: str, url: str, **kw) -> requests.Response | None:
    start = time.perf_counter()
    try:
        response = requests.request(method, url, timeout=kw.pop("timeout", 300), **kw)
    except requests.RequestException:
        report.add(Answer(kind, 0, time.perf_counter() - start, phase))
        return None
    report.add(Answer(kind, response.status_code, time.perf_counter() - start, phase))
    return response


def wait_for_training(api: str, trainer: threading.Thread, timeout: float) -> bool:
    """Whether /progress reported a training job running before the trainer thread came back or `timeout`."""
    deadline = time.time() + timeout
    while trainer.is_alive() and time.time() < deadline:
        state = requests.get(f"{api}/progress?skip_current_image=true", timeout=30).json()["state"]
        if state["job"].startswith("train"):
            return True
        time.sleep(0.1)
    return False


def run_load(url: str, seconds: float, dataset: Path, idle_rounds: int = 20, generators: int = 2) -> LoadReport:
    """The load described in the module docstring against a running server at `url`."""
    api = f"{url}/sdapi/v1"
    report = LoadReport()
    for _ in range(idle_rounds):
        for route in LISTING:
            timed(report, "listing", "idle", "GET", f"{api}/{route}")
    created = requests.post(f"{api}/create/embedding", json={"name": EMBEDDING, "overwrite_old": True}, timeout=60)
    created.raise_for_status()
    checkpoints = [m["title"] for m in requests.get(f"{api}/sd-models", timeout=30).json()]
    stop = threading.Event()
    phase = {"now": "training"}

    def train() -> None:
        body = dict(
            embedding_name=EMBEDDING, data_root=str(dataset), template_filename="subject.txt", steps=100000,
            training_width=64, training_height=64, learn_rate="0.005", create_image_every=10, save_embedding_every=10,
        )  # fmt: skip
        answer = timed(report, "train", "training", "POST", f"{api}/train/embedding", json=body, timeout=seconds + 300)
        report.training_info = answer.json().get("info", answer.text) if answer is not None else "no answer"

    def generate(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            body = dict(prompt=rng.choice(["a red circle", "two blue squares", "a green triangle"]), steps=4,
                        width=64, height=64, seed=rng.randrange(2**32), sampler_name="Euler a")  # fmt: skip
            timed(report, "txt2img", phase["now"], "POST", f"{api}/txt2img", json=body, timeout=seconds + 300)

    def list_routes() -> None:
        while not stop.is_set():
            for route in LISTING:
                timed(report, "listing", phase["now"], "GET", f"{api}/{route}")

    def change_options() -> None:
        formats = ["png", "jpg", "webp"]
        while not stop.is_set():
            timed(report, "options", phase["now"], "POST", f"{api}/options", json={"samples_format": formats[0]})
            formats.append(formats.pop(0))
            # A real switch (the data folder holds the model twice): refused (409) while training runs, queued
            # behind the waiting generations after.
            checkpoints.append(checkpoints.pop(0))
            body = {"sd_model_checkpoint": checkpoints[0]}
            timed(report, "checkpoint", phase["now"], "POST", f"{api}/options", json=body, timeout=seconds + 300)
            for route in ("refresh-embeddings", "refresh-loras", "refresh-checkpoints"):
                timed(report, "refresh", phase["now"], "POST", f"{api}/{route}")
            stop.wait(0.5)

    workers = [threading.Thread(target=train, name="training")]
    workers[0].start()
    # The clock starts once the run holds the model: on a busy machine a run can take seconds to start, and a
    # switch sent before it would (rightly) be queued ahead of it rather than refused.
    if not wait_for_training(api, workers[0], timeout=seconds + 120):
        raise RuntimeError(f"the training run did not start: {report.training_info or 'no answer yet'}")
    workers += [threading.Thread(target=generate, args=(i,), name=f"txt2img-{i}") for i in range(generators)]
    workers += [threading.Thread(target=list_routes, name="listing"), threading.Thread(target=change_options)]
    for worker in workers[1:]:
        worker.start()
    time.sleep(seconds / 2)
    requests.post(f"{api}/interrupt", timeout=30)  # the training run saves and ends; queued generations run
    phase["now"] = "generation"
    time.sleep(seconds / 2)
    stop.set()
    deadline = time.time() + 300
    for worker in workers:
        worker.join(max(0.0, deadline - time.time()))
    report.stuck_threads = [w.name for w in workers if w.is_alive()]
    return report


def print_report(report: LoadReport, seconds: float) -> None:
    idle = report.latencies("idle")
    print(f"\nLoad for {seconds:.0f} s: {len(report.answers)} requests")
    print("\n| requests | status | while training | after | \n|---|---|---|---|")
    counts = Counter((a.kind, a.status, a.phase) for a in report.answers if a.phase != "idle")
    for kind, status in sorted({(k, s) for k, s, _ in counts}):
        during, after = counts[(kind, status, "training")], counts[(kind, status, "generation")]
        print(f"| {kind} | {status or 'no answer'} | {during} | {after} |")
    print("\n| listing routes | requests | p50 ms | p99 ms | p50 vs idle | p99 vs idle |\n|---|---|---|---|---|---|")
    base50, base99 = percentile(idle, 50), percentile(idle, 99)
    for phase in ("idle", "training", "generation"):
        values = report.latencies(phase)
        p50, p99 = percentile(values, 50), percentile(values, 99)
        ratios = f"{p50 / base50:.2f}x | {p99 / base99:.2f}x"
        print(f"| {phase} | {len(values)} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | {ratios} |")
    if report.answers:
        mean = statistics.mean(a.seconds for a in report.answers if a.kind == "txt2img" and a.status == 200)
        print(f"\ntxt2img 64 px, 4 steps: mean {mean:.2f} s per answered request (queued time included)")
    print(f"training: {report.training_info}")
    print(f"server errors (5xx): {len(report.server_errors())}; without an answer: {len(report.unanswered())}; "
          f"client threads not back: {report.stuck_threads or 'none'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--url", help="a running server (started with --api) instead of a fresh one")
    parser.add_argument("--dataset", type=Path, help="training images for --url (default: a generated tiny set)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import Server, make_data_dir  # the same server harness as the tests
    from tests.test_training import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = None
        if args.url:
            url, dataset = args.url.rstrip("/"), args.dataset or make_dataset(base / "dataset")
        else:
            from app.models.default_model import ensure_default_model

            store = base / "store"
            ensure_default_model(store)
            data = make_data_dir(base / "data", store)
            shutil.copytree(store / "shapes-64", data / "models" / "Stable-diffusion" / "shapes-64-copy")
            dataset = make_dataset(data / "dataset")
            server = Server(data, ["--api"], base / "server.log")
            server.wait_ready("/sdapi/v1/sd-models")
            url = server.url
        try:
            report = run_load(url, args.seconds, dataset)
        finally:
            if server is not None:
                server.stop()
        print_report(report, args.seconds)
        if report.server_errors() or report.unanswered() or report.stuck_threads:
            sys.exit(1)


if __name__ == "__main__":
    main()
