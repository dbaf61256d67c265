"""Training on SD 2.x: the 768 px models predict the velocity, not the noise, and their OpenCLIP encoder is wider.

A tiny SD 2.x-layout model (OpenCLIP-style text encoder, linear projections), exported to the original single-file
layout with the `.yaml` beside it that marks it as a v model, as A1111 users keep theirs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from app.errors import UserError
from app.hypernetworks.files import read_hypernetwork_file
from app.training.config import LoraNetwork
from app.training.losses import denoising_target
from tests.conftest import make_data_dir
from tests.test_training import cfg, fresh, make_dataset, vectors


@pytest.fixture(scope="module")
def sd2(tmp_path_factory, model_store):
    from safetensors.torch import save_file

    from app.models.default_model import build_tiny_sd2_pipeline
    from app.models.ldm_export import export_sd2
    from app.services import build_services
    from app.settings import Settings

    data = make_data_dir(tmp_path_factory.mktemp("sd2"), model_store)
    ckpt = data / "models" / "Stable-diffusion"
    save_file(export_sd2(build_tiny_sd2_pipeline()), str(ckpt / "tiny2v.safetensors"))
    (ckpt / "tiny2v.yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    services = build_services(Settings(data_dir=data, no_hashing=True))
    services.select_checkpoint("tiny2v.safetensors")
    return services


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stars"))


def test_velocity_target_gives_back_the_clean_latent_and_the_noise():
    """v = sqrt(a) * noise - sqrt(1 - a) * x0, so sqrt(a) * x_t - sqrt(1 - a) * v is x0 again and
    sqrt(1 - a) * x_t + sqrt(a) * v the noise: checked through the scheduler's own noising, at several steps."""
    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule.register_to_config(prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=generator)
    t = torch.tensor([1, 400, 600, 999])
    v = denoising_target(schedule, x0, noise, t)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * noisy + a.sqrt() * v, noise, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v, noise, atol=0.1)

    schedule.register_to_config(prediction_type="epsilon")
    assert denoising_target(schedule, x0, noise, t) is noise
    schedule.register_to_config(prediction_type="sample")
    assert denoising_target(schedule, x0, noise, t) is x0


def test_embedding_on_a_v_model_has_the_wide_encoders_vectors_and_learns_the_velocity(sd2, dataset):
    model = sd2.models.get()
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    first = {}
    for prediction in ("v_prediction", "epsilon"):
        path = fresh(sd2, f"zqsd2{prediction[0]}", n=2)
        model.pipe.scheduler.register_to_config(prediction_type=prediction)
        try:
            result = sd2.training.train_embedding(cfg(path.stem, dataset, steps=4, save_every=2)).wait()
        finally:
            model.pipe.scheduler.register_to_config(prediction_type="v_prediction")
        assert result.error is None and result.step == 4
        first[prediction] = result.losses[0][1]
        trained = vectors(path)
        assert trained.shape == (2, model.text_width) and torch.isfinite(trained).all()
        assert path.with_suffix(".optim").is_file()
    # Same seed, same data, same first draws: only the target differs, and the loop used the model's own.
    assert first["v_prediction"] != pytest.approx(first["epsilon"], rel=1e-3)


def test_hypernetwork_and_lora_train_on_a_v_model(sd2, dataset):
    from app.hypernetworks.attention import attention_widths

    unet = sd2.models.get().pipe.unet
    widths = sorted(attention_widths(unet))
    sd2.hypernetworks.create("zqsd2hn", widths, "1, 2, 1")
    result = sd2.training.train_hypernetwork(
        cfg("zqsd2hn", dataset, steps=3, learn_rate="0.0001", template_filename="hypernetwork.txt")
    ).wait()
    assert result.error is None and result.step == 3
    written = read_hypernetwork_file(sd2.settings.hypernetwork_dir / "zqsd2hn.pt")
    assert sorted(written.widths) == widths and written.step == 3

    result = sd2.training.train_lora(
        cfg("zqsd2lora", dataset, steps=3, learn_rate="0.0001", template_filename="hypernetwork.txt"),
        LoraNetwork(rank=4, alpha=4.0),
    ).wait()
    assert result.error is None and result.step == 3
    with safe_open(str(sd2.settings.lora_dir / "zqsd2lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys)


def test_an_unknown_prediction_type_is_refused_before_anything_is_written(sd2, dataset):
    path = fresh(sd2, "zqsd2flow")
    before = path.read_bytes()
    scheduler = sd2.models.get().pipe.scheduler
    scheduler.register_to_config(prediction_type="flow_prediction")
    try:
        with pytest.raises(UserError, match="flow_prediction"):
            sd2.training.train_embedding(cfg("zqsd2flow", dataset, steps=2, save_every=1)).wait()
    finally:
        scheduler.register_to_config(prediction_type="v_prediction")
    assert path.read_bytes() == before
    assert not path.with_suffix(".optim").exists()
    assert not list(sd2.settings.log_dir.glob("*/zqsd2flow"))
