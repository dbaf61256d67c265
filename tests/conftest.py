"""Shared fixtures: the real tiny default model, real services, and a real server process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A checkpoint folder holding the default model, built once per test session."""
    from app.models.default_model import ensure_default_model

    folder = tmp_path_factory.mktemp("model-store")
    ensure_default_model(folder)
    return folder


def make_data_dir(base: Path, model_store: Path, models: tuple[str, ...] = ("shapes-64",)) -> Path:
    """A fresh data dir whose checkpoint folder already holds the default model (copied, not rebuilt); `models`
    may add the shipped `shapes-xl`, as a fresh install has it."""
    ckpt = base / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    for name in models:
        shutil.copytree(model_store / name, ckpt / name)
    return base


@pytest.fixture(scope="session")
def services(tmp_path_factory, model_store):
    """Real services over the tiny model, shared by the service-level tests."""
    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings

    quiet_libraries()
    data = make_data_dir(tmp_path_factory.mktemp("data"), model_store)
    return build_services(Settings(data_dir=data))


@pytest.fixture(scope="module")
def xl(tmp_path_factory, model_store):
    """Real services with a tiny SDXL-layout model selected (as a diffusers folder; also as a single file)."""
    from safetensors.torch import save_file

    from app.models.default_model import build_tiny_sdxl_pipeline
    from app.models.ldm_export import export_sdxl
    from app.models.single_file import CONFIG_DIR
    from app.services import build_services
    from app.settings import Settings

    data = make_data_dir(tmp_path_factory.mktemp("xl"), model_store)
    ckpt = data / "models" / "Stable-diffusion"
    pipe = build_tiny_sdxl_pipeline()
    pipe.save_pretrained(ckpt / "tinyxl-folder")
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            (ckpt / "tinyxl-folder" / sub / name).write_bytes((CONFIG_DIR.parent / "tokenizer" / name).read_bytes())
    save_file(export_sdxl(pipe), str(ckpt / "tinyxl.safetensors"))
    services = build_services(Settings(data_dir=data))
    services.select_checkpoint("tinyxl-folder")
    return services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "webui.py"), "--port", str(self.port), "--data-dir", str(data_dir), *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, path: str, timeout: float = 120, auth=None) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                if requests.get(self.url + path, timeout=2, auth=auth).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """`webui.py --api` serving UI and API, as a user starts it."""
    base = tmp_path_factory.mktemp("server")
    yield from serve(make_data_dir(base / "data", model_store), ["--api"], base / "server.log", "/sdapi/v1/sd-models")


def serve(data: Path, args: list[str], log_path: Path, ready_path: str, env: dict[str, str] | None = None):
    """A server over `data` for a fixture to yield, stopped when the fixture ends; `env` adds to its environment."""
    srv = Server(data, args, log_path, env)
    try:
        srv.wait_ready(ready_path)
        yield srv
    finally:
        srv.stop()
