"""Hypernetwork routes on a real server: list, create, train, and use in txt2img."""

from __future__ import annotations

import requests

from tests.test_training import make_dataset


def test_create_list_use_and_train_through_the_api(server, tmp_path):
    url = f"{server.url}/sdapi/v1"
    created = requests.post(
        f"{url}/create/hypernetwork",
        json={
            "name": "apihn",
            "enable_sizes": [64, 32, 768],
            "layer_structure": "1, 2, 1",
            "activation_func": "relu",
            "weight_init": "XavierNormal",
            "add_layer_norm": True,
            "use_dropout": True,
            "dropout_structure": "0, 0.1, 0",
            "overwrite_old": False,
        },
        timeout=30,
    )
    assert created.status_code == 200
    path = server.data_dir / "models" / "hypernetworks" / "apihn.pt"
    assert created.json()["info"] == f"create hypernetwork filename: {path}"
    assert "768" in created.json()["warnings"][0]
    again = requests.post(f"{url}/create/hypernetwork", json={"name": "apihn", "enable_sizes": [64]}, timeout=30)
    assert again.status_code == 400 and again.json()["info"].startswith("create hypernetwork error: ")
    bad = requests.post(f"{url}/create/hypernetwork", json={"name": "apibad", "layer_structure": "2, 1"}, timeout=30)
    assert bad.status_code == 400 and "start and end with 1" in bad.json()["detail"]

    assert {"name": "apihn", "path": str(path)} in requests.get(f"{url}/hypernetworks", timeout=30).json()

    body = requests.post(
        f"{url}/txt2img",
        json={"prompt": "a cat <hypernet:apihn:0.7>", "steps": 3, "width": 64, "height": 64, "seed": 1},
        timeout=60,
    ).json()
    assert '"notes": []' in body["info"]
    missing = requests.post(
        f"{url}/txt2img", json={"prompt": "a cat <hypernet:ghost:1>", "steps": 2, "width": 64, "height": 64}, timeout=60
    )
    assert missing.status_code == 200 and "'ghost' not found" in missing.json()["info"]

    dataset = make_dataset(tmp_path / "data")
    trained = requests.post(
        f"{url}/train/hypernetwork",
        json={
            "id_task": "t",
            "hypernetwork_name": "apihn",
            "learn_rate": "0.0001",
            "batch_size": 1,
            "gradient_step": 1,
            "data_root": str(dataset),
            "log_directory": "log",
            "training_width": 64,
            "training_height": 64,
            "varsize": False,
            "steps": 4,
            "clip_grad_mode": "norm",
            "clip_grad_value": "1.0",
            "shuffle_tags": False,
            "tag_drop_out": 0,
            "latent_sampling_method": "deterministic",
            "use_weight": False,
            "create_image_every": 2,
            "save_hypernetwork_every": 2,
            "template_filename": "hypernetwork.txt",
            "preview_from_txt2img": True,
            "preview_prompt": "a cat",
            "preview_negative_prompt": "",
            "preview_steps": 3,
            "preview_sampler_name": "Euler a",
            "preview_cfg_scale": 7,
            "preview_seed": 1,
            "preview_width": 64,
            "preview_height": 64,
        },
        timeout=300,
    )
    assert trained.status_code == 200
    assert trained.json() == {"info": f"train hypernetwork complete: filename: {path} error: None"}
    logs = list((server.data_dir / "log").rglob("apihn/hypernetworks/apihn-4.pt"))
    assert logs and list((server.data_dir / "log").rglob("apihn/images/apihn-2.png"))
