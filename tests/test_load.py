"""Everything at once (issue 15, item 5), for a short while: generation clients, a training run, listing routes,
option changes and real checkpoint-switch attempts against one server. No 5xx, every request answered, every client
back, the switch refused while training runs and done after it. Latency figures come from `benchmarks/load.py`
(docs/benchmarks.md); this test asserts no timings."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.load import run_load
from tests.conftest import make_data_dir, serve
from tests.test_training import make_dataset


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("load")
    data = make_data_dir(base / "data", model_store)
    shutil.copytree(model_store / "shapes-64", data / "models" / "Stable-diffusion" / "shapes-64-copy")
    make_dataset(data / "dataset")
    yield from serve(data, ["--api"], base / "server.log", "/sdapi/v1/sd-models")


def test_generation_training_listing_options_and_switches_at_once(busy_server):
    report = run_load(busy_server.url, 30, busy_server.data_dir / "dataset", idle_rounds=3)
    assert not report.server_errors(), report.server_errors()[:5]
    assert not report.unanswered(), report.unanswered()[:5]
    assert report.stuck_threads == []
    assert "complete: filename:" in report.training_info and report.training_info.endswith("error: None")
    by_phase = {(a.kind, a.status, a.phase) for a in report.answers}
    assert ("txt2img", 200, "generation") in by_phase  # generations ran once the training run ended
    assert ("checkpoint", 409, "training") in by_phase  # a switch is refused while training holds the model
    assert ("checkpoint", 200, "generation") in by_phase  # and done after
    assert ("listing", 200, "training") in by_phase
    log = busy_server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
