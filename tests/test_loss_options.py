"""kohya's training options on the real tiny model: the LR scheduler, Min-SNR weighting (`min_snr_gamma`), the
noise offset (`noise_offset`), multi-resolution noise (`multires_noise_iterations`/`_discount`), input
perturbation (`ip_noise_gamma`) and their ranges. Each is checked against its definition on a real training step,
and a run with both loss options resumes bit for bit."""

from __future__ import annotations

import csv

import pytest
import torch
from diffusers import DDPMScheduler

from app.errors import UserError
from app.training.loop import min_snr_weights, pyramid_noise
from app.training.lr_schedule import rate_factor
from tests.test_training import cfg, fresh, interrupt_at, make_dataset, vectors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stars-loss"))


def test_min_snr_weights_follow_the_paper_for_each_prediction_type(services):
    config = services.models.get().pipe.scheduler.config
    t = torch.tensor([1, 50, 400, 999])
    for prediction in ("epsilon", "v_prediction", "sample"):
        schedule = DDPMScheduler.from_config(config, prediction_type=prediction)
        alpha_bar = schedule.alphas_cumprod.double()[t]
        snr = alpha_bar / (1 - alpha_bar)
        weights = min_snr_weights(schedule, t, 5.0).double()
        expected = {
            "epsilon": torch.minimum(snr, torch.tensor(5.0)) / snr,
            "v_prediction": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
            "sample": torch.minimum(snr, torch.tensor(5.0)),
        }[prediction]
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    eps = min_snr_weights(DDPMScheduler.from_config(config, prediction_type="epsilon"), t, 5.0)
    assert eps[0] < 0.01 and float(eps[-1]) == 1.0  # nearly clean steps count least; noisy ones as before


def first_step(services, name, dataset, **kw):
    """The UNet's inputs and the logged loss of step 1 (batch 1) from a fresh embedding."""
    fresh(services, name)
    seen = []
    unet = services.models.get().pipe.unet

    def hook(module, args, kwargs):
        seen.append((args[0].detach().clone(), args[1].detach().clone()))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = services.training.train_embedding(cfg(name, dataset, steps=1, **kw)).wait()
    finally:
        handle.remove()
    assert result.error is None and len(seen) == 1
    noisy, t = seen[0]
    return noisy, t, result.losses[0][1]


def test_min_snr_scales_the_step_s_loss_by_its_timestep_s_weight(services, dataset):
    _, t, plain = first_step(services, "zqsnr", dataset)
    _, t_snr, weighted = first_step(services, "zqsnr", dataset, min_snr_gamma=5.0)
    assert torch.equal(t, t_snr)  # the same sample, noise and timestep
    schedule = DDPMScheduler.from_config(services.models.get().pipe.scheduler.config)
    expected = float(min_snr_weights(schedule, t.cpu(), 5.0)[0])
    assert weighted == pytest.approx(plain * expected, rel=1e-5)


def test_the_noise_offset_shifts_each_channel_by_one_value(services, dataset):
    plain, t, _ = first_step(services, "zqoffset", dataset)
    offset, t_offset, _ = first_step(services, "zqoffset", dataset, noise_offset=0.1)
    assert torch.equal(t, t_offset)
    shift = offset - plain  # = sqrt(1 - alpha_bar_t) * 0.1 * one draw per channel
    per_channel = shift.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-5)
    assert float(per_channel.abs().min()) > 1e-4


def test_pyramid_noise_has_unit_variance_and_coarse_structure():
    g = torch.Generator().manual_seed(3)
    white = torch.randn(4, 64, 64, generator=g)
    noise = pyramid_noise(white, g, 6, 0.3)
    assert float(noise.std()) == pytest.approx(1.0, abs=1e-5)
    # Averaged over 8x8 patches white noise nearly cancels (deviation ~1/8); the coarse levels move whole regions.
    # (At kohya's usual discount 0.3 they weigh little: measured 1.07-1.22x white noise's; at 0.8, 2.4-3.7x.)
    pooled = lambda x: float(torch.nn.functional.avg_pool2d(x[None], 8).std())  # noqa: E731
    coarse = pyramid_noise(white, torch.Generator().manual_seed(4), 6, 0.8)
    assert pooled(coarse) > 2 * pooled(white) and float(coarse.std()) == pytest.approx(1.0, abs=1e-5)
    again = pyramid_noise(white, g, 6, 0.3)
    assert not torch.equal(again, noise)  # a generator further on draws other levels ...
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(pyramid_noise(white, g1, 6, 0.3), pyramid_noise(white, g2, 6, 0.3))  # ... the same, the same


