"""kohya's training options on the real tiny model: the LR scheduler, Min-SNR weighting (`min_snr_gamma`), the
noise offset (`noise_offset`), multi-resolution noise (`multires_noise_iterations`/`_discount`), input
perturbation (`ip_noise_gamma`), the loss types (`loss_type`, `huber_schedule`, `huber_c`, `huber_scale`),
debiased estimation, the timestep range (`min_timestep`/`max_timestep`) and their ranges. Each is checked against
its definition on a real training step, and runs with them resume bit for bit."""

from __future__ import annotations

import csv

import pytest
import requests
import torch
from diffusers import DDPMScheduler

from app.errors import UserError
from app.training.loop import pyramid_noise
from app.training.losses import debiased_weights, elementwise_loss, huber_thresholds, min_snr_weights
from app.training.lr_schedule import rate_factor
from tests.test_lora_training import tensors
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
        ("loss_type", "l3", "Loss type must be one of l2, l1, huber, smooth_l1, got 'l3'"),
        ("huber_schedule", "cosine", "Huber schedule must be one of snr, exponential, constant"),
        ("huber_c", 0.0, "Huber c must be above 0 and at most 1"),
        ("huber_c", float("nan"), "Huber c must be above 0"),
        ("huber_scale", 11.0, "Huber scale must be above 0 and at most 10"),
        ("min_timestep", -1, "0 <= min timestep < max timestep <= 1000 .* got -1 and 1000"),
        ("min_timestep", 1000, "0 <= min timestep < max timestep"),
        ("max_timestep", 1001, "0 <= min timestep < max timestep <= 1000 .* got 0 and 1001"),
        ("max_timestep", 0, "0 <= min timestep < max timestep"),
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


# -- kohya's loss types, debiased estimation and timestep range -------------------------------------------------------


def test_huber_thresholds_follow_kohya_s_schedules(services):
    schedule = DDPMScheduler.from_config(services.models.get().pipe.scheduler.config)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(huber_thresholds(schedule, t, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    exponential = huber_thresholds(schedule, t, "exponential", 0.1, 2.0)
    # scale at t = 0, c * scale at t = T (here 999/1000 of the way), c^(1/2) * scale half way
    torch.testing.assert_close(exponential, 2.0 * 0.1 ** (t.double() / 1000).float())
    snr = huber_thresholds(schedule, t, "snr", 0.1, 2.0)  # the scale does not enter it, as in kohya
    alpha_bar = schedule.alphas_cumprod.double()[t]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    torch.testing.assert_close(snr, ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).float())
    assert 0.9 < float(snr[0]) <= 1 and 0.1 < float(snr[-1]) < 0.11  # near the MSE when clean, c when noisy


def test_each_loss_type_is_its_definition_with_the_limits_a_person_expects():
    g = torch.Generator().manual_seed(0)
    pred, wanted = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    d = pred - wanted
    torch.testing.assert_close(elementwise_loss(pred, wanted, "l2"), d**2)
    torch.testing.assert_close(elementwise_loss(pred, wanted, "l1"), d.abs())
    c = torch.tensor([0.5, 2.0])  # one threshold per sample
    huber = elementwise_loss(pred, wanted, "huber", c)
    smooth = elementwise_loss(pred, wanted, "smooth_l1", c)
    for i, ci in enumerate((0.5, 2.0)):
        torch.testing.assert_close(huber[i], 2 * ci * ((d[i] ** 2 + ci**2).sqrt() - ci))
        torch.testing.assert_close(smooth[i], huber[i] / ci)
    # a large threshold is nearly the MSE; a tiny one nearly 2|d| (smooth L1) and 2c|d| (Huber)
    # (in float64: in fp32, sqrt(d^2 + c^2) - c cancels away at c = 1000)
    wide = elementwise_loss(pred.double(), wanted.double(), "huber", torch.full((2,), 1e3))
    torch.testing.assert_close(wide, d.double() ** 2, rtol=1e-3, atol=1e-5)
    narrow = elementwise_loss(pred, wanted, "smooth_l1", torch.full((2,), 1e-4))
    torch.testing.assert_close(narrow, 2 * d.abs(), rtol=0, atol=3e-4)
    with pytest.raises(ValueError, match="needs a threshold"):
        elementwise_loss(pred, wanted, "huber")


def test_debiased_weights_follow_kohya_for_each_prediction_type(services):
    config = services.models.get().pipe.scheduler.config
    t = torch.tensor([0, 10, 400, 999])
    for prediction, expected in (
        ("epsilon", lambda snr: 1 / snr.sqrt()),
        ("v_prediction", lambda snr: 1 / (snr + 1)),
        ("sample", lambda snr: snr.sqrt()),
    ):
        schedule = DDPMScheduler.from_config(config, prediction_type=prediction)
        alpha_bar = schedule.alphas_cumprod.double()[t]
        snr = (alpha_bar / (1 - alpha_bar)).clamp(max=1000)  # kohya caps it: at t = 0 it is in the thousands
        torch.testing.assert_close(debiased_weights(schedule, t).double(), expected(snr), rtol=1e-6, atol=0)
    eps = debiased_weights(DDPMScheduler.from_config(config), t)
    assert float(eps[0]) == pytest.approx(1000**-0.5, rel=1e-6) and float(eps[-1]) > 10  # noisy steps count most


def test_the_loss_types_change_a_real_step_s_loss_as_defined(services, dataset):
    _, t, plain = first_step(services, "zqlosstype", dataset)
    _, t_l1, l1 = first_step(services, "zqlosstype", dataset, loss_type="l1")
    _, t_smooth, smooth = first_step(
        services, "zqlosstype", dataset, loss_type="smooth_l1", huber_schedule="constant", huber_c=1e-4
    )
    assert torch.equal(t, t_l1) and torch.equal(t, t_smooth)  # the same sample, noise and timestep
    assert smooth == pytest.approx(2 * l1, rel=1e-3)  # smooth L1 at a tiny threshold is 2|d|
    assert l1 != pytest.approx(plain, rel=0.05)
    # Huber with a threshold of 10 (c 1 x scale 10) is nearly the MSE; with kohya's default (snr, 0.1) far less
    _, _, wide = first_step(
        services, "zqlosstype", dataset, loss_type="huber", huber_schedule="constant", huber_c=1.0, huber_scale=10.0
    )
    assert wide == pytest.approx(plain, rel=0.02) and wide < plain
    _, _, default = first_step(services, "zqlosstype", dataset, loss_type="huber")
    assert default < 0.9 * plain


def test_debiased_estimation_scales_the_step_s_loss_by_its_timestep_s_weight(services, dataset):
    _, t, plain = first_step(services, "zqdebias", dataset)
    _, t_debiased, weighted = first_step(services, "zqdebias", dataset, debiased_estimation_loss=True)
    assert torch.equal(t, t_debiased)
    schedule = DDPMScheduler.from_config(services.models.get().pipe.scheduler.config)
    assert weighted == pytest.approx(plain * float(debiased_weights(schedule, t.cpu())[0]), rel=1e-5)


def test_the_timestep_range_bounds_the_timesteps_drawn(services, dataset):
    _, t, _ = first_step(services, "zqtimestep", dataset, min_timestep=500, max_timestep=501)
    assert t.tolist() == [500]
    fresh(services, "zqtimestep")
    seen = []
    unet = services.models.get().pipe.unet
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1][0])))
    try:
        run = cfg("zqtimestep", dataset, steps=12, min_timestep=200, max_timestep=300, create_image_every=0)
        assert services.training.train_embedding(run).wait().error is None
    finally:
        handle.remove()
    assert len(seen) == 12 and all(200 <= x < 300 for x in seen) and len(set(seen)) > 6


