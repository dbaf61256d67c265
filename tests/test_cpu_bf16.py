"""`--bf16` on a CPU with bfloat16 in hardware: the app runs the model in bf16 for generation and every kind of
training, and its results stay close to fp32's (the whole point is speed: docs/benchmarks.md, "bf16 on the CPU").

Runs only where the CPU has bf16 in hardware; elsewhere `--bf16` is refused at start (tests/test_training_precision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.embeddings.formats import read_embedding_file
from app.generation.txt2img import Txt2ImgParams
from app.logs import quiet_libraries
from app.models.manager import cpu_has_native_bf16
from app.services import build_services
from app.settings import Settings
from tests.conftest import make_data_dir
from tests.test_hypernetworks import fresh_hn, hn_cfg
from tests.test_training import cfg, fresh, make_dataset

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bfloat16 in hardware")


@pytest.fixture(scope="module")
def bf16_services(tmp_path_factory, model_store):
    quiet_libraries()
    data = make_data_dir(tmp_path_factory.mktemp("bf16"), model_store)
    return build_services(Settings(data_dir=data, bf16=True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stars-bf16"))


def image(services, seed: int, prompt: str = "a red circle") -> np.ndarray:
    params = Txt2ImgParams(prompt=prompt, width=64, height=64, steps=8, seed=seed, save_images=False)
    return np.asarray(services.txt2img.generate(params).images[0], dtype=np.float32)


def test_the_model_is_loaded_in_bf16_and_its_images_match_fp32s(services, bf16_services):
    pipe = bf16_services.models.get().pipe
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    ours, fp32, other_seed = image(bf16_services, 5), image(services, 5), image(services, 6)
    # Rounding changes pixels a little; it must not change the picture: much nearer the same seed in fp32 than
    # another seed is (measured: 0.39 vs 30 mean |difference| out of 255; 0.4-2.8 vs 9-32 over 3 seeds).
    assert np.abs(ours - fp32).mean() < 0.25 * np.abs(other_seed - fp32).mean()


def test_embedding_training_in_bf16_learns_what_fp32_learns(services, bf16_services, dataset):
    deltas = []
    for svc in (services, bf16_services):
        path = fresh(svc, "zqbf16")
        start = read_embedding_file(path).vectors
        result = svc.training.train_embedding(cfg("zqbf16", dataset, steps=8)).wait()
        assert result.error is None and result.step == 8
        trained = read_embedding_file(path)
        assert trained.vectors.dtype == torch.float32 and torch.isfinite(trained.vectors).all()  # fp32 master
        deltas.append((trained.vectors - start).flatten())
    # The same 8 updates from the same start, in bf16 arithmetic: the same direction (measured cosine 0.997).
    assert torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0) >= 0.98


def test_hypernetwork_training_in_bf16_runs_and_changes_the_image(bf16_services, dataset):
    path = fresh_hn(bf16_services, "zqbf16hn")
    result = bf16_services.training.train_hypernetwork(hn_cfg("zqbf16hn", dataset, steps=4, save_every=0)).wait()
    assert result.error is None and result.step == 4 and path.is_file()
    plain = image(bf16_services, 7)
    shaped = image(bf16_services, 7, "a red circle <hypernet:zqbf16hn:1>")
    assert all(np.isfinite(loss) for _, loss in result.losses) and not np.array_equal(plain, shaped)
