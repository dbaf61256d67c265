"""SDXL on a tiny SDXL-layout model: our loop against diffusers' SDXL pipeline, single files, clip_l/clip_g
embeddings, hypernetworks on the 2048-style context, and what is refused."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from app.generation.samplers import build_scheduler
from app.generation.txt2img import Txt2ImgParams
from app.models.ldm_export import export_sdxl, meta_pipeline
from app.models.single_file import CONFIG_DIR, detect

PARAMS = dict(
    prompt="a red circle",
    negative_prompt="blurry",
    width=64,
    height=64,
    steps=6,
    seed=5,
    sampler_name="Euler",
    save_images=False,
)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_loop_matches_diffusers_sdxl_pipeline(xl):
    model = xl.models.get()
    assert model.is_xl and model.text_width == 96
    ours = xl.txt2img.generate(Txt2ImgParams(**PARAMS)).images[0]
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **{
            **model.pipe.components,
            "scheduler": build_scheduler("Euler", "Automatic", dict(model.pipe.scheduler.config)),
        }
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond, pooled = model.encoder.encode_with_pooled(["a red circle"])
        uncond, upooled = model.encoder.encode_with_pooled(["blurry"])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    reference = pipe(
        prompt_embeds=cond,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=uncond,
        negative_pooled_prompt_embeds=upooled,
        latents=noise,
        num_inference_steps=6,
        guidance_scale=7.0,
        height=64,
        width=64,
    ).images[0]
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_single_file_matches_the_folder_and_hires_works(xl):
    xl.select_checkpoint("tinyxl-folder")
    folder = pixels(xl.txt2img.generate(Txt2ImgParams(**PARAMS)).images[0])
    xl.select_checkpoint("tinyxl.safetensors")
    assert np.abs(folder - pixels(xl.txt2img.generate(Txt2ImgParams(**PARAMS)).images[0])).max() <= 1
    hires = xl.txt2img.generate(Txt2ImgParams(**{**PARAMS, "enable_hr": True, "hr_scale": 1.5}))
    assert hires.images[0].size == (96, 96)
    xl.select_checkpoint("tinyxl-folder")


def test_clip_l_clip_g_embeddings_work_and_sd1_ones_are_skipped(xl):
    folder = xl.settings.embeddings_dir
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(1)),
        "clip_g": torch.randn(2, 64, generator=torch.Generator().manual_seed(2)),
    }
    save_file(parts, str(folder / "xlemb.safetensors"))
    torch.save({"emb_params": torch.randn(1, 768)}, folder / "sd15emb.pt")
    xl.embeddings.refresh()
    listing = xl.embeddings.listing()
    assert listing["loaded"]["xlemb"]["vectors"] == 2 and listing["loaded"]["xlemb"]["shape"] == 96
    assert "768 wide but the loaded model needs 96" in listing["skipped"]["sd15emb"]["reason"]
    model = xl.models.get()
    # Reference: diffusers' own SDXL prompt encoding, on copies of both text encoders where two ordinary word
    # tokens carry the embedding's clip_l and clip_g rows.
    tokenizer = model.pipe.tokenizer
    words = []
    for token_id in range(40000, 41000):
        word = tokenizer.convert_ids_to_tokens(token_id)
        if word.endswith("</w>") and tokenizer(word[:-4], add_special_tokens=False)["input_ids"] == [token_id]:
            words.append((token_id, word[:-4]))
        if len(words) == 2:
            break
    import copy

    from diffusers import StableDiffusionXLPipeline

    te1, te2 = copy.deepcopy(model.pipe.text_encoder), copy.deepcopy(model.pipe.text_encoder_2)
    with torch.no_grad():
        for row, (token_id, _) in enumerate(words):
            te1.get_input_embeddings().weight[token_id] = parts["clip_l"][row]
            te2.get_input_embeddings().weight[token_id] = parts["clip_g"][row]
        reference, _, pooled_ref, _ = StableDiffusionXLPipeline(
            **{**model.pipe.components, "text_encoder": te1, "text_encoder_2": te2}
        ).encode_prompt("a " + " ".join(w for _, w in words), device="cpu", do_classifier_free_guidance=False)
        ours, pooled = model.encoder.encode_with_pooled(["a xlemb"])
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(pooled, pooled_ref)
    result = xl.txt2img.generate(Txt2ImgParams(**{**PARAMS, "prompt": "a xlemb"}))
    assert 'TI hashes: "xlemb: ' in result.infotexts[0]


def test_hypernetwork_applies_on_the_sdxl_context(xl):
    _, warnings = xl.hypernetworks.create("xlhn", [96, 32, 64], "1, 2, 1", "relu", "XavierNormal")
    assert warnings == []
    plain = pixels(xl.txt2img.generate(Txt2ImgParams(**PARAMS)).images[0])
    with_hn = xl.txt2img.generate(Txt2ImgParams(**{**PARAMS, "prompt": "a red circle <hypernet:xlhn:1>"}))
    assert with_hn.notes == [] and not np.array_equal(plain, pixels(with_hn.images[0]))


def test_full_size_sdxl_layout_is_detected():
    header = {k: tuple(v.shape) for k, v in export_sdxl(meta_pipeline(CONFIG_DIR / "sdxl")).items()}
    assert detect(header, "sd_xl_base_1.0.safetensors").name == "sdxl"
