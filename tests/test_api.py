"""The A1111-compatible API on a real server process, driven by the real `webuiapi` client and plain requests."""

import base64
import io
import json
import threading
import time

import pytest
import requests
import webuiapi
from PIL import Image

from tests.conftest import Server, make_data_dir

SMALL = dict(width=64, height=64, steps=5)


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=5)


def post(server, route, **payload):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=120)


def test_webuiapi_txt2img_returns_images_with_infotext(api):
    result = api.txt2img(
        prompt="a red circle", negative_prompt="blurry", seed=3, width=64, height=64, batch_size=2, cfg_scale=6.5
    )
    assert len(result.images) == 2
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [3, 4]
    assert result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red circle"
    assert "Seed: 3," in result.image.info["parameters"]
    assert "CFG scale: 6.5," in result.info["infotexts"][0]


def test_same_seed_same_image_over_http(server):
    a = post(server, "txt2img", prompt="cat", seed=11, **SMALL).json()["images"][0]
    b = post(server, "txt2img", prompt="cat", seed=11, **SMALL).json()["images"][0]
    decode = lambda s: Image.open(io.BytesIO(base64.b64decode(s))).tobytes()  # noqa: E731
    assert decode(a) == decode(b)


def test_sampler_index_is_the_old_name_of_sampler_name(server):
    info = post(server, "txt2img", prompt="cat", sampler_index="DDIM", **SMALL).json()["info"]
    assert '"sampler_name": "DDIM"' in info
    default = post(server, "txt2img", prompt="cat", **SMALL).json()["info"]
    assert '"sampler_name": "Euler"' in default  # A1111's API default


def test_png_info_round_trip(api):
    image = api.txt2img(prompt="a (blue:1.1) square", seed=5, width=64, height=64).image
    info = api.png_info(image)
    assert info.info.startswith("a (blue:1.1) square\n")
    assert info.json["parameters"]["Seed"] == "5"
    assert info.json["parameters"]["Size-1"] == "64"


def test_listing_routes(api, server):
    models = api.get_sd_models()
    assert models[0]["model_name"] == "shapes-64"
    assert len(models[0]["hash"]) == 10 and len(models[0]["sha256"]) == 64
    assert models[0]["title"] == f"shapes-64 [{models[0]['hash']}]"
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert "karras" in api.util_get_scheduler_names()
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.util_get_current_model() == models[0]["title"]
    assert requests.post(f"{server.url}/sdapi/v1/refresh-checkpoints", timeout=30).status_code == 200


def test_options_round_trip_and_clip_skip(api, server):
    api.set_options({"CLIP_stop_at_last_layers": 2, "some_unknown_key": "kept"})
    options = api.get_options()
    assert options["CLIP_stop_at_last_layers"] == 2
    assert options["some_unknown_key"] == "kept"
    info = post(server, "txt2img", prompt="cat", **SMALL).json()["info"]
    assert "Clip skip: 2" in info
    api.set_options({"CLIP_stop_at_last_layers": 1})
    api.util_set_model("shapes-64")
    assert api.util_get_current_model().startswith("shapes-64 [")


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (dict(width=100), 400, "multiple of 8"),
        (dict(steps=0), 400, "Sampling steps"),
        (dict(sampler_name="Bogus"), 400, "Sampler 'Bogus' is not available"),
        (dict(batch_size=-2), 400, "Batch size"),
        (dict(prompt="word " * 6000), 400, "too long"),
        (dict(width="wide"), 422, ""),
    ],
)
def test_bad_txt2img_input_is_a_4xx_with_detail(server, payload, status, message):
    response = post(server, "txt2img", **{**SMALL, **payload})
    assert response.status_code == status
    assert message in str(response.json()["detail"])
    assert requests.get(f"{server.url}/sdapi/v1/sd-models", timeout=10).status_code == 200


def test_unknown_checkpoint_in_options_is_refused(server):
    response = post(server, "options", sd_model_checkpoint="no-such-model.safetensors")
    assert response.status_code == 404
    assert "no-such-model.safetensors" in response.json()["detail"]


