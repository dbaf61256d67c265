"""Running out of memory, for real: a server whose data memory is capped (RLIMIT_DATA, set from outside once it has
warmed up) is asked for more than the cap allows. Each time it answers with a message that says what ran out and
what to make smaller, keeps every finished training step, gives the memory back, and serves the next request."""

from __future__ import annotations

import re
import resource

import pytest
import requests
import torch

from app.models.out_of_memory import OutOfMemoryError, guarded, is_out_of_memory
from tests.conftest import make_data_dir, serve
from tests.test_training import make_dataset
from tests.test_training_api import payload

MARGIN = 300 * 2**20  # above the warmed-up server's data size: ample for 64 px work, far too little at 2048 px


def data_size(pid: int) -> int:
    status = open(f"/proc/{pid}/status", encoding="ascii").read()  # noqa: SIM115 - procfs, read at once
    return int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture(scope="module")
def capped(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("oom")
    for srv in serve(make_data_dir(base / "data", model_store), ["--api"], base / "server.log", "/sdapi/v1/sd-models"):
        url = f"{srv.url}/sdapi/v1"
        dataset = make_dataset(base / "stars", n=8)
        # warm up every path the tests use at a size that fits, then cap the data memory a little above that
        assert requests.post(f"{url}/txt2img", json=small_request(), timeout=120).status_code == 200
        assert requests.post(f"{url}/create/embedding", json={"name": "warm"}, timeout=30).status_code == 200
        warm = requests.post(f"{url}/train/embedding", json=payload("warm", dataset, steps=2), timeout=300)
        assert warm.json()["info"].endswith("error: None")
        soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_DATA)
        srv.limit = data_size(srv.proc.pid) + MARGIN
        resource.prlimit(srv.proc.pid, resource.RLIMIT_DATA, (srv.limit, hard))
        srv.dataset = dataset
        yield srv
        resource.prlimit(srv.proc.pid, resource.RLIMIT_DATA, (soft, hard))


def small_request(**kw) -> dict:
    return {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1, **kw}


def test_generation_out_of_memory_is_a_clear_error_and_the_next_request_works(capped):
    url = f"{capped.url}/sdapi/v1"
    for _ in range(2):  # the second time shows the first one's memory came back
        big = requests.post(
            f"{url}/txt2img", json=small_request(width=2048, height=2048, batch_size=8, steps=1), timeout=300
        )
        assert big.status_code == 507, big.text
        detail = big.json()["detail"]
        assert detail.startswith("Out of memory while generating 8 images of 2048×2048 (")
        assert f"this process is limited to {capped.limit / 2**30:.1f} GB)" in detail
        assert "Try a smaller batch size or image size" in detail
        ok = requests.post(f"{url}/txt2img", json=small_request(), timeout=120)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert requests.get(f"{url}/memory", timeout=30).status_code == 200


def embedding_step(url: str, name: str) -> int:
    return requests.get(f"{url}/embeddings", timeout=30).json()["loaded"][name]["step"]


def test_training_out_of_memory_in_the_first_step_changes_nothing(capped):
    url = f"{capped.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oomfirst"}, timeout=30).status_code == 200
    path = capped.data_dir / "embeddings" / "oomfirst.pt"
    before = path.read_bytes()
    # 512 px at batch 8: the latents are made one image at a time and fit, the training step does not
    body = payload("oomfirst", capped.dataset, training_width=512, training_height=512, batch_size=8, steps=4)
    info = requests.post(f"{url}/train/embedding", json=body, timeout=300).json()["info"]
    assert "error: Training stopped: out of memory in training step 1 (" in info
    assert "Nothing was changed (oomfirst.pt is still at step 0)" in info
    assert "Try a smaller batch size or training size" in info
    assert path.read_bytes() == before
    assert not path.with_suffix(".optim").exists()
    assert requests.post(f"{url}/txt2img", json=small_request(), timeout=120).status_code == 200