def test_multires_and_input_perturbation_change_the_noise_as_defined(services, dataset):
    plain, t, _ = first_step(services, "zqmulti", dataset)
    multi, t_multi, _ = first_step(services, "zqmulti", dataset, multires_noise_iterations=6)
    ip, t_ip, _ = first_step(services, "zqmulti", dataset, ip_noise_gamma=0.1)
    assert torch.equal(t, t_multi) and torch.equal(t, t_ip)
    alpha_bar = services.models.get().pipe.scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1)
    sigma = (1 - alpha_bar).sqrt()
    # multires: the same sample and timestep, its noise replaced (the noise itself: the pyramid test above)
    difference = (multi.cpu() - plain.cpu()) / sigma  # = multires noise - plain noise
    assert float(difference.abs().max()) > 0.1
    # ip: the input is the plain input plus sigma * gamma * white noise
    extra = (ip.cpu() - plain.cpu()) / (sigma * 0.1)
    assert 0.7 < float(extra.std()) < 1.3 and abs(float(extra.mean())) < 0.3


def test_a_run_with_the_loss_options_resumes_bit_for_bit(services, dataset):
    options = dict(steps=12, min_snr_gamma=5.0, noise_offset=0.05, multires_noise_iterations=6, ip_noise_gamma=0.1)
    path = fresh(services, "zqlossresume")
    services.training.train_embedding(cfg("zqlossresume", dataset, **options)).wait()
    straight = vectors(path)
    fresh(services, "zqlossresume")
    job = services.training.train_embedding(cfg("zqlossresume", dataset, **options))
    assert interrupt_at(services, job, 4).interrupted
    services.training.train_embedding(cfg("zqlossresume", dataset, **options)).wait()
    assert torch.equal(vectors(path), straight)
    fresh(services, "zqlossresume")
    services.training.train_embedding(cfg("zqlossresume", dataset, steps=12)).wait()
    assert not torch.equal(vectors(path), straight)  # the options changed what was learned


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_snr_gamma", -1.0, "Min-SNR gamma must be between 0 \\(off\\) and 100"),
        ("min_snr_gamma", float("nan"), "Min-SNR gamma must be between"),
        ("noise_offset", 2.0, "Noise offset must be between 0 \\(off\\) and 1"),
        ("multires_noise_iterations", 21, "Multires noise iterations must be between 0 \\(off\\) and 20"),
        ("multires_noise_iterations", -1, "Multires noise iterations must be between"),
        ("multires_noise_discount", 0.0, "Multires noise discount must be above 0 and at most 1"),
        ("multires_noise_discount", float("nan"), "Multires noise discount must be above 0"),
        ("ip_noise_gamma", 1.5, "Input perturbation noise \\(ip_noise_gamma\\) must be between 0 \\(off\\) and 1"),
        ("keep_tokens", -1, "Keep tokens must be between 0 and 1000"),
        ("caption_dropout_rate", 1.0, "Caption dropout must be between 0 and 1"),
        ("lr_scheduler", "exponential", "LR scheduler must be one of constant"),
        ("lr_warmup_steps", -5, "Warmup steps must be between 0 and 10000000"),
        ("lr_scheduler_num_cycles", 0, "Cycles must be between 1 and 1000"),
    ],
)
def test_out_of_range_loss_options_are_refused_before_anything_starts(services, dataset, field, value, message):
    fresh(services, "zqlossbad")
    with pytest.raises(UserError, match=message) as caught:
        services.training.train_embedding(cfg("zqlossbad", dataset, **{field: value}))
    assert caught.value.field == field


def test_the_lr_scheduler_sets_each_step_s_rate_and_the_log_shows_it(services, dataset):
    fresh(services, "zqsched")
    run = dict(steps=8, learn_rate="0.01:4, 0.02", lr_scheduler="cosine", lr_warmup_steps=2)
    result = services.training.train_embedding(cfg("zqsched", dataset, **run)).wait()
    assert result.error is None
    with open(result.log_dir / "textual_inversion_loss.csv", encoding="utf-8") as f:
        rates = [float(row["learn_rate"]) for row in csv.DictReader(f)]
    expected = [(0.01 if s < 4 else 0.02) * rate_factor("cosine", s, 8, 2) for s in range(8)]
    assert rates == pytest.approx(expected)
    assert rates[0] < rates[1] < rates[2] and rates[-1] < 0.002  # warmup, then down to almost 0