def test_a_run_with_kohya_s_loss_types_resumes_bit_for_bit(services, dataset):
    options = dict(steps=10, loss_type="huber", debiased_estimation_loss=True, min_timestep=100, max_timestep=900)
    path = fresh(services, "zqhuberresume")
    services.training.train_embedding(cfg("zqhuberresume", dataset, **options)).wait()
    straight = vectors(path)
    fresh(services, "zqhuberresume")
    job = services.training.train_embedding(cfg("zqhuberresume", dataset, **options))
    assert interrupt_at(services, job, 4).interrupted
    services.training.train_embedding(cfg("zqhuberresume", dataset, **options)).wait()
    assert torch.equal(vectors(path), straight)


def test_the_loss_options_through_the_api(server, dataset):
    api = server.url + "/sdapi/v1"
    body = dict(data_root=str(dataset), steps=2, training_width=64, training_height=64, create_image_every=0)
    body.update(lora_name="zqapiloss", rank=2, alpha=2, learn_rate="0.001", template_filename="subject_filewords.txt")
    body.update(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2, huber_scale=2)
    body.update(debiased_estimation_loss=True, min_timestep=100, max_timestep=800)
    answer = requests.post(api + "/train/lora", json=body, timeout=300)
    assert answer.status_code == 200 and answer.json()["info"].endswith("error: None"), answer.text
    path = answer.json()["info"].split("filename: ")[1].split(" error: ")[0]
    meta = tensors(path)[1]
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("smooth_l1", "exponential", "0.2")
    assert (meta["ss_huber_scale"], meta["ss_debiased_estimation"]) == ("2.0", "True")
    for change, field in (({"min_timestep": 900}, "min_timestep"), ({"huber_c": 5}, "huber_c")):
        bad = requests.post(api + "/train/lora", json={**body, **change}, timeout=30)
        assert bad.status_code == 400 and bad.json()["field"] == field, bad.text
    unknown = requests.post(api + "/train/lora", json={**body, "loss_type": "l3"}, timeout=30)
    assert unknown.status_code == 422  # not one of the choices the schema lists