def test_training_out_of_memory_before_the_first_step_changes_nothing(capped, tmp_path):
    url = f"{capped.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oomcache"}, timeout=30).status_code == 200
    path = capped.data_dir / "embeddings" / "oomcache.pt"
    before = path.read_bytes()

    # 40 images at 2048 px do not fit as pictures: refused while the request loads them, before any job
    body = payload("oomcache", make_dataset(tmp_path / "many", n=40), training_width=2048, training_height=2048)
    refused = requests.post(f"{url}/train/embedding", json=body, timeout=300)
    assert refused.status_code == 507, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith("Out of memory while loading the training images at 2048×2048 (")
    assert detail.endswith("Nothing was changed. Try a smaller training size, or fewer or smaller images.")

    # one image fits as a picture; the VAE runs out while it encodes it for the latent cache
    body = payload("oomcache", make_dataset(tmp_path / "one", n=1), training_width=2048, training_height=2048)
    info = requests.post(f"{url}/train/embedding", json=body, timeout=300).json()["info"]
    assert "error: Out of memory while preparing to train 'oomcache' (" in info
    assert "Nothing was changed." in info
    assert path.read_bytes() == before
    assert requests.post(f"{url}/txt2img", json=small_request(), timeout=120).status_code == 200


def test_training_out_of_memory_in_a_preview_keeps_the_steps_done_and_resumes(capped):
    url = f"{capped.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oompreview"}, timeout=30).status_code == 200
    # steps 1-2 train at 64 px; the preview after step 2 is asked at 2048 px and runs out
    body = payload(
        "oompreview",
        capped.dataset,
        steps=4,
        create_image_every=2,
        save_embedding_every=0,
        preview_from_txt2img=True,
        preview_prompt="a star",
        preview_steps=1,
        preview_width=2048,
        preview_height=2048,
    )
    info = requests.post(f"{url}/train/embedding", json=body, timeout=300).json()["info"]
    assert "error: Training stopped: out of memory in the preview image after step 2 (" in info
    assert "The embedding is saved at step 2: train again to continue from there." in info
    assert "Try a smaller preview size" in info
    assert embedding_step(url, "oompreview") == 2
    assert (capped.data_dir / "embeddings" / "oompreview.optim").is_file()  # the resume stays exact

    again = requests.post(f"{url}/train/embedding", json=payload("oompreview", capped.dataset, steps=4), timeout=300)
    assert again.json()["info"].endswith("error: None")
    assert embedding_step(url, "oompreview") == 4
    log = capped.log_path.read_text()
    assert "Resuming embedding 'oompreview' at step 2 with its optimizer state" in log


def test_recognises_each_device_s_out_of_memory_error():
    cuda_text = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.02 GiB "
        "is free. Including non-PyTorch memory, this process has 6.75 GiB memory in use."
    )
    cpu_text = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. Error code 12"
    assert is_out_of_memory(torch.OutOfMemoryError(cuda_text))
    assert is_out_of_memory(RuntimeError(cpu_text))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert is_out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN, seen under the cap above
    assert not is_out_of_memory(RuntimeError("could not create a primitive descriptor for a convolution forward"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocation failures, not any text

    for error, asked in ((torch.OutOfMemoryError(cuda_text), "2.00 GiB"), (RuntimeError(cpu_text), "1.00 GB")):

        def fail(error=error):
            raise error

        with pytest.raises(OutOfMemoryError) as caught:
            guarded(torch.device("cpu"), fail, "doing it", "Do less.")
        message = str(caught.value)
        assert message.startswith(f"Out of memory while doing it (it tried to allocate {asked}; system memory: ")
        assert message.endswith("). Do less.")
        assert caught.value.__context__ is None and caught.value.__cause__ is None  # holds no failed frames

    with pytest.raises(ValueError, match="not memory"):
        guarded(torch.device("cpu"), lambda: (_ for _ in ()).throw(ValueError("not memory")))
