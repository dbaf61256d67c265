"""Abandoned and excessive work on a real server process: a bounded queue (503 + Retry-After), generations whose
client went away are dropped or interrupted, and SIGTERM stops the server in seconds with jobs queued, a training
run saving its checkpoint first."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from tests.conftest import Server, make_data_dir
from tests.test_training import make_dataset

# Long enough on the tiny model to still be running when the next requests arrive (several seconds each).
LONG = dict(prompt="a red circle", width=256, height=256, steps=150, batch_size=8, sampler_name="Euler a")


@pytest.fixture
def start(tmp_path, model_store):
    servers = []

    def make(*args: str) -> Server:
        data = make_data_dir(tmp_path / f"data{len(servers)}", model_store)
        srv = Server(data, ["--nowebui", *args], tmp_path / f"server{len(servers)}.log")
        servers.append(srv)
        srv.wait_ready("/sdapi/v1/sd-models")
        return srv

    yield make
    for srv in servers:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv._log.close()


def post_in_background(url: str, payload: dict, timeout: float, results: list) -> threading.Thread:
    def call():
        try:
            results.append(requests.post(url, json=payload, timeout=timeout))
        except requests.RequestException as e:
            results.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def wait_running(srv: Server, deadline: float = 60) -> None:
    end = time.time() + deadline
    while time.time() < end:
        state = requests.get(f"{srv.url}/sdapi/v1/progress", timeout=10).json()["state"]
        if state["sampling_step"] > 0:
            return
        time.sleep(0.1)
    raise TimeoutError("no job started")


def test_a_full_queue_answers_503_with_retry_after(start):
    srv = start("--queue-limit", "1")
    url = f"{srv.url}/sdapi/v1/txt2img"
    results: list = []
    post_in_background(url, LONG, 120, results)
    wait_running(srv)
    post_in_background(url, LONG, 120, results)  # waits: the one allowed
    time.sleep(1.0)
    refused = requests.post(url, json=LONG, timeout=30)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "--queue-limit" in refused.json()["detail"] and "1 jobs are already waiting" in refused.json()["detail"]
    requests.post(f"{srv.url}/sdapi/v1/interrupt", timeout=10)


def test_generations_whose_client_left_are_dropped_or_interrupted(start):
    srv = start()
    url = f"{srv.url}/sdapi/v1/txt2img"
    results: list = []
    threads = [post_in_background(url, LONG, 3, results)]
    wait_running(srv)
    threads += [post_in_background(url, LONG, 3, results) for _ in range(2)]  # queued behind it
    for thread in threads:
        thread.join(30)
    assert len(results) == 3 and all(isinstance(r, requests.Timeout) for r in results)  # every client gave up
    # The running one is interrupted within a step, the queued ones dropped: the queue empties long before
    # 3 x 150 steps would, and a new request is answered.
    answered = requests.post(url, json=dict(prompt="a blue square", width=64, height=64, steps=3), timeout=60)
    assert answered.status_code == 200
    log = srv.log_path.read_text()
    assert log.count("Client gone: interrupting txt2img job") == 3


def test_sigterm_stops_the_server_in_seconds_with_jobs_queued_and_training_saved(start, tmp_path):
    srv = start()
    url = f"{srv.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "zqterm", "init_text": "star"}, timeout=30).ok
    data = make_dataset(tmp_path / "stars")
    train = dict(
        embedding_name="zqterm",
        data_root=str(data),
        training_width=64,
        training_height=64,
        steps=100000,
        learn_rate="0.005",
        template_filename="subject.txt",
        create_image_every=0,
        save_embedding_every=0,
    )
    results: list = []
    post_in_background(f"{url}/train/embedding", train, 120, results)
    wait_running(srv)
    for _ in range(3):
        post_in_background(f"{url}/txt2img", LONG, 120, results)  # queued behind the training run
    time.sleep(1.0)
    started = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=15)
    assert time.time() - started < 10
    saved = srv.data_dir / "embeddings" / "zqterm.pt"
    import torch

    data = torch.load(saved, map_location="cpu", weights_only=True)
    assert data["step"] > 0  # the interrupted run saved where it stopped
    assert (srv.data_dir / "embeddings" / "zqterm.optim").is_file()
