"""Mixed precision and activation checkpointing in training, proven on the CPU with the real tiny model.

The frozen model is cast to fp16/bf16 here (on the CPU the app keeps fp32 unless --bf16 asks), so the same code
that runs on a GPU in half precision — autocast, the GradScaler, fp32 master tensors — runs under test.
"""

from __future__ import annotations

import copy
import re
import resource
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from app.embeddings.formats import read_embedding_file
from app.errors import UserError
from app.hypernetworks.attention import attention_widths
from app.models.manager import LoadedModel, choose_dtypes, cpu_has_native_bf16
from app.models.out_of_memory import allocation_can_fail
from app.prompts.encoder import PromptEncoder
from app.settings import Settings
from app.training.config import TrainConfig
from app.training.dataset import load_dataset
from app.training.loop import all_finite, train
from app.training.losses import denoising_loss
from app.training.precision import (
    MAX_SKIPPED_IN_A_ROW,
    Checkpointing,
    MixedPrecision,
    activation_checkpointing,
    checkpointing_mode,
)
from app.training.targets import EmbeddingTarget, HypernetworkTarget
from app.training.templates import read_template
from tests.test_training import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stars-precision"))


def half_model(services, dtype: torch.dtype) -> LoadedModel:
    """A copy of the loaded model with the UNet and text encoder in `dtype` (the VAE stays fp32, as --no-half-vae)."""
    model = services.models.get()
    pipe = copy.deepcopy(model.pipe)
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, services.embeddings.db.find_embedding)
    return LoadedModel(model.info, pipe, model.device, dtype, torch.float32, encoder)


def new_embedding(services, name: str):
    path = services.embeddings.create(name, 2, "orange circle", overwrite=True)
    path.with_suffix(".optim").unlink(missing_ok=True)
    services.embeddings.db.refresh()
    return services.embeddings.db.get(name)


def embedding_grad(services, model, name: str, amp: MixedPrecision, latent: int, divide: int, checkpointing=False):
    """The embedding's gradient for one fixed batch of 4 (latents `latent`x`latent`), loss divided by `divide`
    as gradient accumulation does; unscaled when `amp` scales."""
    target = EmbeddingTarget(services.embeddings.db.get(name), model, services.embeddings.db)
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 4, latent, latent, generator=g) for _ in range(2))
    t = torch.tensor([10, 200, 600, 999])
    noisy = DDPMScheduler.from_config(model.pipe.scheduler.config).add_noise(x0, noise, t)
    with activation_checkpointing(model.pipe.unet, checkpointing), target.unet_context():
        loss = denoising_loss(target, model.pipe.unet, amp, ["a photo of " + name] * 4, noisy, t, noise, 1)
        amp.backward(loss / divide)
    amp.unscale(torch.optim.AdamW([target.vectors]))
    return target.vectors.grad.clone()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# -- activation checkpointing ----------------------------------------------------------------------------------


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # recompute may stop early
    return calls


def test_checkpointed_embedding_gradients_equal_plain_ones_and_layers_do_run_twice(services):
    model = services.models.get()
    new_embedding(services, "zqckpt")
    amp = MixedPrecision(model.device, torch.float32)
    plain = embedding_grad(services, model, "zqckpt", amp, 8, 1, checkpointing=False)
    # A resnet after the first cross-attention (before it nothing needs a gradient, so nothing is recomputed) runs
    # twice; CLIP's layers are not checkpointed (77-token activations are small, their recompute is not), so once.
    resnet = model.pipe.unet.up_blocks[-1].resnets[0]
    clip_layer = getattr(model.pipe.text_encoder, "text_model", model.pipe.text_encoder).encoder.layers[0].self_attn
    unet_calls, clip_calls = count_forwards(resnet), count_forwards(clip_layer)
    checkpointed = embedding_grad(services, model, "zqckpt", amp, 8, 1, checkpointing=True)
    # Forward once, recomputed once in backward: checkpointing really ran, in the UNet only.
    assert unet_calls[0] == 2 and clip_calls[0] == 1
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert float(plain.abs().sum()) > 0
    # Everything is as it was after the run.
    assert not model.pipe.unet.is_gradient_checkpointing and not model.pipe.text_encoder.training


