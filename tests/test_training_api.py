"""`POST /sdapi/v1/train/embedding` on a real server: A1111's payload, progress while it runs, interrupt."""

from __future__ import annotations

import threading
import time

import requests

from tests.test_training import make_dataset


def payload(name, dataset, **kw):
    body = dict(
        id_task="task(1)",
        embedding_name=name,
        learn_rate=0.005,
        batch_size=1,
        gradient_step=1,
        data_root=str(dataset),
        log_directory="log",
        training_width=64,
        training_height=64,
        varsize=False,
        steps=6,
        clip_grad_mode="disabled",
        clip_grad_value="0.1",
        shuffle_tags=False,
        tag_drop_out=0,
        latent_sampling_method="once",
        use_weight=False,
        create_image_every=3,
        save_embedding_every=3,
        template_filename="style_filewords.txt",
        save_image_with_stored_embedding=True,
        preview_from_txt2img=False,
        preview_prompt="",
        preview_negative_prompt="",
        preview_steps=20,
        preview_sampler_name="Euler a",
        preview_cfg_scale=7.0,
        preview_seed=-1,
        preview_width=64,
        preview_height=64,
    )
    body.update(kw)
    return body


def test_train_embedding_through_the_api(server, tmp_path):
    url = f"{server.url}/sdapi/v1"
    dataset = make_dataset(tmp_path / "stars")
    assert (
        requests.post(
            f"{url}/create/embedding", json={"name": "apitrain", "num_vectors_per_token": 2}, timeout=30
        ).status_code
        == 200
    )
    response = requests.post(f"{url}/train/embedding", json=payload("apitrain", dataset), timeout=300)
    assert response.status_code == 200
    path = server.data_dir / "embeddings" / "apitrain.pt"
    assert response.json() == {"info": f"train embedding complete: filename: {path} error: None"}
    listing = requests.get(f"{url}/embeddings", timeout=30).json()
    assert listing["loaded"]["apitrain"]["step"] == 6


def test_train_errors_and_interrupt_through_the_api(server, tmp_path):
    url = f"{server.url}/sdapi/v1"
    dataset = make_dataset(tmp_path / "stars")
    requests.post(f"{url}/create/embedding", json={"name": "apilong"}, timeout=30)
    bad = requests.post(f"{url}/train/embedding", json=payload("apilong", tmp_path / "missing"), timeout=30)
    assert bad.status_code == 400 and "does not exist" in bad.json()["detail"]
    bad_lr = requests.post(f"{url}/train/embedding", json=payload("apilong", dataset, learn_rate="fast"), timeout=30)
    assert bad_lr.status_code == 400 and "'fast'" in bad_lr.json()["detail"]
    bad_mode = requests.post(
        f"{url}/train/embedding", json=payload("apilong", dataset, gradient_checkpointing="sometimes"), timeout=30
    )
    assert bad_mode.status_code == 422
    both = requests.post(
        f"{url}/train/embedding", json=payload("apilong", dataset, varsize=True, enable_bucket=True), timeout=30
    )
    assert both.status_code == 400 and "Bucket images by aspect ratio" in both.json()["detail"]
    assert all(e["loc"][:2] == ["body", "gradient_checkpointing"] for e in bad_mode.json()["detail"])

    box = {}
    thread = threading.Thread(
        target=lambda: box.update(
            r=requests.post(
                f"{url}/train/embedding",
                json=payload("apilong", dataset, steps=100000, create_image_every=0),
                timeout=300,
            )
        )
    )
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = requests.get(f"{url}/progress", timeout=10).json()
        if progress["state"]["job"] == "train embedding" and progress["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.1)
    assert "Training embedding 'apilong'" in progress["textinfo"]
    assert requests.post(f"{url}/interrupt", timeout=10).status_code == 200
    thread.join(60)
    info = box["r"].json()["info"]
    assert info.startswith("train embedding complete: filename: ") and info.endswith("error: None")
    step = requests.get(f"{url}/embeddings", timeout=30).json()["loaded"]["apilong"]["step"]
    assert 3 <= step < 100000