def test_bad_png_info_payload(server):
    response = post(server, "png-info", image=base64.b64encode(b"not an image").decode())
    assert response.status_code == 400
    assert "could not be read" in response.json()["detail"]


def test_unknown_fields_are_accepted_and_unsupported_features_noted(server):
    response = post(server, "txt2img", prompt="cat", script_name="x/y/z plot", some_future_field=[1, 2], **SMALL)
    assert response.status_code == 200
    notes = json.loads(response.json()["info"])["notes"]
    assert "some_future_field: not a field of A1111's txt2img API; ignored" in notes
    assert "script_name: scripts are not supported; ignored" in notes


def test_two_clients_at_once_both_get_images(server):
    results = []

    def call(seed):
        results.append(post(server, "txt2img", prompt="cat", seed=seed, **SMALL).json()["info"])

    threads = [threading.Thread(target=call, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted('"seed": 1,' in r or '"seed": 2,' in r for r in results) == [True, True]


def test_progress_and_interrupt_during_a_long_generation(server):
    box = {}
    thread = threading.Thread(
        target=lambda: box.update(r=post(server, "txt2img", prompt="cat", width=64, height=64, steps=150, n_iter=30))
    )
    thread.start()
    deadline = time.time() + 60
    progress = None
    while time.time() < deadline:
        progress = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()
        if progress["state"]["sampling_step"] > 1:
            break
        time.sleep(0.05)
    assert progress["state"]["job"] == "txt2img"
    assert progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] >= 30
    assert 0 < progress["progress"] < 1
    assert progress["current_image"]  # live preview as base64 PNG
    Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
    started = time.time()
    assert requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=10).status_code == 200
    thread.join(60)
    assert time.time() - started < 10
    body = box["r"].json()
    assert len(body["images"]) >= 1
    assert '"interrupted": true' in body["info"]
    idle = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()
    assert idle["state"]["job_count"] == 0


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("auth")
    srv = Server(
        make_data_dir(base / "data", model_store),
        ["--api", "--api-auth", "alice:s3cret:x,bob:pw", "--gradio-auth", "carol:pw2"],
        base / "log.txt",
    )
    try:
        srv.wait_ready("/sdapi/v1/sd-models")
        yield srv
    finally:
        srv.stop()


def test_api_auth(auth_server):
    url = f"{auth_server.url}/sdapi/v1/sd-models"
    missing = requests.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=("alice", "wrong"), timeout=10).status_code == 401
    assert requests.get(url, auth=("alice", "s3cret:x"), timeout=10).status_code == 200
    assert requests.get(url, auth=("bob", "pw"), timeout=10).status_code == 200
    client = webuiapi.WebUIApi(host="127.0.0.1", port=auth_server.port, username="bob", password="pw", steps=3)
    assert client.txt2img(prompt="cat", width=64, height=64).image.size == (64, 64)


def test_gradio_auth_protects_the_ui(auth_server):
    assert requests.get(f"{auth_server.url}/config", timeout=10).status_code == 401
    session = requests.Session()
    bad = session.post(f"{auth_server.url}/login", data={"username": "carol", "password": "nope"}, timeout=10)
    assert bad.status_code == 400
    good = session.post(f"{auth_server.url}/login", data={"username": "carol", "password": "pw2"}, timeout=10)
    assert good.status_code == 200
    assert session.get(f"{auth_server.url}/config", timeout=10).status_code == 200


def test_nowebui_serves_api_only(tmp_path, model_store):
    srv = Server(make_data_dir(tmp_path / "data", model_store), ["--nowebui"], tmp_path / "log.txt")
    try:
        srv.wait_ready("/sdapi/v1/sd-models")
        assert requests.get(f"{srv.url}/", timeout=10).status_code == 404
        assert post(srv, "txt2img", prompt="cat", **SMALL).status_code == 200
    finally:
        srv.stop()