def test_checkpointed_hypernetwork_gradients_equal_plain_ones_with_dropout(services):
    model = services.models.get()
    path, _ = services.hypernetworks.create(
        "zqckpthn",
        sorted(attention_widths(model.pipe.unet)),
        "1, 2, 1",
        "relu",
        "XavierNormal",
        use_dropout=True,
        dropout_structure="0, 0.3, 0",
        overwrite=True,
    )
    amp = MixedPrecision(model.device, torch.float32)
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
    t = torch.tensor([50, 700])
    noisy = DDPMScheduler.from_config(model.pipe.scheduler.config).add_noise(x0, noise, t)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        target = HypernetworkTarget(path, model, services.training.stack)
        assert target.random_forward  # dropout: each checkpoint must replay the RNG state
        with activation_checkpointing(model.pipe.unet, checkpointing, True), target.unet_context():
            torch.manual_seed(5)  # dropout masks: the recompute must replay the same ones
            loss = denoising_loss(target, model.pipe.unet, amp, ["a star"] * 2, noisy, t, noise, 1)
            loss.backward()
        return [p.grad.clone() for p in target.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) > 0 and any(float(p.abs().sum()) > 0 for p in plain)
    for a, b in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_auto_checkpointing_starts_off_only_where_running_out_is_an_error_the_run_sees(services):
    """`auto` trains without checkpointing only where an allocation failure reaches the run (a GPU; system memory
    only under an rlimit: otherwise the kernel's OOM killer ends the process), and turns it on after a failed step.
    The run itself, under a real memory cap: tests/test_out_of_memory.py."""
    unet = services.models.get().pipe.unet
    assert allocation_can_fail(torch.device("cuda"))  # only the device's type is read: no GPU is touched
    assert not allocation_can_fail(torch.device("mps"))  # shares system memory, may swap before it fails
    capped = any(resource.getrlimit(r)[0] != resource.RLIM_INFINITY for r in (resource.RLIMIT_DATA, resource.RLIMIT_AS))
    assert allocation_can_fail(torch.device("cpu")) == capped

    for mode, can_recover, starts_on in (
        ("auto", False, True),
        ("auto", True, False),
        ("on", True, True),
        (True, True, True),
        ("off", False, False),
        (False, True, False),
    ):
        checkpointing = Checkpointing(unet, mode, False, can_recover)
        try:
            assert checkpointing.on == starts_on == unet.is_gradient_checkpointing, (mode, can_recover)
            assert checkpointing.can_turn_on == (mode == "auto" and not starts_on)
            if checkpointing.can_turn_on:
                checkpointing.turn_on(3)
                assert unet.is_gradient_checkpointing and checkpointing.turned_on_at == 3
                assert not checkpointing.can_turn_on
        finally:
            checkpointing.close()
        assert not unet.is_gradient_checkpointing
    assert [checkpointing_mode(v) for v in (" Auto", "OFF", True, False)] == ["auto", "off", "on", "off"]
    with pytest.raises(UserError, match="must be one of auto, on, off") as caught:
        checkpointing_mode("sometimes")
    assert caught.value.field == "gradient_checkpointing"


# -- fp16 / bf16 gradients -------------------------------------------------------------------------------------


def test_fp16_needs_the_loss_scaler_and_bf16_does_not(services):
    """A 512 px batch of 4 on the tiny model (64x64 latents) with the loss divided as 1024-step accumulation does:
    per-element gradients as small as a full-size model's. Measured: plain fp16 flushes the whole embedding
    gradient to zero; with the scaler it points the same way as fp32; bf16 keeps fp32's range without scaling."""
    model = services.models.get()
    new_embedding(services, "zqamp")
    reference = embedding_grad(services, model, "zqamp", MixedPrecision(model.device, torch.float32), 64, 1024)
    assert float(reference.abs().max()) > 0

    fp16 = half_model(services, torch.float16)
    scaled = embedding_grad(services, fp16, "zqamp", MixedPrecision(fp16.device, torch.float16), 64, 1024)
    assert cosine(scaled, reference) >= 0.99
    plain_amp = MixedPrecision(fp16.device, torch.float16)
    plain_amp.scaler = None
    unscaled = embedding_grad(services, fp16, "zqamp", plain_amp, 64, 1024)
    assert float((unscaled == 0).float().mean()) > 0.99  # underflowed: "training runs but learns nothing"

    bf16 = half_model(services, torch.bfloat16)
    amp = MixedPrecision(bf16.device, torch.bfloat16)
    assert amp.scaler is None
    assert cosine(embedding_grad(services, bf16, "zqamp", amp, 64, 1024), reference) >= 0.99


