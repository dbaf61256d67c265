"""Real Textual Inversion training on the tiny model: files, resume bit for bit, NaN guard, accumulation."""

from __future__ import annotations

import hashlib
import logging
import threading

import pytest
import torch
from PIL import Image, ImageDraw

from app.embeddings.formats import read_embedding_file
from app.errors import UserError
from app.generation.infotext import parse_infotext
from app.generation.txt2img import Txt2ImgParams
from app.settings import Settings
from app.training.config import TrainConfig
from app.training.service import TrainingService


def make_dataset(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (72, 80), (40 * i, 200, 90))
        ImageDraw.Draw(im).regular_polygon((36, 40, 25), 5, fill=(250, 220, 0))
        im.save(folder / f"{i:02d}-a yellow star.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stars"))


@pytest.fixture(scope="module")
def templates(services):
    """The shipped templates (A1111 keeps them beside the program, not in the data dir)."""
    assert (services.settings.templates_dir / "subject_filewords.txt").is_file()
    return services.settings.templates_dir


def cfg(name, dataset, **kw) -> TrainConfig:
    base = dict(
        name=name,
        data_root=str(dataset),
        training_width=64,
        training_height=64,
        steps=10,
        save_every=0,
        create_image_every=0,
        template_filename="subject_filewords.txt",
        learn_rate="0.005",
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def fresh(services, name, n=2, init="star"):
    path = services.embeddings.create(name, n, init, overwrite=True)
    path.with_suffix(".optim").unlink(missing_ok=True)
    return path


def vectors(path):
    return read_embedding_file(path).vectors


def interrupt_at(services, job, step: int):
    """Interrupt a training job once it has done `step` steps (or has ended); its result."""
    event = threading.Event()
    while not job.finished and job.progress.sampling_step < step:
        event.wait(0.001)
    services.jobs.interrupt(job)
    return job.wait()


def state_hash(module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_training_writes_checkpoints_previews_loss_log_and_settings(services, dataset, templates):
    path = fresh(services, "zqtrain")
    model = services.models.get()
    before = {name: state_hash(getattr(model.pipe, name)) for name in ("unet", "text_encoder", "vae")}
    initial = vectors(path)
    result = services.training.train_embedding(
        cfg("zqtrain", dataset, steps=12, save_every=4, create_image_every=4)
    ).wait()
    assert result.error is None and result.step == 12 and not result.interrupted
    log_dir = result.log_dir
    assert log_dir.parent.name == __import__("datetime").date.today().isoformat()
    assert sorted(p.name for p in (log_dir / "embeddings").iterdir()) == [
        "zqtrain-12.pt",
        "zqtrain-4.pt",
        "zqtrain-8.pt",
    ]
    assert read_embedding_file(log_dir / "embeddings" / "zqtrain-8.pt").step == 8
    preview = log_dir / "images" / "zqtrain-4.png"
    with Image.open(preview) as image:
        assert "sd-ti-embedding" in image.info and "parameters" in image.info
        assert "TI hashes" in image.info["parameters"] or "zqtrain" in image.info["parameters"]
    assert read_embedding_file(preview).name == "zqtrain-4"
    rows = (log_dir / "textual_inversion_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate"
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 13))
    assert all(r.split(",")[4] == "0.005" for r in rows[1:])
    assert (log_dir / "settings.json").is_file()
    # The main file moved on, carries the model's hash, and only the embedding changed.
    saved = read_embedding_file(path)
    assert saved.step == 12
    assert saved.sd_checkpoint == model.info.short_hash and saved.sd_checkpoint_name == model.info.model_name
    assert not torch.equal(saved.vectors, initial)
    assert before == {name: state_hash(getattr(model.pipe, name)) for name in ("unet", "text_encoder", "vae")}
    # Usable in txt2img right away.
    image = services.txt2img.generate(
        Txt2ImgParams(prompt="a photo of zqtrain", width=64, height=64, steps=3, save_images=False)
    )
    assert "zqtrain: " in parse_infotext(image.infotexts[0])["TI hashes"]


def test_resume_after_interrupt_is_bitwise_identical(services, dataset, templates):
    path = fresh(services, "zqresume")
    services.training.train_embedding(cfg("zqresume", dataset, steps=14)).wait()
    straight = vectors(path)

    fresh(services, "zqresume")
    first = interrupt_at(services, services.training.train_embedding(cfg("zqresume", dataset, steps=14)), 4)
    assert first.interrupted and 4 <= first.step < 14
    assert read_embedding_file(path).step == first.step
    second = services.training.train_embedding(cfg("zqresume", dataset, steps=14)).wait()
    assert second.step == 14 and not second.interrupted
    assert torch.equal(vectors(path), straight)


def test_split_run_without_interrupt_equals_straight_run(services, dataset, templates):
    path = fresh(services, "zqsplit")
    services.training.train_embedding(cfg("zqsplit", dataset, steps=8, latent_sampling_method="random")).wait()
    straight = vectors(path)
    fresh(services, "zqsplit")
    services.training.train_embedding(cfg("zqsplit", dataset, steps=5, latent_sampling_method="random")).wait()
    services.training.train_embedding(cfg("zqsplit", dataset, steps=8, latent_sampling_method="random")).wait()
    assert torch.equal(vectors(path), straight)


def test_optimizer_state_of_other_weights_is_ignored_with_a_warning(services, dataset, templates, caplog):
    path = fresh(services, "zqstale")
    services.training.train_embedding(cfg("zqstale", dataset, steps=3)).wait()
    optim = path.with_suffix(".optim").read_bytes()
    fresh(services, "zqstale", init="moon")  # other vectors at step 0 ...
    path.with_suffix(".optim").write_bytes(optim)  # ... beside the old run's optimizer state
    with caplog.at_level(logging.WARNING):
        result = services.training.train_embedding(cfg("zqstale", dataset, steps=2)).wait()
    assert result.error is None
    assert "belongs to other weights" in caplog.text


def test_nan_loss_stops_at_once_and_keeps_the_last_good_embedding(services, dataset, templates):
    path = fresh(services, "zqnan")
    result = services.training.train_embedding(cfg("zqnan", dataset, steps=50, learn_rate="1e38")).wait()
    assert result.error is not None
    assert "NaN" in result.error or "nan" in result.error or "inf" in result.error
    assert "lower learning rate" in result.error
    assert result.step < 50
    saved = read_embedding_file(path)  # raises if the file held NaN (the reader refuses NaN)
    assert saved.step == result.step


def test_gradient_accumulation_matches_a_bigger_batch(services, dataset, templates):
    path = fresh(services, "zqaccum")
    services.training.train_embedding(cfg("zqaccum", dataset, steps=3, batch_size=4, gradient_step=1)).wait()
    big_batch = vectors(path)
    fresh(services, "zqaccum")
    services.training.train_embedding(cfg("zqaccum", dataset, steps=3, batch_size=2, gradient_step=2)).wait()
    torch.testing.assert_close(vectors(path), big_batch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(data_root="/no/such/folder"), "does not exist"),
        (dict(template_filename="hypernetwork.txt"), "never uses \\[name\\]"),
        (dict(template_filename="missing.txt"), "not found"),
        (dict(learn_rate="0.01:oops"), "'0.01:oops'"),
        (dict(training_width=100), "multiple of 8"),
        (dict(varsize=True, batch_size=2), "needs batch size 1"),
        (dict(latent_sampling_method="sometimes"), "once, deterministic, random"),
        (dict(name="zqnobody"), "not loaded"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(services, dataset, templates, change, message):
    fresh(services, "zqbad")
    with pytest.raises(UserError, match=message):
        services.training.train_embedding(cfg(change.pop("name", "zqbad"), dataset, **change))


def test_max_steps_at_or_below_current_step_is_refused(services, dataset, templates):
    fresh(services, "zqdone")
    services.training.train_embedding(cfg("zqdone", dataset, steps=2)).wait()
    with pytest.raises(UserError, match="already at step 2"):
        services.training.train_embedding(cfg("zqdone", dataset, steps=2))


def test_lowvram_refuses_training_with_a1111s_reason(services, dataset, templates):
    lowvram = TrainingService(
        Settings(data_dir=services.settings.data_dir, lowvram=True),
        services.models,
        services.options,
        services.jobs,
        services.embeddings.db,
        services.txt2img,
    )
    fresh(services, "zqlow")
    with pytest.raises(UserError, match="Training models with lowvram not possible"):
        lowvram.train_embedding(cfg("zqlow", dataset))


def test_switching_checkpoints_during_training_is_refused_with_a_message(services, dataset, templates):
    from app.errors import BusyError
    from app.lora.extract import ExtractOptions

    fresh(services, "zqbusy")
    job = services.training.train_embedding(cfg("zqbusy", dataset, steps=100000))
    event = threading.Event()
    while not job.finished and job.progress.sampling_step < 1:
        event.wait(0.01)
    try:
        with pytest.raises(BusyError, match="training run"):
            services.select_checkpoint(services.models.get().info.title)
        with pytest.raises(BusyError, match="training run"):
            services.select_vae("Automatic")
        # the LoRA tools read or change the model's weights too, which the run has wrapped for training
        with pytest.raises(BusyError, match="extract a LoRA after it ends"):
            services.extract_lora("shapes-64", "", "zqbusyx", ExtractOptions())
        with pytest.raises(BusyError, match="merge LoRAs after it ends"):
            services.merge_to_lora("<lora:x:1>", "zqbusym", ExtractOptions())
        with pytest.raises(BusyError, match="merge LoRAs into a checkpoint after it ends"):
            services.merge_lora("<lora:x:1>", "zqbusyc")
    finally:
        services.jobs.interrupt(job)
        job.wait(30)


def test_png_embeddings_are_refused_for_training_before_anything_starts(services, dataset, templates):
    from app.embeddings.writer import a1111_dict, save_png

    folder = services.settings.embeddings_dir
    save_png(
        folder / "zqpicture.png",
        Image.new("RGB", (8, 8)),
        a1111_dict("zqpicture", torch.zeros(1, services.models.get().text_width), 0, None, None),
    )
    services.embeddings.refresh()
    with pytest.raises(UserError, match=r"training saves \.pt or \.safetensors"):
        services.training.train_embedding(cfg("zqpicture", dataset))


def test_use_weight_follows_the_alpha_channel(services, templates, tmp_path):
    from app.training.latents import LatentCache

    folder = tmp_path / "alpha"
    folder.mkdir()
    for i in range(2):
        im = Image.new("RGBA", (64, 64), (200, 40 * i, 90, 255))
        ImageDraw.Draw(im).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 0))  # left half transparent
        im.save(folder / f"{i}-half.png")
    model = services.models.get()
    from app.training.dataset import load_dataset

    images, _ = load_dataset(folder, 64, 64, ["[name]"], seed=0)
    cache = LatentCache(model.pipe.vae, [im.image for im in images], "once", 0, model.device)
    weight = cache.loss_weight(images[0].alpha, 0)
    assert weight.shape == cache.means[0].shape
    assert weight.min() == 0 and abs(float(weight.mean()) - 1) < 1e-5
    assert float(weight[:, :, 0].max()) == 0 and float(weight[:, :, -1].min()) > 1  # transparent left, opaque right
    assert torch.equal(cache.loss_weight(None, 0), torch.ones_like(weight))

    fresh(services, "zqweight")
    services.training.train_embedding(cfg("zqweight", folder, steps=4, use_weight=True)).wait()
    weighted = vectors(services.settings.embeddings_dir / "zqweight.pt")
    fresh(services, "zqweight")
    services.training.train_embedding(cfg("zqweight", folder, steps=4, use_weight=False)).wait()
    assert not torch.equal(weighted, vectors(services.settings.embeddings_dir / "zqweight.pt"))


def test_use_weight_on_opaque_images_changes_nothing(services, dataset, templates):
    path = fresh(services, "zqopaque")
    services.training.train_embedding(cfg("zqopaque", dataset, steps=4, use_weight=True)).wait()
    weighted = vectors(path)
    fresh(services, "zqopaque")
    services.training.train_embedding(cfg("zqopaque", dataset, steps=4)).wait()
    torch.testing.assert_close(vectors(path), weighted)
