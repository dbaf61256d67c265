"""Safe on a network (issue 15, item 7), over real HTTP: once the server listens beyond localhost, folders named
in requests are confined to the data folder (and `--allow-path` folders); with `--api-auth`/`--gradio-auth`
every route of the served app, the UI's file and stream routes included, refuses requests without credentials."""

from __future__ import annotations

import dataclasses
import os

import pytest
import requests
from starlette.routing import Mount

from app.access import is_login_page
from app.folders import FolderPolicy, is_loopback
from app.settings import Settings
from tests.conftest import Server, make_data_dir, serve
from tests.test_training import make_dataset
from tests.test_training_api import payload

PREPROCESS = dict(process_width=64, process_height=64)


@pytest.fixture(scope="module")
def listening(tmp_path_factory, model_store):
    """`--listen --api`: reachable from other machines, no --allow-path."""
    base = tmp_path_factory.mktemp("listen")
    data = make_data_dir(base / "data", model_store)
    make_dataset(data / "train" / "stars")
    make_dataset(base / "outside" / "stars")
    os.symlink(base / "outside", data / "link-out")
    yield from serve(data, ["--listen", "--api"], base / "server.log", "/sdapi/v1/sd-models")


def outside(srv: Server):
    return srv.data_dir.parent / "outside"


def test_policy_is_off_on_localhost_and_on_beyond_it(tmp_path):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "my-box.lan"))
    assert not FolderPolicy.from_settings(Settings(data_dir=tmp_path)).confined
    for flags in (dict(listen=True), dict(server_name="0.0.0.0"), dict(confine_paths=True)):
        policy = FolderPolicy.from_settings(Settings(data_dir=tmp_path, **flags))
        assert policy.confined and policy.allows(tmp_path / "x" / "y") and not policy.allows(tmp_path.parent)


def test_training_paths_outside_the_data_folder_are_refused(listening):
    url = f"{listening.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "netsafe"}, timeout=30).status_code == 200
    escapes = {
        "data_root": [
            str(outside(listening) / "stars"),
            str(listening.data_dir / ".." / "outside" / "stars"),
            str(listening.data_dir / "link-out" / "stars"),
            "/etc",
        ],
        "log_directory": [str(outside(listening) / "log"), "../outside/log", "/tmp"],
    }
    for field, values in escapes.items():
        for value in values:
            body = payload("netsafe", listening.data_dir / "train" / "stars", steps=2)
            body[field] = value
            r = requests.post(f"{url}/train/embedding", json=body, timeout=30)
            assert r.status_code == 400, (field, value, r.text)
            label = "Dataset directory" if field == "data_root" else "Log directory"
            assert label in r.json()["detail"] and "--allow-path" in r.json()["detail"], r.text
    assert not (outside(listening) / "log").exists()
    # Inside the data folder (relative log directory, absolute data root) it trains.
    ok = requests.post(
        f"{url}/train/embedding", json=payload("netsafe", listening.data_dir / "train" / "stars", steps=2), timeout=120
    )
    assert ok.status_code == 200 and "error: None" in ok.json()["info"], ok.text


def test_preprocess_folders_outside_the_data_folder_are_refused(listening):
    url = f"{listening.url}/sdapi/v1/preprocess"
    inside_src, inside_dst = listening.data_dir / "train" / "stars", listening.data_dir / "train" / "processed"
    for src, dst, label in [
        (outside(listening) / "stars", inside_dst, "Source directory"),
        (inside_src, outside(listening) / "processed", "Destination directory"),
        ("/no/such/folder", inside_dst, "Source directory"),  # refused without saying whether it exists
    ]:
        r = requests.post(url, json=dict(process_src=str(src), process_dst=str(dst), **PREPROCESS), timeout=30)
        assert r.status_code == 400 and label in r.json()["detail"] and "outside" in r.json()["detail"], r.text
    assert not (outside(listening) / "processed").exists() and not inside_dst.exists()
    r = requests.post(
        url, json=dict(process_src=str(inside_src), process_dst=str(inside_dst), **PREPROCESS), timeout=60
    )
    assert r.status_code == 200 and len(list(inside_dst.glob("*.png"))) == 4


def test_output_folder_options_outside_the_data_folder_are_refused(listening):
    url = f"{listening.url}/sdapi/v1/options"
    before = requests.get(url, timeout=10).json()["outdir_txt2img_samples"]
    r = requests.post(url, json={"outdir_txt2img_samples": str(outside(listening) / "images")}, timeout=10)
    assert r.status_code == 400 and "outdir_txt2img_samples" in r.json()["detail"]
    assert requests.get(url, timeout=10).json()["outdir_txt2img_samples"] == before
    assert requests.post(url, json={"outdir_txt2img_samples": "outputs/mine"}, timeout=10).status_code == 200