def test_trained_vectors_stay_fp32_master_copies_on_a_half_model(services):
    fp16 = half_model(services, torch.float16)
    target = EmbeddingTarget(new_embedding(services, "zqmaster"), fp16, services.embeddings.db)
    assert target.vectors.dtype == torch.float32 and fp16.pipe.unet.dtype == torch.float16


# -- whole runs in half precision --------------------------------------------------------------------------------


def run(services, model, name, dataset, tmp_path, steps, **extra):
    cfg = TrainConfig(
        name=name,
        data_root=str(dataset),
        training_width=64,
        training_height=64,
        steps=steps,
        save_every=0,
        create_image_every=0,
        template_filename="subject_filewords.txt",
        learn_rate=extra.pop("learn_rate", "0.005"),
        seed=3,
        batch_size=2,
        extra=extra,
    )
    templates = read_template(services.settings.templates_dir, cfg.template_filename, True)
    images, _ = load_dataset(cfg.data_root, 64, 64, templates, 3)
    services.embeddings.db.refresh()
    target = EmbeddingTarget(services.embeddings.db.get(name), model, services.embeddings.db)
    return train(target, model, cfg, images, templates, tmp_path / "log", 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_run_stopped_and_resumed_equals_a_straight_run(services, dataset, tmp_path, dtype):
    model = half_model(services, dtype)
    initial = new_embedding(services, "zqhalf").vectors.clone()
    # fp16 starts at a scale that overflows a few times, so the resumed half depends on the saved scaler state.
    scale = {"initial_loss_scale": 2.0**26} if dtype == torch.float16 else {}
    path = new_embedding(services, "zqhalf").path
    straight = run(services, model, "zqhalf", dataset, tmp_path, 8, **scale)
    assert straight.error is None and straight.step == 8
    expected = read_embedding_file(path).vectors

    new_embedding(services, "zqhalf")
    first = run(services, model, "zqhalf", dataset, tmp_path, 4, **scale)
    assert first.step == 4
    stored = torch.load(path.with_suffix(".optim"), weights_only=True)
    if dtype == torch.float16:
        assert first.skipped_steps >= 1  # the scale did change before the stop
        assert stored["scaler_state_dict"]["scale"] < 2.0**26
    else:
        assert "scaler_state_dict" not in stored
    second = run(services, model, "zqhalf", dataset, tmp_path, 8, **scale)
    assert second.step == 8 and second.error is None
    resumed = read_embedding_file(path).vectors
    assert torch.equal(resumed, expected)
    assert not torch.equal(resumed, initial)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_one_bad_element_among_many_tensors(bad, dtype):
    tensors = [torch.randn(4, 320, dtype=dtype) for _ in range(64)]
    assert all_finite(tensors) and all_finite([]) and all_finite(t for t in tensors)
    tensors[37][3, 111] = bad
    assert not all_finite(tensors)
    assert not all_finite(t for t in tensors)  # a generator, as the loop passes the gradients


def test_all_finite_takes_mixed_dtypes_empty_tensors_and_huge_finite_values():
    tensors = [torch.randn(8), torch.randn(8).half(), torch.empty(0), torch.full((4,), 3e38)]
    assert all_finite(tensors)  # 3e38 is finite in fp32 (a norm-2 check would overflow on it)
    tensors[1][2] = float("nan")
    assert not all_finite(tensors)
    assert all_finite([torch.empty(0)])


def test_fp16_overflow_on_every_step_stops_after_a_bounded_number_of_skips(services, dataset, tmp_path):
    model = half_model(services, torch.float16)
    path = new_embedding(services, "zqoverflow").path
    before = read_embedding_file(path).vectors
    result = run(services, model, "zqoverflow", dataset, tmp_path, 1000, initial_loss_scale=2.0**120)
    assert result.error is not None and f"overflowed on {MAX_SKIPPED_IN_A_ROW} steps in a row" in result.error
    assert "last good embedding is kept" in result.error
    assert result.skipped_steps == MAX_SKIPPED_IN_A_ROW and result.step == MAX_SKIPPED_IN_A_ROW - 1
    assert torch.equal(read_embedding_file(path).vectors, before)  # no update ever happened


def test_fp16_overflow_that_recovers_is_not_a_nan_stop(services, dataset, tmp_path):
    model = half_model(services, torch.float16)
    path = new_embedding(services, "zqrecover").path
    before = read_embedding_file(path).vectors
    result = run(services, model, "zqrecover", dataset, tmp_path, 30, initial_loss_scale=2.0**40)
    assert result.error is None and result.step == 30
    assert 1 <= result.skipped_steps < 30
    assert not torch.equal(read_embedding_file(path).vectors, before)


def test_fp16_absurd_learning_rate_stops_with_the_last_good_file(services, dataset, tmp_path):
    model = half_model(services, torch.float16)
    path = new_embedding(services, "zqhot").path
    result = run(services, model, "zqhot", dataset, tmp_path, 500, learn_rate="1e38")
    assert result.error is not None and result.step < 10
    assert "lower learning rate" in result.error
    saved = read_embedding_file(path)  # the reader refuses NaN/inf: the kept file is a good one
    assert saved.step == result.step and torch.isfinite(saved.vectors).all()


# -- flags -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_bf16_supported(), reason="this GPU has bf16")
def test_bf16_without_hardware_support_is_refused_at_start():
    with pytest.raises(UserError, match="--bf16 needs a GPU with bfloat16 support"):
        choose_dtypes(Settings(bf16=True), torch.device("cuda"))


def test_bf16_on_a_cpu_without_it_in_hardware_is_refused_at_start():
    with pytest.raises(UserError, match="--bf16 on the CPU needs a CPU with bfloat16 in hardware"):
        choose_dtypes(Settings(bf16=True), torch.device("cpu"), cpu_bf16=False)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"bf16": True}, (torch.bfloat16, torch.bfloat16)),
        ({"bf16": True, "no_half_vae": True}, (torch.bfloat16, torch.float32)),
        ({"bf16": True, "no_half": True}, (torch.float32, torch.float32)),
        ({"bf16": True, "precision": "full"}, (torch.float32, torch.float32)),
        ({}, (torch.float32, torch.float32)),
    ],
)
def test_bf16_on_a_cpu_with_it_in_hardware_runs_the_model_in_bf16(flags, expected):
    assert choose_dtypes(Settings(**flags), torch.device("cpu"), cpu_bf16=True) == expected


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_native_bf16_probe_agrees_with_the_cpu_flags():
    flags = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


