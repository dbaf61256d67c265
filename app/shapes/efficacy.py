"""Does training learn? Textual Inversion and hypernetwork runs on the shipped shapes model, measured.

Used by the efficacy tests, `benchmarks/efficacy.py` and the figures in docs/training-efficacy.md. Everything goes
through the product's own services (embedding creation, the training service on the job thread, txt2img), as the
UI does; only the measuring is done here.

- Textual Inversion learns the held-out colour orange from 8 images of orange shapes captioned without the colour
  ("a <emb> circle on a blue background" is the training prompt). Measured: (a) the denoising loss on 16 other
  orange scenes, with the trained embedding vs. the initial one (init text "red") and vs. a random one;
  (b) the orange share of generated images (`metrics.color_share`) with the embedding vs. with the init text.
- A hypernetwork learns the style "black outlines" from 8 outlined scenes captioned as usual (the style has no
  word). Measured: (a) the denoising loss on 16 other outlined scenes with the trained vs. the freshly created
  hypernetwork vs. none; (b) the dark-pixel share (`metrics.dark_share`) of generated images with vs. without it.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from app.embeddings.formats import read_embedding_file
from app.embeddings.writer import a1111_dict, save_pt, save_sdxl, sdxl_dict
from app.generation.txt2img import Txt2ImgParams
from app.hypernetworks.attention import attention_widths
from app.hypernetworks.files import read_hypernetwork_file
from app.models.default_model import DEFAULT_MODEL_NAME, SHIPPED_MODEL
from app.prompts.extra_networks import ExtraNetworkTag
from app.services import Services, build_services
from app.settings import Settings
from app.shapes.metrics import color_share, dark_share, mean_of
from app.shapes.scenes import COLORS, HELD_OUT_COLOR, HELD_OUT_RGB, Scene, caption, render, sample_scene
from app.training.config import LoraNetwork, PivotalEmbedding, TrainConfig
from app.training.latents import image_tensor

TI_NAME = "zqorange"
TI_INIT = "red"
HN_NAME = "zqoutline"
LORA_OUTLINE = "zqloraoutline"
LORA_COLOUR = "zqloraorange"
PIVOTAL = "zqpivorange"  # the LoRA; its bundled embedding (the trigger word) is PIVOTAL_WORD
PIVOTAL_WORD = "zqpivword"
TI_TEMPLATE = "shapes_filewords.txt"  # shipped: "a [name] [filewords]", the embedding where a colour word goes
HN_TEMPLATE = "hypernetwork.txt"  # shipped, A1111's: "[filewords]", "a photo of [filewords]", ...
TIMESTEPS = (100, 250, 400, 550, 700, 850)
GEN = dict(steps=20, sampler_name="Euler a", cfg_scale=7.0, width=64, height=64, save_images=False)


@dataclass
class EfficacyResult:
    kind: str  # "embedding" or "hypernetwork"
    steps: int
    train_seconds: float
    loss: dict[str, float]  # held-out denoising loss per variant
    share: dict[str, float]  # concept measure of generated images per variant ("reference": real renders)
    images: dict[str, list[Image.Image]] = field(default_factory=dict)


def make_services(work: Path, model_dir: Path = SHIPPED_MODEL) -> Services:
    """Services over a fresh data dir in `work` holding a copy of a shapes model (shipped templates), selected."""
    ckpt = work / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / model_dir.name).exists():
        shutil.copytree(model_dir, ckpt / model_dir.name)
    services = build_services(Settings(data_dir=work))
    if model_dir.name != DEFAULT_MODEL_NAME:
        services.select_checkpoint(model_dir.name)
    return services


def _write_dataset(folder: Path, scenes: list[Scene], words: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(zip(scenes, words, strict=True)):
        render(scene).save(folder / f"{i:02d}-{text}.png")
    return folder


def concept_scenes(seed: int, n: int) -> list[Scene]:
    """Single orange shapes on base-colour backgrounds."""
    rng = random.Random(seed)
    return [replace(sample_scene(rng, colors=(HELD_OUT_COLOR,)), count=1, position="in the center") for _ in range(n)]


def style_scenes(seed: int, n: int) -> list[Scene]:
    """Base scenes drawn with black outlines."""
    rng = random.Random(seed)
    return [sample_scene(rng, colors=tuple(COLORS), outline=True) for _ in range(n)]


def ti_words(scene: Scene) -> str:
    return caption(scene, color_word="", article=False)


@torch.no_grad()
def heldout_loss(services: Services, prompts: list[str], images: list[Image.Image], networks=()) -> float:
    """Mean epsilon-prediction MSE over images x fixed timesteps x fixed noise: the training objective, measured on
    images the run never saw. `networks` are (hypernetwork, multiplier) pairs active in the UNet."""
    model = services.models.get()
    vae, unet = model.pipe.vae, model.pipe.unet
    scheduler = model.pipe.scheduler
    alphas = scheduler.alphas_cumprod
    cond, pooled = model.encoder.encode_with_pooled(prompts)
    cond = cond.to(model.dtype)
    added = None
    if pooled is not None:  # SDXL: the pooled prompt and the size conditioning of a 64x64 uncropped image
        size = [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(prompts)
        added = {"text_embeds": pooled.to(model.dtype), "time_ids": torch.tensor(size, dtype=model.dtype)}
    pixels = torch.stack([image_tensor(im) for im in images]).to(model.device, model.vae_dtype)
    latents = vae.encode(pixels).latent_dist.mean.float() * float(vae.config.scaling_factor)
    g = torch.Generator("cpu").manual_seed(1234)
    losses = []
    with services.training.stack.using(list(networks)):
        for t in TIMESTEPS:
            noise = torch.randn(latents.shape, generator=g)
            a = alphas[t]
            noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(model.device, model.dtype)
            timestep = torch.full((len(images),), t, device=model.device)
            pred = unet(noisy, timestep, encoder_hidden_states=cond, added_cond_kwargs=added).sample.float().cpu()
            losses.append(torch.mean((pred - noise) ** 2).item())
    return mean_of(losses)


def generate_images(services: Services, prompts: list[str], seed: int) -> list[Image.Image]:
    """One image per prompt with the measuring settings `GEN`, seeds `seed`, `seed + 1`, ..."""
    return [
        services.txt2img.generate(Txt2ImgParams(prompt=p, seed=seed + i, **GEN)).images[0]
        for i, p in enumerate(prompts)
    ]


def _embedding_copy(services: Services, source: Path, name: str, vectors: torch.Tensor | None = None) -> None:
    """A copy of the embedding at `source` (or `vectors` in its layout) under another name, step 0."""
    vectors = read_embedding_file(source).side_by_side() if vectors is None else vectors
    model = services.models.get()
    if model.is_xl:
        split = int(model.pipe.text_encoder.config.hidden_size)
        data = sdxl_dict(name, vectors, split, 0, None, None)
        save_sdxl(services.settings.embeddings_dir / f"{name}.safetensors", data)
    else:
        save_pt(services.settings.embeddings_dir / f"{name}.pt", a1111_dict(name, vectors, 0, None, None))


def _train(
    services: Services,
    kind: str,
    name: str,
    data: Path,
    template: str,
    learn_rate: str,
    steps: int,
    seed: int,
    work: Path,
    lora: LoraNetwork = LoraNetwork(),
    bundle: PivotalEmbedding = PivotalEmbedding(),
    embedding_lr: str = "",
) -> float:
    """Train `name` on `data` through the training service (as the UI's Train button does); returns seconds.
    `lora`: what a LoRA is made of; `bundle`: its bundled embedding (pivotal tuning)."""
    cfg = TrainConfig(
        embedding_lr=embedding_lr,
        name=name,
        learn_rate=learn_rate,
        batch_size=4,
        data_root=str(data),
        log_directory=str(work / "log"),
        template_filename=template,
        training_width=64,
        training_height=64,
        steps=steps,
        save_every=0,
        create_image_every=0,
        latent_sampling_method="deterministic",
        seed=seed,
    )
    start = time.perf_counter()
    if kind == "lora":
        result = services.training.train_lora(cfg, lora, bundle).wait()
    else:
        train = services.training.train_embedding if kind == "embedding" else services.training.train_hypernetwork
        result = train(cfg).wait()
    if result.error:
        raise RuntimeError(result.error)
    return time.perf_counter() - start


def run_embedding(
    services: Services, work: Path, steps: int, seed: int = 1, learn_rate: str = "0.02"
) -> EfficacyResult:
    """Create and train the orange embedding for `steps` steps; measure it against its start and a random one."""
    tag = f"{TI_NAME}{steps}"
    initial = services.embeddings.create(tag, num_vectors=1, init_text=TI_INIT, overwrite=True)
    initial.with_suffix(".optim").unlink(missing_ok=True)
    _embedding_copy(services, initial, f"{tag}init")
    pipe = services.models.get().pipe
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    g = torch.Generator("cpu").manual_seed(seed)
    random_parts = []
    for encoder in encoders:  # each part drawn like its own token table
        table = encoder.get_input_embeddings().weight.detach().float()
        random_parts.append(torch.randn((1, table.shape[1]), generator=g) * table.std() + table.mean())
    _embedding_copy(services, initial, f"{tag}random", torch.cat(random_parts, dim=1))

    train_scenes = concept_scenes(seed * 100 + 1, 8)
    data = _write_dataset(work / f"ti-data-{steps}", train_scenes, [ti_words(s) for s in train_scenes])
    seconds = _train(services, "embedding", tag, data, TI_TEMPLATE, learn_rate, steps, seed, work)
    services.embeddings.refresh()

    held = concept_scenes(seed * 100 + 2, 16)
    held_images = [render(s) for s in held]
    loss = {
        variant: heldout_loss(services, [f"a {name} {ti_words(s)}" for s in held], held_images)
        for variant, name in (("trained", tag), ("initial", f"{tag}init"), ("random", f"{tag}random"))
    }
    shown = concept_scenes(seed * 100 + 3, 8)
    prompts = {
        "trained": [f"a {tag} {ti_words(s)}" for s in shown],
        "init text": [f"a {TI_INIT} {ti_words(s)}" for s in shown],
    }
    images, share = _colour_images(services, prompts, shown, seed)
    return EfficacyResult("embedding", steps, seconds, loss, share, images)


def run_hypernetwork(
    services: Services, work: Path, steps: int, seed: int = 1, learn_rate: str = "0.002"
) -> EfficacyResult:
    """Create and train the outline hypernetwork for `steps` steps; measure it against its start and none.

    The learning rate is far above A1111's default (0.00001, tuned for SD's 320-1280-wide layers): this model's
    layers are 32-64 wide and the run is a few hundred steps (0.0002 learns the loss but barely shows outlines)."""
    tag = f"{HN_NAME}{steps}"
    widths = sorted(attention_widths(services.models.get().pipe.unet))
    path, _ = services.hypernetworks.create(tag, enable_sizes=widths, layer_structure="1, 2, 1", overwrite=True)
    initial = read_hypernetwork_file(path)

    train_scenes = style_scenes(seed * 100 + 11, 8)
    data = _write_dataset(work / f"hn-data-{steps}", train_scenes, [caption(s) for s in train_scenes])
    seconds = _train(services, "hypernetwork", tag, data, HN_TEMPLATE, learn_rate, steps, seed, work)
    trained = read_hypernetwork_file(path)

    held = style_scenes(seed * 100 + 12, 16)
    prompts = [caption(s) for s in held]
    held_images = [render(s) for s in held]
    device = services.models.get().device
    loss = {
        "trained": heldout_loss(services, prompts, held_images, [(trained.to(device), 1.0)]),
        "initial": heldout_loss(services, prompts, held_images, [(initial.to(device), 1.0)]),
        "none": heldout_loss(services, prompts, held_images),
    }
    images, share = _outline_images(services, seed, f"<hypernet:{tag}:1>")
    return EfficacyResult("hypernetwork", steps, seconds, loss, share, images)


def _colour_images(
    services: Services, prompts: dict[str, list[str]], shown: list, seed: int
) -> tuple[dict[str, list[Image.Image]], dict]:
    """Each variant's prompts generated with the same seeds, real renders of the shown scenes for reference, and
    each row's orange share (the colour experiments' picture measure)."""
    images = {k: generate_images(services, v, seed=seed * 1000) for k, v in prompts.items()}
    images["reference"] = [render(s) for s in shown]
    return images, {k: mean_of(color_share(im, HELD_OUT_RGB) for im in v) for k, v in images.items()}


def _outline_images(services: Services, seed: int, tag: str) -> tuple[dict[str, list[Image.Image]], dict]:
    """Plain scenes generated with `tag` and without it, outlined renders for reference, and each row's dark share
    (the outline experiments' picture measure)."""
    shown = [replace(s, outline=False) for s in style_scenes(seed * 100 + 13, 8)]
    base_prompts = [caption(s) for s in shown]
    images = {
        "trained": generate_images(services, [f"{p} {tag}" for p in base_prompts], seed=seed * 1000),
        "without": generate_images(services, base_prompts, seed=seed * 1000),
        "reference": [render(replace(s, outline=True)) for s in shown],
    }
    return images, {k: mean_of(dark_share(im) for im in v) for k, v in images.items()}


def _with_lora(services: Services, tag: str):
    """The product's own `<lora:tag:1>` activation, as a context (for measuring the held-out loss)."""
    tags = [ExtraNetworkTag("lora", (tag, "1"), f"<lora:{tag}:1>")]
    activation = services.loras.activate(services.models.get(), tags)
    if activation.notes:
        raise RuntimeError("; ".join(activation.notes))
    return activation.context


def run_lora_outline(
    services: Services, work: Path, steps: int, seed: int = 1, learn_rate: str = "0.005", rank: int = 8
) -> EfficacyResult:
    """The hypernetwork's experiment as a LoRA on the UNet's attention projections: outlines from 8 outlined
    scenes captioned as usual; measured against no LoRA (a new LoRA starts as a no-op: its up half is zero)."""
    tag = f"{LORA_OUTLINE}{steps}"
    train_scenes = style_scenes(seed * 100 + 11, 8)
    data = _write_dataset(work / f"lora-outline-data-{steps}", train_scenes, [caption(s) for s in train_scenes])
    lora = LoraNetwork(rank=rank, alpha=float(rank))
    seconds = _train(services, "lora", tag, data, HN_TEMPLATE, learn_rate, steps, seed, work, lora)
    held = style_scenes(seed * 100 + 12, 16)
    prompts = [caption(s) for s in held]
    held_images = [render(s) for s in held]
    with _with_lora(services, tag):
        trained = heldout_loss(services, prompts, held_images)
    loss = {"trained": trained, "none": heldout_loss(services, prompts, held_images)}
    images, share = _outline_images(services, seed, f"<lora:{tag}:1>")
    return EfficacyResult("lora (outlines)", steps, seconds, loss, share, images)


def run_lora_colour(
    services: Services, work: Path, steps: int, seed: int = 1, learn_rate: str = "0.005", rank: int = 8
) -> EfficacyResult:
    """The embedding's experiment as a LoRA (UNet and text encoder): orange shapes captioned with the word
    "orange", which the base model never saw; measured with the same prompts with and without the LoRA."""
    tag = f"{LORA_COLOUR}{steps}"
    train_scenes = concept_scenes(seed * 100 + 1, 8)
    data = _write_dataset(work / f"lora-colour-data-{steps}", train_scenes, [caption(s) for s in train_scenes])
    lora = LoraNetwork(rank=rank, alpha=float(rank), train_text_encoder=True)
    seconds = _train(services, "lora", tag, data, HN_TEMPLATE, learn_rate, steps, seed, work, lora)
    held = concept_scenes(seed * 100 + 2, 16)
    prompts = [caption(s) for s in held]
    held_images = [render(s) for s in held]
    with _with_lora(services, tag):
        trained = heldout_loss(services, prompts, held_images)
    loss = {"trained": trained, "none": heldout_loss(services, prompts, held_images)}
    shown = concept_scenes(seed * 100 + 3, 8)
    base_prompts = [caption(s) for s in shown]
    variants = {"trained": [f"{p} <lora:{tag}:1>" for p in base_prompts], "without": base_prompts}
    images, share = _colour_images(services, variants, shown, seed)
    return EfficacyResult("lora (colour)", steps, seconds, loss, share, images)


def run_lora_pivotal(
    services: Services,
    work: Path,
    steps: int,
    seed: int = 1,
    learn_rate: str = "0.005",
    embedding_lr: str = "0.02",
    rank: int = 8,
) -> EfficacyResult:
    """The colour as a trigger word: a UNet LoRA trained on "a <word> circle ..." with the word a bundled embedding
    (pivotal tuning, initialised from "red" as the embedding experiment's), against the same LoRA whose word is
    plain text (the LoRA's own name, tokens the model never learned). Measured with `<lora:...:1>` and the word."""
    train_scenes = concept_scenes(seed * 100 + 1, 8)
    data = _write_dataset(work / f"pivotal-data-{steps}", train_scenes, [ti_words(s) for s in train_scenes])
    pivotal, plain = f"{PIVOTAL}{steps}", f"{PIVOTAL}{steps}plain"
    bundle = PivotalEmbedding(name=PIVOTAL_WORD, vectors=1, init_text=TI_INIT)
    lora = LoraNetwork(rank=rank, alpha=float(rank))
    seconds = _train(
        services, "lora", pivotal, data, TI_TEMPLATE, learn_rate, steps, seed, work, lora, bundle, embedding_lr
    )
    _train(services, "lora", plain, data, TI_TEMPLATE, learn_rate, steps, seed, work, lora)
    held = concept_scenes(seed * 100 + 2, 16)
    held_images = [render(s) for s in held]
    loss = {}
    for variant, tag, word in (("trained", pivotal, PIVOTAL_WORD), ("plain word", plain, plain)):
        with _with_lora(services, tag):
            loss[variant] = heldout_loss(services, [f"a {word} {ti_words(s)}" for s in held], held_images)
    loss["none"] = heldout_loss(services, [f"a {TI_INIT} {ti_words(s)}" for s in held], held_images)
    shown = concept_scenes(seed * 100 + 3, 8)
    prompts = {
        "trained": [f"a {PIVOTAL_WORD} {ti_words(s)} <lora:{pivotal}:1>" for s in shown],
        "plain word": [f"a {plain} {ti_words(s)} <lora:{plain}:1>" for s in shown],
        "init text": [f"a {TI_INIT} {ti_words(s)}" for s in shown],
    }
    images, share = _colour_images(services, prompts, shown, seed)
    return EfficacyResult("lora + bundled embedding (colour)", steps, seconds, loss, share, images)


def grid(rows: dict[str, list[Image.Image]], scale: int = 2) -> Image.Image:
    """Rows of images (one row per variant, in the dict's order), each image scaled up `scale` times."""
    cols = max(len(v) for v in rows.values())
    size = 64 * scale
    sheet = Image.new("RGB", (cols * size, len(rows) * size), (255, 255, 255))
    for r, images in enumerate(rows.values()):
        for c, im in enumerate(images):
            sheet.paste(im.resize((size, size), Image.Resampling.NEAREST), (c * size, r * size))
    return sheet
