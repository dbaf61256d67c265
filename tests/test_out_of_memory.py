"""Running out of memory, for real: a server whose data memory is capped (RLIMIT_DATA, set from outside once it has
warmed up) is asked for more than the cap allows. Each time it answers with a message that says what ran out and
what to make smaller, keeps every finished training step, gives the memory back, and serves the next request."""

from __future__ import annotations

import errno
import re
import resource
from contextlib import contextmanager

import pytest
import requests
import torch

from app.models.out_of_memory import OutOfMemoryError, guarded, is_out_of_memory, smaller_advice
from tests.conftest import make_data_dir, serve
from tests.test_training import make_dataset
from tests.test_training_api import payload

CHECKPOINTING_MARGIN_MB = 260  # passes from 200 to 320 MB here


def data_size(pid: int) -> int:
    status = open(f"/proc/{pid}/status", encoding="ascii").read()  # noqa: SIM115 - procfs, read at once
    return int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024


@contextmanager
def capped_at(server, margin_mb: int):
    """Cap the server's data memory at `margin_mb` above what it holds now; lifted afterwards."""
    soft, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_DATA)
    server.limit = data_size(server.proc.pid) + margin_mb * 2**20
    resource.prlimit(server.proc.pid, resource.RLIMIT_DATA, (server.limit, hard))
    try:
        yield
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_DATA, (soft, hard))


@pytest.fixture(scope="module")
def warm(tmp_path_factory, model_store):
    """A server that has run every path the tests use at a size that fits (so its caps measure from there)."""
    base = tmp_path_factory.mktemp("oom")
    data = make_data_dir(base / "data", model_store)
    # glibc gives blocks of 64 KB and more back to the system when they are freed, so the data size the caps start
    # from is what the server holds, not what it held at its peak
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    for srv in serve(data, ["--api"], base / "server.log", "/sdapi/v1/sd-models", env):
        url = f"{srv.url}/sdapi/v1"
        srv.dataset = make_dataset(base / "stars", n=8)
        assert requests.post(f"{url}/txt2img", json=small_request(), timeout=120).status_code == 200
        assert requests.post(f"{url}/create/embedding", json={"name": "warm"}, timeout=30).status_code == 200
        done = requests.post(f"{url}/train/embedding", json=payload("warm", srv.dataset, steps=2), timeout=300)
        assert done.json()["info"].endswith("error: None")
        yield srv


def small_request(**kw) -> dict:
    return {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1, **kw}


def test_generation_out_of_memory_is_a_clear_error_and_the_next_request_works(warm):
    url = f"{warm.url}/sdapi/v1"
    with capped_at(warm, 300):
        for _ in range(2):  # the second time shows that the first one's memory came back
            big = requests.post(
                f"{url}/txt2img", json=small_request(width=2048, height=2048, batch_size=8, steps=1), timeout=300
            )
            assert big.status_code == 507, big.text
            detail = big.json()["detail"]
            assert detail.startswith("Out of memory while generating 8 images of 2048×2048 (")
            assert f"this process is limited to {warm.limit / 2**30:.1f} GB)" in detail
            assert "Try a smaller batch size or image size" in detail
            ok = requests.post(f"{url}/txt2img", json=small_request(), timeout=120)
            assert ok.status_code == 200 and len(ok.json()["images"]) == 1
        assert requests.get(f"{url}/memory", timeout=30).status_code == 200


def embedding_step(url: str, name: str) -> int:
    return requests.get(f"{url}/embeddings", timeout=30).json()["loaded"][name]["step"]


def test_training_out_of_memory_in_the_first_step_changes_nothing(warm, tmp_path):
    url = f"{warm.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oomfirst"}, timeout=30).status_code == 200
    path = warm.data_dir / "embeddings" / "oomfirst.pt"
    before = path.read_bytes()
    # 384 px at batch 16: the latents (made one image at a time) fit; the step does not (uncapped, its peak RSS is
    # about 500 MB above the idle server's, against 33 MB for the warm-up's 64 px step)
    dataset = make_dataset(tmp_path / "sixteen", n=16)
    body = payload("oomfirst", dataset, training_width=384, training_height=384, batch_size=16, steps=4)
    with capped_at(warm, 200):
        info = requests.post(f"{url}/train/embedding", json=body, timeout=300).json()["info"]
        assert requests.post(f"{url}/txt2img", json=small_request(), timeout=120).status_code == 200
    assert "error: Training stopped: out of memory in training step 1 (" in info
    assert "Nothing was changed (oomfirst.pt is still at step 0)" in info
    assert "Try a smaller batch size or training size" in info
    assert path.read_bytes() == before
    assert not path.with_suffix(".optim").exists()


def test_training_out_of_memory_before_the_first_step_changes_nothing(warm, tmp_path):
    url = f"{warm.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oomcache"}, timeout=30).status_code == 200
    path = warm.data_dir / "embeddings" / "oomcache.pt"
    before = path.read_bytes()
    many = payload("oomcache", make_dataset(tmp_path / "many", n=40), training_width=2048, training_height=2048)
    one = payload("oomcache", make_dataset(tmp_path / "one", n=1), training_width=2048, training_height=2048)
    with capped_at(warm, 300):
        # 40 pictures at 2048 px (12 MB each) do not fit: refused while the request loads them, before any job
        refused = requests.post(f"{url}/train/embedding", json=many, timeout=300)
        # one picture fits; the VAE runs out while it encodes it for the latent cache
        info = requests.post(f"{url}/train/embedding", json=one, timeout=300).json()["info"]
    assert refused.status_code == 507, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith("Out of memory while loading the training images at 2048×2048 (")
    assert detail.endswith("Nothing was changed. Try a smaller training size, or fewer or smaller images.")
    assert "error: Out of memory while preparing to train 'oomcache' (" in info
    assert "Nothing was changed." in info
    assert path.read_bytes() == before