# -- --medvram ---------------------------------------------------------------------------------------------------


def test_training_under_medvram_offload_runs_with_the_hooks_off_and_restores_them(services, dataset):
    """--medvram's hooks would move the UNet and text encoder between forward and backward; the run takes them off
    and puts them back. (On the CPU the hooks move nothing, so the result must equal a run without them.)"""
    from app.models.manager import model_offloaded
    from tests.test_training import cfg, fresh, vectors

    model = services.models.get()
    path = fresh(services, "zqmedvram")
    services.training.train_embedding(cfg("zqmedvram", dataset, steps=3)).wait()
    plain = vectors(path)

    fresh(services, "zqmedvram")
    model.pipe.enable_model_cpu_offload(device="cpu")
    seen = []
    probe = model.pipe.unet.register_forward_pre_hook(lambda *_: seen.append(model_offloaded(model.pipe)))
    try:
        assert model_offloaded(model.pipe)
        result = services.training.train_embedding(cfg("zqmedvram", dataset, steps=3)).wait()
        assert result.error is None and result.step == 3
        assert seen and not any(seen)  # no offload hook on the UNet while it trained
        assert model_offloaded(model.pipe)  # --medvram's offloading is back afterwards
        assert torch.equal(vectors(path), plain)
    finally:
        probe.remove()
        model.pipe.remove_all_hooks()
    assert not model_offloaded(model.pipe)
