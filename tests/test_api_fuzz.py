"""The API fuzzed from its own OpenAPI schema (issue 15): schemathesis generates requests for every `/sdapi/v1`
operation and sends them over HTTP to a real server. No answer may be a server error, and every answer must be one
the schema declares, with the declared content type and body shape.

Two runs:
- *positive*: valid requests from a copy of the schema whose sizes, step counts and batch sizes are capped
  (`COST_CAPS`) so each generation takes a fraction of a second on a CPU, and whose training routes point at a tiny
  dataset and at existing embeddings/hypernetworks, so real training runs start (and get 409 while one runs);
- *negative*: invalid requests (wrong types, out-of-range numbers, missing fields, broken JSON) from the same copy;
  each answer must be one the schema declares (a request whose broken field we ignore may succeed).

Seeded and without Hypothesis' example database, so a run is repeatable; the server runs with `--confine-paths` so
fuzzed folder names stay inside its data folder."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, make_data_dir, serve
from tests.test_training import make_dataset

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per operation and phase; raise it for a longer hunt
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance"]

# Property name -> the largest value the positive run sends (the schema's own bound where it is lower).
COST_CAPS = {
    "width": 128,
    "height": 128,
    "steps": 4,
    "batch_size": 2,
    "n_iter": 2,
    "hr_scale": 2,
    "hr_second_pass_steps": 2,
    "hr_resize_x": 128,
    "hr_resize_y": 128,
    "seed_resize_from_w": 128,
    "seed_resize_from_h": 128,
    "training_width": 128,
    "training_height": 128,
    "gradient_step": 2,
    "preview_steps": 2,
    "preview_width": 128,
    "preview_height": 128,
    "process_width": 128,
    "process_height": 128,
    "num_vectors_per_token": 4,
    "rank": 8,
}
SIZE_FIELDS = {"enable_sizes": 64}  # hypernetwork module widths: array items


def capped(schema: dict, dataset: str, names: dict[str, str]) -> dict:
    """A copy of the served schema for the positive run: cheap sizes, and training fields that reach real runs."""
    schema = copy.deepcopy(schema)
    for model in schema["components"]["schemas"].values():
        props = model.get("properties", {})
        # Required, so no request leaves them out and gets the server's default (512 px; training's 100000 steps).
        model["required"] = sorted({*model.get("required", []), *(name for name in props if name in COST_CAPS)})
        for name, prop in props.items():
            if name in COST_CAPS:
                prop["maximum"] = min(prop.get("maximum", COST_CAPS[name]), COST_CAPS[name])
                if "default" in prop:  # the coverage phase sends defaults too (training's is 100000 steps)
                    prop["default"] = min(prop["default"], prop["maximum"])
            if name in SIZE_FIELDS:
                prop["items"] = {**prop["items"], "maximum": SIZE_FIELDS[name]}
                prop["maxItems"] = 4
            if name in ("data_root", "process_src"):
                props[name] = {"type": "string", "enum": [dataset]}
                model["required"] = sorted({*model["required"], name})
            if name == "process_dst":
                props[name] = {"type": "string", "enum": [f"{dataset}-processed"]}
            if name in names:
                props[name] = {"type": "string", "enum": [names[name]]}
            if name == "overwrite_old":  # else most create requests stop at "already exists" after the first
                props[name] = {"type": "boolean", "enum": [True]}
                model["required"] = sorted({*model["required"], name})
            if name == "template_filename":
                props[name] = {"type": "string", "enum": ["subject.txt", "style_filewords.txt", "hypernetwork.txt"]}
    return schema


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("fuzz")
    data = make_data_dir(base / "data", model_store)
    make_dataset(data / "dataset", n=2)
    yield from serve(data, ["--nowebui", "--api", "--confine-paths"], base / "server.log", "/sdapi/v1/sd-models")


@pytest.fixture(scope="module")
def served_schema(fuzz_server) -> dict:
    url = fuzz_server.url
    assert requests.post(f"{url}/sdapi/v1/create/embedding", json={"name": "fuzzemb"}, timeout=60).ok
    created = requests.post(
        f"{url}/sdapi/v1/create/hypernetwork", json={"name": "fuzzhn", "enable_sizes": [32, 64]}, timeout=60
    )
    assert created.ok, created.text
    return requests.get(f"{url}/openapi.json", timeout=30).json()


def schemathesis_run(schema: dict, url: str, mode: str, folder: Path, max_examples: int) -> tuple[int, str]:
    """schemathesis' own runner (its CLI, in-process settings only through flags) over `schema`; exit code and
    its report. Seeded, no example database, one worker: the same requests in the same order every run."""
    path = folder / f"schema-{mode}.json"
    path.write_text(json.dumps(schema))
    done = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", str(path),
            "--url", url,
            "--mode", mode,
            "--phases", "examples,coverage,fuzzing",
            "--checks", ",".join(CHECKS),
            "--include-path-regex", "^/sdapi/v1/",
            "--max-examples", str(max_examples),
            "--seed", "15",
            "--workers", "1",
            "--no-shrink",
            "--generation-database", "none",
            "--suppress-health-check", "all",
            "--request-timeout", "120",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=1800, cwd=folder,  # its cache goes there, not in the checkout
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    (folder / f"report-{mode}.txt").write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def test_valid_requests_never_get_a_server_error_and_match_the_schema(fuzz_server, served_schema, tmp_path):
    names = {"embedding_name": "fuzzemb", "hypernetwork_name": "fuzzhn"}
    schema = capped(served_schema, str(fuzz_server.data_dir / "dataset"), names)
    code, report = schemathesis_run(schema, fuzz_server.url, "positive", tmp_path, EXAMPLES)
    assert code == 0, report[-20000:]
    assert_every_operation_ran(report, served_schema)


def test_invalid_requests_get_a_declared_client_error(fuzz_server, served_schema, tmp_path):
    # The capped schema here too: a negative case breaks one field and keeps the rest valid, so an uncapped schema
    # would make every case whose broken field we ignore a 512 px, 50-step generation.
    names = {"embedding_name": "fuzzemb", "hypernetwork_name": "fuzzhn"}
    schema = capped(served_schema, str(fuzz_server.data_dir / "dataset"), names)
    code, report = schemathesis_run(schema, fuzz_server.url, "negative", tmp_path, EXAMPLES)
    assert code == 0, report[-20000:]
    assert_every_operation_ran(report, served_schema)


def assert_every_operation_ran(report: str, schema: dict) -> None:
    operations = sum(len(ops) for path, ops in schema["paths"].items() if path.startswith("/sdapi/v1/"))
    assert operations >= 30
    assert f"{operations} selected" in report or f"{operations} total" in report, report[-5000:]
    # docs/reliability.md gives the count; it must stay the served one.
    doc = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    assert doc.count(f"all {operations} `/sdapi/v1` operations") >= 2