def test_training_out_of_memory_in_a_preview_keeps_the_steps_done_and_resumes(warm):
    url = f"{warm.url}/sdapi/v1"
    assert requests.post(f"{url}/create/embedding", json={"name": "oompreview"}, timeout=30).status_code == 200
    # steps 1-2 train at 64 px (a few MB); the preview after step 2 is asked at 2048 px
    body = payload(
        "oompreview",
        warm.dataset,
        steps=4,
        create_image_every=2,
        save_embedding_every=0,
        preview_from_txt2img=True,
        preview_prompt="a star",
        preview_steps=1,
        preview_width=2048,
        preview_height=2048,
    )
    with capped_at(warm, 100):  # the 2048 px UNet pass outgrows this in its first blocks
        info = requests.post(f"{url}/train/embedding", json=body, timeout=300).json()["info"]
    assert "error: Training stopped: out of memory in the preview image after step 2 (" in info
    assert "The embedding is saved at step 2: train again to continue from there." in info
    assert "Try a smaller preview size" in info
    assert embedding_step(url, "oompreview") == 2
    assert (warm.data_dir / "embeddings" / "oompreview.optim").is_file()  # so the resume stays exact

    again = requests.post(f"{url}/train/embedding", json=payload("oompreview", warm.dataset, steps=4), timeout=300)
    assert again.json()["info"].endswith("error: None")
    assert embedding_step(url, "oompreview") == 4
    assert "Resuming embedding 'oompreview' at step 2 with its optimizer state" in warm.log_path.read_text()


def test_auto_checkpointing_turns_on_when_a_step_runs_out_and_trains_as_if_it_had_been_on(warm, tmp_path):
    """`auto` starts without gradient checkpointing where running out is an error the run sees (here: the cap is an
    rlimit). The cap is set between a 384 px batch-8 step's need without checkpointing and with it (uncapped, peak
    RSS about 320 and 155 MB above the idle server's)."""
    url = f"{warm.url}/sdapi/v1"
    dataset = make_dataset(tmp_path / "eight", n=8)
    body = dict(training_width=384, training_height=384, batch_size=8, steps=2, create_image_every=0)
    names = ("oomauto", "oomon", "oomoff")
    for name in names:
        assert requests.post(f"{url}/create/embedding", json={"name": name}, timeout=30).status_code == 200
    off_before = (warm.data_dir / "embeddings" / "oomoff.pt").read_bytes()
    with capped_at(warm, CHECKPOINTING_MARGIN_MB):
        off = requests.post(
            f"{url}/train/embedding", json=payload("oomoff", dataset, gradient_checkpointing="off", **body), timeout=300
        ).json()["info"]
        auto = requests.post(f"{url}/train/embedding", json=payload("oomauto", dataset, **body), timeout=300)
    on = requests.post(
        f"{url}/train/embedding", json=payload("oomon", dataset, gradient_checkpointing=True, **body), timeout=300
    )
    # off: the step does not fit under this cap, and the message says what would have helped
    assert "error: Training stopped: out of memory in training step 1 (" in off
    assert "gradient checkpointing on, " in off
    assert (warm.data_dir / "embeddings" / "oomoff.pt").read_bytes() == off_before
    # auto: the same step ran out, was done again with checkpointing, and the run finished
    assert auto.json()["info"].endswith("error: None"), auto.text
    assert "Step 1 ran out of memory without gradient checkpointing: turned it on" in warm.log_path.read_text()
    assert embedding_step(url, "oomauto") == 2
    # ... and its result is the run that had checkpointing on from the start: the failed attempt left nothing behind
    assert on.json()["info"].endswith("error: None")
    trained = {n: torch.load(warm.data_dir / "embeddings" / f"{n}.pt", weights_only=True) for n in names[:2]}
    assert torch.equal(trained["oomauto"]["string_to_param"]["*"], trained["oomon"]["string_to_param"]["*"])


def test_recognises_each_device_s_out_of_memory_error():
    cuda_text = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.02 GiB "
        "is free. Including non-PyTorch memory, this process has 6.75 GiB memory in use."
    )
    cpu_text = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. Error code 12"
    assert is_out_of_memory(torch.OutOfMemoryError(cuda_text))
    assert is_out_of_memory(RuntimeError(cpu_text))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_out_of_memory(RuntimeError("unable to mmap 6750184 bytes from file <x>: Cannot allocate memory (12)"))
    assert not is_out_of_memory(OSError(errno.ENOENT, "No such file or directory"))
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


def test_the_advice_names_the_flag_that_would_help():
    cuda = torch.device("cuda")  # only a device value here: no GPU is touched
    assert "--medvram (or --lowvram)" in smaller_advice(cuda)
    assert "--lowvram" in smaller_advice(cuda, "model") and "--medvram" not in smaller_advice(cuda, "model")
    assert smaller_advice(cuda, "sequential") == "close other programs that use the GPU"
    # training keeps the whole model on the GPU under --medvram, and --lowvram refuses it: no flag helps there
    assert smaller_advice(cuda, None, training=True) == "close other programs that use the GPU"