def test_allow_path_opens_one_more_folder_with_server_name(tmp_path, model_store):
    data = make_data_dir(tmp_path / "data", model_store)
    allowed = make_dataset(tmp_path / "photos" / "stars")
    other = make_dataset(tmp_path / "elsewhere" / "stars")
    srv = Server(
        data,
        ["--server-name", "0.0.0.0", "--nowebui", "--allow-path", str(tmp_path / "photos")],
        tmp_path / "server.log",
    )
    try:
        srv.wait_ready("/sdapi/v1/sd-models")
        url = f"{srv.url}/sdapi/v1/preprocess"
        ok = requests.post(
            url,
            json=dict(process_src=str(allowed), process_dst=str(tmp_path / "photos" / "out"), **PREPROCESS),
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
        no = requests.post(
            url, json=dict(process_src=str(other), process_dst=str(data / "out"), **PREPROCESS), timeout=30
        )
        assert no.status_code == 400 and str(tmp_path / "photos") in no.json()["detail"]
    finally:
        srv.stop()


# -- credentials on every route ----------------------------------------------------------------------------------
AUTH_FLAGS = ["--listen", "--api", "--api-auth", "alice:pw1", "--gradio-auth", "carol:pw2"]


@pytest.fixture(scope="module")
def locked(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("locked")
    srv = Server(make_data_dir(base / "data", model_store), AUTH_FLAGS, base / "server.log")
    try:
        srv.wait_ready("/sdapi/v1/sd-models", auth=("alice", "pw1"))
        yield srv
    finally:
        srv.stop()


def served_routes(services) -> list[tuple[str, str]]:
    """(method, path) of every route the app with these flags serves, the UI's included, built by the same code."""
    from app.server import build_app
    from app.settings import settings_from_args

    settings = settings_from_args(["--data-dir", str(services.settings.data_dir), *AUTH_FLAGS])
    app = build_app(dataclasses.replace(services, settings=settings))
    found = []

    def walk(routes, prefix=""):
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif hasattr(route, "original_router"):  # FastAPI's included router
                walk(route.original_router.routes, prefix)
            elif getattr(route, "methods", None):
                found.append((sorted(route.methods - {"HEAD"} or {"HEAD"})[0], prefix + route.path))

    walk(app.routes)
    return sorted(set(found))


def concrete(path: str) -> str:
    """A path template with its parameters filled in."""
    out = []
    for part in path.split("/"):
        while "{" in part:
            start, end = part.index("{"), part.index("}")
            part = part[:start] + "x" + part[end + 1 :]
        out.append(part)
    return "/".join(out)


def test_every_route_refuses_requests_without_credentials(locked, services):
    routes = served_routes(services)
    gradio_paths = [p for _, p in routes if p.startswith("/gradio_api/")]
    assert len(routes) > 80 and len(gradio_paths) > 40  # the walk really saw the API and the UI's routes
    for method, path in routes:
        url = locked.url + concrete(path)
        r = requests.request(method, url, timeout=30, allow_redirects=False, stream=True)
        r.close()
        if is_login_page(path):
            assert r.status_code != 401, path  # the login page and what it loads
        else:
            assert r.status_code == 401, (method, path, r.status_code)
    # Wrong credentials are no better than none; a path no route has is refused the same way.
    assert requests.get(f"{locked.url}/sdapi/v1/options", auth=("alice", "nope"), timeout=10).status_code == 401
    assert requests.get(f"{locked.url}/gradio_api/not-a-route", timeout=10).status_code == 401
    assert requests.get(f"{locked.url}/openapi.json", timeout=10).status_code == 401
    assert requests.get(f"{locked.url}/docs", auth=("alice", "pw1"), timeout=10).status_code == 200


def test_the_ui_file_route_needs_the_login_session(locked):
    image = locked.data_dir / "outputs" / "probe.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    file_url = f"{locked.url}/gradio_api/file={image}"
    assert requests.get(file_url, timeout=10).status_code == 401
    session = requests.Session()
    assert session.post(f"{locked.url}/login", data={"username": "carol", "password": "pw2"}, timeout=10).ok
    # Logged in, Gradio's own rules apply (it serves only files it made or was allowed): no longer our 401.
    assert session.get(file_url, timeout=10).status_code != 401
    assert session.get(f"{locked.url}/config", timeout=10).status_code == 200
    # The API's credentials do not open the UI, nor the UI's session the API.
    assert requests.get(f"{locked.url}/config", auth=("alice", "pw1"), timeout=10).status_code == 401
    assert session.get(f"{locked.url}/sdapi/v1/options", timeout=10).status_code == 401
