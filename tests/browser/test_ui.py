"""The real UI in chromium: generate, interrupt, PNG Info round trip, bad input, offline page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from safetensors import safe_open

from tests.test_out_of_memory import capped_at, warm  # noqa: F401 - `warm` is a fixture used by name

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.browser


def open_ui(page, server):
    page.goto(server.url + "/")
    page.locator("#txt2img_generate").wait_for()


def pick_option(page, dropdown: str, name, exact: bool = False) -> None:
    """Open a dropdown and pick an option; reopen it if an update from the server (the page-load
    event runs concurrently with the test) replaced the choices while it was open."""
    option = page.get_by_role("option", name=name, exact=exact)
    for _ in range(5):
        page.locator(dropdown).click()
        try:
            option.click(timeout=5000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    option.click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def test_generate_shows_image_and_info_and_saves_file(page, server):
    open_ui(page, server)
    page.locator("#txt2img_prompt textarea").fill("a red circle on a blue background")
    page.locator("#txt2img_neg_prompt textarea").fill("blurry")
    page.locator("#txt2img_seed input").fill("42")
    page.locator("#txt2img_generate").click()
    info = page.locator("#generation_info_text")
    info.wait_for()
    text = info.inner_text()
    assert text.startswith("a red circle on a blue background\nNegative prompt: blurry\nSteps: 20, ")
    assert "Seed: 42," in text and "Size: 64x64" in text
    assert page.locator("#txt2img_gallery img").count() >= 1
    saved = list((server.data_dir / "outputs" / "txt2img-images").rglob("*-42-a red circle on a blue background.png"))
    assert saved, "the image was not saved under outputs/txt2img-images/<date>/"
    (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "txt2img.png"), full_page=True)
    # ♻️ puts the used seed back after 🎲 cleared it.
    page.locator("#txt2img_random_seed").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '-1'")
    page.locator("#txt2img_reuse_seed").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '42'")
    assert page.external_requests == []
    footer = page.locator("#footer").inner_text()  # versions and the precision the model runs in, as A1111's
    assert f"torch: {torch.__version__}" in footer and "device: cpu (float32)" in footer, footer


def test_interrupt_button_stops_a_long_run(page, server):
    open_ui(page, server)
    page.locator("#txt2img_prompt textarea").fill("a long run")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_count", 40)
    page.locator("#txt2img_generate").click()
    interrupt = page.locator("#txt2img_interrupt")
    interrupt.wait_for(state="visible")
    page.locator("#progress_bar").wait_for()
    interrupt.click()
    page.locator("#generation_info_text").wait_for(timeout=30000)
    assert "Interrupted" in page.locator("#html_info_txt2img").inner_text()
    page.locator("#txt2img_generate").wait_for(state="visible")
    assert page.locator("#txt2img_gallery img").count() >= 1


def test_too_long_prompt_shows_a_message(page, server):
    open_ui(page, server)
    page.locator("#txt2img_prompt textarea").fill("cat " * 6000)
    page.locator("#txt2img_generate").click()
    error = page.locator("#generation_error")
    error.wait_for()
    assert "Prompt is too long" in error.inner_text()
    # The page still works afterwards.
    page.locator("#txt2img_prompt textarea").fill("cat")
    page.locator("#txt2img_generate").click()
    page.locator("#generation_info_text").wait_for()


def test_png_info_reads_parameters_and_sends_them_to_txt2img(page, server):
    import requests

    body = requests.post(
        f"{server.url}/sdapi/v1/txt2img",
        json=dict(
            prompt="a (green:1.2) star",
            negative_prompt="ugly",
            seed=777,
            steps=7,
            width=72,
            height=64,
            sampler_name="DDIM",
            cfg_scale=5.5,
            save_images=True,
        ),
        timeout=60,
    ).json()
    assert body["images"]
    saved = next((server.data_dir / "outputs" / "txt2img-images").rglob("*-777-a (green 1.2) star.png"))

    open_ui(page, server)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    params = page.locator("#pnginfo_generation_info textarea")
    page.wait_for_function("document.querySelector('#pnginfo_generation_info textarea').value.includes('Seed: 777')")
    assert params.input_value().startswith("a (green:1.2) star\nNegative prompt: ugly\n")
    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a (green:1.2) star'")
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "ugly"
    assert page.locator("#txt2img_seed input").input_value() == "777"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "7"
    assert page.locator("#txt2img_width input[type=number]").input_value() == "72"
    assert re.search(
        "DDIM", page.locator("#txt2img_sampling").inner_text() + page.locator("#txt2img_sampling input").input_value()
    )
    assert page.external_requests == []


def test_create_embedding_in_the_tab_then_click_its_card(page, server):
    open_ui(page, server)
    page.get_by_role("tab", name="Textual Inversion").click()
    page.locator("#train_embedding_name textarea, #train_embedding_name input").first.fill("uiemb")
    page.locator("#train_initialization_text textarea, #train_initialization_text input").first.fill("red circle")
    page.locator("#train_create_embedding").click()
    assert "uiemb.pt" in page.locator("#ti_create_ok").inner_text()
    # The same name again without overwrite: refused, with the reason on the page.
    page.locator("#train_create_embedding").click()
    assert "already exists" in page.locator("#ti_create_error").inner_text()
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a photo of")
    page.locator("#ti_cards").get_by_text("uiemb", exact=True).click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a photo of uiemb'")
    page.locator("#txt2img_generate").click()
    assert 'TI hashes: "uiemb: ' in page.locator("#generation_info_text").inner_text()


def fill_field(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def fill_in_opened_accordion(page, elem_id: str, value) -> None:
    """Fill a field of an accordion just opened: it mounts its fields as it opens, and a value typed while that
    happens can be lost (faster than a person types, but not than a test), so fill until the value took."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    for _ in range(10):
        field.fill(str(value))
        page.wait_for_timeout(200)
        if field.input_value() == str(value):
            return
    assert field.input_value() == str(value), f"{elem_id} did not take {value!r}"


def test_train_an_embedding_from_the_ui_interrupt_and_resume(page, server, tmp_path):
    from tests.test_training import make_dataset

    dataset = make_dataset(tmp_path / "stars")
    open_ui(page, server)
    page.get_by_role("tab", name="Textual Inversion").click()
    fill_field(page, "train_embedding_name", "uitrain")
    page.locator("#train_create_embedding").click()
    page.locator("#ti_create_ok").wait_for()
    page.get_by_role("tab", name="Train").click()
    pick_option(page, "#train_embedding input", "uitrain", exact=True)
    fill_field(page, "train_dataset_directory", dataset)
    fill_field(page, "train_steps", 20)
    fill_field(page, "train_create_image_every", 5)
    fill_field(page, "train_save_embedding_every", 10)
    page.locator("#train_train_embedding").click()
    done = page.locator("#train_result")
    done.wait_for(timeout=60000)
    assert "Training finished at step 20" in done.inner_text()
    page.locator("#ti_train_preview img").wait_for()
    page.locator("#ti_train_loss_plot canvas, #ti_train_loss_plot svg").first.wait_for()
    (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "train_embedding.png"), full_page=True)

    # A long run, interrupted from the page: it stops and saves where it is.
    fill_field(page, "train_steps", 100000)
    page.locator("#train_train_embedding").click()
    page.wait_for_function(
        "(() => { const t = document.querySelector('#ti_train_progress'); "
        "const m = t && t.innerText.match(/step (\\d+)\\//); return m && +m[1] >= 25; })()",
        timeout=60000,
    )
    # Closing the page does not stop training, and a newly opened page shows the running job.
    other = page.context.new_page()
    other.goto(server.url + "/")
    other.get_by_role("tab", name="Textual Inversion").click()
    other.get_by_role("tab", name="Train").click()
    other.wait_for_function(
        "document.querySelector('#ti_train_progress').innerText.includes(\"'uitrain' step\")", timeout=30000
    )
    other.close()
    page.locator("#train_interrupt_training").click()
    page.wait_for_function(
        "document.querySelector('#train_result') && "
        "document.querySelector('#train_result').innerText.includes('interrupted')",
        timeout=60000,
    )
    stopped = int(re.search(r"at step (\d+)", page.locator("#train_result").inner_text()).group(1))
    assert 25 <= stopped < 100000
    # Train again: it resumes from the saved step.
    fill_field(page, "train_steps", stopped + 5)
    page.locator("#train_train_embedding").click()
    page.wait_for_function(
        f"document.querySelector('#train_result') && "
        f"document.querySelector('#train_result').innerText.includes('finished at step {stopped + 5}')",
        timeout=60000,
    )
    assert page.external_requests == []


def test_preprocess_images_from_the_ui(page, server, tmp_path):
    from PIL import Image

    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (300, 120), "orange").save(src / "photo.jpg")
    open_ui(page, server)
    page.get_by_role("tab", name="Textual Inversion").click()
    page.get_by_role("tab", name="Preprocess images").click()
    fill_field(page, "preprocess_src", src)
    fill_field(page, "preprocess_dst", tmp_path / "ready")
    set_number(page, "preprocess_width", 64)
    set_number(page, "preprocess_height", 64)
    page.locator("#preprocess_flip input").check()
    page.locator("#preprocess_run").click()
    assert "2 images written" in page.locator("#preprocess_done").inner_text()
    assert sorted(p.name for p in (tmp_path / "ready").iterdir()) == ["00000-0-photo-flipped.png", "00000-0-photo.png"]
    fill_field(page, "preprocess_dst", src)
    page.locator("#preprocess_run").click()
    assert "outside the source" in page.locator("#preprocess_error").inner_text()


def test_create_a_hypernetwork_and_use_it_from_its_card(page, server):
    open_ui(page, server)
    page.get_by_role("tab", name="Hypernetworks").click()
    fill_field(page, "hypernetwork_name", "uihn")
    page.locator("#create_hypernetwork").click()
    assert "uihn.pt" in page.locator("#hn_create_ok").inner_text()
    page.locator("#create_hypernetwork").click()
    assert "already exists" in page.locator("#hn_create_error").inner_text()
    fill_field(page, "hypernetwork_name", "uibad")
    fill_field(page, "hypernetwork_layer_structure", "1, 0, 1")
    page.locator("#create_hypernetwork").click()
    page.wait_for_function("document.querySelector('#hn_create_error').innerText.includes('zero or negative')")
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#hn_cards").get_by_text("uihn", exact=True).click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a red circle <hypernet:uihn:1>'"
    )
    page.locator("#txt2img_generate").click()
    assert page.locator("#generation_info_text").inner_text().startswith("a red circle <hypernet:uihn:1>")
    assert page.locator(".gen-note").count() == 0


def test_hires_fix_tiling_and_styles_from_the_page(page, server):
    (server.data_dir / "styles.csv").write_text(
        'name,prompt,negative_prompt\ncinematic,"{prompt}, cinematic",dull\n', encoding="utf-8"
    )
    open_ui(page, server)
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    pick_option(page, "#txt2img_styles input", "cinematic")
    page.locator("#txt2img_style_apply").click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a red circle, cinematic'")
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "dull"
    page.locator("#txt2img_tiling input").check()
    page.locator("#txt2img_hr").get_by_text("Hires. fix").click()
    page.locator("#txt2img_enable_hr input").check()
    page.locator("#txt2img_generate").click()
    text = page.locator("#generation_info_text").inner_text()
    assert "Hires upscale: 2" in text and "Hires upscaler: Latent" in text and "Tiling: True" in text
    src = page.locator("#txt2img_gallery img").first.get_attribute("src")
    assert src
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "txt2img_hires.png"), full_page=True)


def test_switch_checkpoint_from_the_dropdown(page, server):
    from safetensors.torch import save_file

    from app.models.default_model import build_default_pipeline
    from app.models.ldm_export import export_sd1

    save_file(
        export_sd1(build_default_pipeline()),
        str(server.data_dir / "models" / "Stable-diffusion" / "uitiny.safetensors"),
    )
    open_ui(page, server)
    page.locator("#refresh_checkpoints").click()
    page.wait_for_function("document.querySelector('#quicksettings_status').innerText.includes('Found 2 checkpoints')")
    pick_option(page, "#sd_model_checkpoint input", "uitiny.safetensors")
    page.wait_for_function(
        "document.querySelector('#quicksettings_status').innerText.includes('Loaded uitiny')", timeout=60000
    )
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#txt2img_generate").click()
    assert "Model: uitiny," in page.locator("#generation_info_text").inner_text()
    pick_option(page, "#sd_model_checkpoint input", re.compile("^shapes-64"))
    page.wait_for_function(
        "document.querySelector('#quicksettings_status').innerText.includes('Loaded shapes-64')", timeout=60000
    )


def test_lora_cards_insert_the_tag_and_list_unusable_files(page, server, services):
    from safetensors.torch import save_file

    from tests.test_lora import kohya_file, make_layers

    folder = server.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    model = services.models.get()  # the same default model the server runs
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=7)), str(folder / "uilora.safetensors"))
    (folder / "uibroken.safetensors").write_bytes(b"\x00" * 40)
    open_ui(page, server)  # the page-load event rescans the folder
    page.locator("#lora_cards").get_by_text("uilora", exact=True).wait_for()
    assert page.locator("#lora_cards").get_by_text("uibroken", exact=True).count() == 0
    page.locator("#lora_skipped summary").click()
    assert "uibroken" in page.locator("#lora_skipped").inner_text()
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#lora_cards").get_by_text("uilora", exact=True).click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a red circle <lora:uilora:1>'"
    )
    page.locator("#txt2img_generate").click()
    info = page.locator("#generation_info_text").inner_text()
    assert info.startswith("a red circle <lora:uilora:1>") and 'Lora hashes: "uilora: ' in info
    assert page.locator(".gen-note").count() == 0
    # A1111's user metadata beside a file (its card editor and Civitai Helper write it): the card shows the trigger
    # words, and a click adds them with the preferred weight, and the negative text to the negative prompt.
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=8)), str(folder / "uistyle.safetensors"))
    (folder / "uistyle.json").write_text(
        json.dumps({"activation text": "zqstyle, outlined", "preferred weight": 0.6, "negative text": "blurry"})
    )
    page.locator("#lora_refresh").click()
    card = page.locator("#lora_cards tr", has_text="uistyle")
    card.wait_for()
    assert "zqstyle, outlined" in card.inner_text() and "weight 0.6" in card.inner_text()
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#txt2img_neg_prompt textarea").fill("")
    card.get_by_text("uistyle", exact=True).click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === "
        "'a red circle <lora:uistyle:0.6> zqstyle, outlined'"
    )
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "(blurry:1)"
    # A1111's option for the weight a click writes (a file's preferred weight still wins)
    import requests

    options = server.url + "/sdapi/v1/options"
    assert requests.post(options, json={"extra_networks_default_multiplier": 0.7}, timeout=30).status_code == 200
    try:
        page.locator("#txt2img_prompt textarea").fill("")
        page.locator("#lora_cards").get_by_text("uilora", exact=True).click()
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === '<lora:uilora:0.7>'")
        bad = requests.post(options, json={"extra_networks_default_multiplier": "heavy"}, timeout=30)
        assert bad.status_code == 400 and "extra_networks_default_multiplier" in bad.text
    finally:
        requests.post(options, json={"extra_networks_default_multiplier": 1}, timeout=30)
    page.locator("#txt2img_prompt textarea").fill("a red circle <lora:uilora:1>")
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "lora_cards.png"), full_page=True)


def test_lora_info_shows_the_training_record_and_saves_trigger_words(page, server, services):
    from safetensors.torch import save_file

    from tests.test_lora import kohya_file, make_layers

    folder = server.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    model = services.models.get()
    metadata = {"ss_steps": "300", "ss_tag_frequency": json.dumps({"5_zq": {"zqinfo style": 5, "red circle": 3}})}
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=9)), str(folder / "uiinfo.safetensors"), metadata)
    open_ui(page, server)
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#txt2img_generate").click()
    page.locator("#generation_info_text").wait_for()  # an image to make the card image from
    page.get_by_role("tab", name="LoRA").click()
    page.get_by_role("tab", name="Info", exact=True).click()
    pick_option(page, "#lora_info_name input", "uiinfo", exact=True)
    page.locator("#lora_info_table").wait_for()
    summary = page.locator("#lora_info_summary").inner_text()
    assert "300" in summary and "zqinfo style (5)" in summary and "Fits the loaded model\tyes" in summary, summary
    page.locator("#lora_info_use_image").click()
    page.locator("#lora_info_preview_saved").wait_for()
    with Image.open(folder / "uiinfo.png") as card_image:
        assert card_image.size == (64, 64)  # the generated image, as A1111's "replace preview" writes it
    page.locator("#lora_info_preview img").wait_for()
    fill_field(page, "lora_info_activation_text", "zqinfo style")
    fill_field(page, "lora_info_preferred_weight", 0.9)
    page.locator("#lora_info_save").click()
    page.locator("#lora_info_saved").wait_for()
    saved = json.loads((folder / "uiinfo.json").read_text())
    assert (saved["activation text"], saved["preferred weight"]) == ("zqinfo style", 0.9)
    page.locator("#lora_resize").get_by_text("Resize (a lower rank").click()
    fill_in_opened_accordion(page, "lora_resize_rank", 2)
    page.locator("#lora_resize_button").click()
    done = page.locator("#lora_resize_done")
    done.wait_for()
    assert "uiinfo-r2.safetensors" in done.inner_text() and "rank 4 -> 2" in done.inner_text(), done.inner_text()
    assert (folder / "uiinfo-r2.safetensors").is_file()
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "lora_info.png"), full_page=True)
    page.get_by_role("tab", name="txt2img").click()
    card = page.locator("#lora_cards tr", has_text="zqinfo style")
    card.wait_for()  # the list was refreshed by the save
    assert "zqinfo style · weight 0.9" in card.inner_text()
    card.locator("img").wait_for()  # its card image, in the list as in A1111's cards
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    card.get_by_text("uiinfo", exact=True).click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a red circle <lora:uiinfo:0.9> zqinfo style'"
    )


def generate_with_checkpoint(page, name: str) -> None:
    """Pick checkpoint `name` in the top dropdown, generate with it (the infotext names it), then go back to
    shapes-64."""

    def load(picked: str) -> None:
        pick_option(page, "#sd_model_checkpoint input", re.compile(f"^{picked}"))
        page.wait_for_function(
            f"document.querySelector('#quicksettings_status').innerText.includes('Loaded {picked}')", timeout=60000
        )

    load(name)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(f"document.querySelector('#generation_info_text')?.innerText.includes('Model: {name}')")
    load("shapes-64")


def test_extract_a_lora_from_a_fine_tuned_model_use_it_and_merge_it_back(page, server):
    """LoRA tab → Extract: a fine-tuned copy of the loaded model (known changes in some layers) becomes a LoRA that
    the prompt applies; LoRA tab → Merge bakes it into a new checkpoint that the checkpoint list then loads."""
    from safetensors.torch import save_file

    from app.models.checkpoints import scan_checkpoints
    from app.models.ldm_export import export_sd1
    from app.models.manager import read_pipeline
    from tests.test_lora_extract import CHANGES, low_rank

    ckpt = server.data_dir / "models" / "Stable-diffusion"
    base = next(c for c in scan_checkpoints([ckpt], None) if c.name == "shapes-64")
    pipe = read_pipeline(base, torch.float32)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        for i, (component, path, rank) in enumerate(CHANGES):
            layer = parts[component].get_submodule(path)
            layer.weight += low_rank(layer.weight.shape, rank, seed=i, size=0.5)
    save_file(export_sd1(pipe), str(ckpt / "uituned.safetensors"))
    open_ui(page, server)
    page.get_by_role("tab", name="LoRA").click()
    page.get_by_role("tab", name="Extract", exact=True).click()
    page.locator("#lora_extract_refresh").click()
    pick_option(page, "#lora_extract_tuned input", re.compile("^uituned"))
    fill_field(page, "lora_extract_name", "uiextract")
    fill_field(page, "lora_extract_rank", 4)
    fill_field(page, "lora_extract_conv_dim", 4)
    page.locator("#lora_extract_button").click()
    done = page.locator("#lora_extract_done")
    done.wait_for(timeout=120000)
    text = done.inner_text()
    assert "uiextract.safetensors" in text and "6 layers at rank 4" in text and "is included" in text, text
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "lora_extract.png"), full_page=True)
    page.locator("#lora_extract_button").click()  # the same name again: refused, nothing overwritten
    page.locator("#lora_extract_error").wait_for()
    assert "already exists" in page.locator("#lora_extract_error").inner_text()
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#lora_cards tr", has_text="uiextract").wait_for()  # the list was refreshed
    page.locator("#txt2img_prompt textarea").fill("a red circle <lora:uiextract:1>")
    page.locator("#txt2img_generate").click()
    page.locator("#generation_info_text").wait_for()
    assert "Lora hashes" in page.locator("#generation_info_text").inner_text()
    # and back: LoRA tab → Merge bakes it into a new checkpoint, which the checkpoint list offers at once
    page.get_by_role("tab", name="LoRA").click()
    page.get_by_role("tab", name="Merge", exact=True).click()
    fill_field(page, "lora_merge_loras", "<lora:uiextract:1>")
    fill_field(page, "lora_merge_name", "uimerged")
    page.locator("#lora_merge_button").click()
    merged = page.locator("#lora_merge_done")
    merged.wait_for(timeout=120000)
    assert "uimerged.safetensors" in merged.inner_text() and "<lora:uiextract:1>" in merged.inner_text()
    page.locator("#lora_merge_into").get_by_text("a new LoRA").click()  # and two tags as one LoRA
    fill_field(page, "lora_merge_loras", "<lora:uiextract:0.5> <lora:uiextract:0.5:unet=1>")
    fill_field(page, "lora_merge_name", "uione")
    fill_field(page, "lora_merge_rank", 4)
    page.locator("#lora_merge_button").click()
    page.wait_for_function("document.querySelector('#lora_merge_done')?.innerText.includes('uione.safetensors')")
    assert "It is in the Lora list" in page.locator("#lora_merge_done").inner_text()
    page.wait_for_timeout(1000)  # the lists' updates settle (the page greys out what is being updated)
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "lora_merge.png"), full_page=True)
    generate_with_checkpoint(page, "uimerged")


def test_checkpoint_merger_adds_a_fine_tunes_difference_and_the_result_loads(page, server):
    """Checkpoint Merger tab: A + 1 (B - C) with A = C = shapes-64 is the fine-tune B; the new checkpoint is in the
    checkpoint list at once, loads and generates; the same name again is refused."""
    from safetensors.torch import save_file

    from app.models.checkpoints import scan_checkpoints
    from app.models.ldm_export import export_sd1
    from app.models.manager import read_pipeline

    ckpt = server.data_dir / "models" / "Stable-diffusion"
    pipe = read_pipeline(next(c for c in scan_checkpoints([ckpt], None) if c.name == "shapes-64"), torch.float32)
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].proj_in.weight += 0.3
    save_file(export_sd1(pipe), str(ckpt / "uimergeb.safetensors"))
    open_ui(page, server)
    page.get_by_role("tab", name="Checkpoint Merger").click()
    page.locator("#merger_refresh").click()
    for picker, name in (("a", "^shapes-64"), ("b", "^uimergeb"), ("c", "^shapes-64")):
        page.locator(f"#merger_{picker} input").click()  # three lists of the same names: each picked in its own
        page.locator(f"#merger_{picker}").get_by_role("option", name=re.compile(name)).click()
    page.locator("#merger_method").get_by_text("Add difference").click()
    page.locator("#merger_m input[type=number]").fill("1")
    page.locator("#merger_m input[type=number]").press("Enter")
    page.locator("#merger_precision").get_by_text("fp32").click()
    fill_field(page, "merger_custom_name", "uimergeadd")
    page.locator("#merger_button").click()
    done = page.locator("#merger_done")
    done.wait_for(timeout=120000)
    assert "uimergeadd.safetensors" in done.inner_text() and "tensors merged" in done.inner_text(), done.inner_text()
    with (
        safe_open(str(ckpt / "uimergeadd.safetensors"), "pt") as merged,
        safe_open(str(ckpt / "uimergeb.safetensors"), "pt") as tuned,
    ):
        recipe = json.loads(merged.metadata()["sd_merge_recipe"])
        assert (recipe["interp_method"], recipe["multiplier"]) == ("Add difference", 1)
        key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        assert torch.allclose(merged.get_tensor(key), tuned.get_tensor(key), atol=1e-6)
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "checkpoint_merger.png"), full_page=True)
    page.locator("#merger_button").click()  # the same name again: refused, nothing overwritten
    page.locator("#merger_error").wait_for()
    assert "already exists" in page.locator("#merger_error").inner_text()
    generate_with_checkpoint(page, "uimergeadd")


def test_train_a_lora_from_its_tab_and_use_it(page, server, tmp_path):
    from tests.test_regularization import make_reg_dataset
    from tests.test_training import make_dataset

    dataset = make_dataset(tmp_path / "lora-stars")
    reg = make_reg_dataset(tmp_path / "lora-reg")
    open_ui(page, server)
    page.get_by_role("tab", name="LoRA").click()
    name = page.locator("#train_lora_lora input").first
    name.fill("uitrained")
    name.press("Tab")
    fill_field(page, "train_lora_rank", 4)
    fill_field(page, "train_lora_alpha", 4)
    fill_field(page, "train_lora_conv_dim", 2)  # LoCon: the ResNet convolutions too
    page.locator("#train_lora_dora_wd input").check()  # weight-decomposed

    fill_field(page, "train_lora_dataset_directory", dataset)
    fill_field(page, "train_lora_reg_data_dir", reg)
    fill_field(page, "train_lora_prior_loss_weight", 0.5)
    fill_field(page, "train_lora_steps", 8)
    page.locator("#train_lora_advanced").get_by_text("Advanced:").click()  # kohya's options, closed by default
    fill_in_opened_accordion(page, "train_lora_min_snr_gamma", 5)
    fill_in_opened_accordion(page, "train_lora_scale_weight_norms", 1)  # kohya's max-norm
    fill_in_opened_accordion(page, "train_lora_network_dropout", 0.1)  # and dropout
    pick_option(page, "#train_lora_loss_type input", "Huber", exact=True)
    fill_in_opened_accordion(page, "train_lora_validation_split", 0.25)  # one of the 4 images held out
    fill_in_opened_accordion(page, "train_lora_validate_every", 4)
    fill_in_opened_accordion(page, "train_lora_sample_prompts", "a red star --d 5 --s 2\na blue star --w 72 --s 2")
    page.locator("#train_lora_advanced").get_by_text("Advanced:").click()  # closed again: they stay set
    fill_field(page, "train_lora_create_image_every", 4)
    fill_field(page, "train_lora_save_lora_every", 4)
    page.locator("#train_lora_gradient_checkpointing").get_by_text("Off", exact=True).click()
    page.locator("#train_lora_train_lora").click()
    done = page.locator("#lora_train_message #train_result")
    done.wait_for(timeout=90000)
    assert "Training finished at step 8" in done.inner_text(), done.inner_text()
    run_settings = next((server.data_dir / "log").glob("*/uitrained/settings.json"))
    settings = json.loads(run_settings.read_text())
    assert settings["gradient_checkpointing"] == "off"  # the radio reached the run
    assert settings["min_snr_gamma"] == 5  # and the field inside the closed accordion
    assert (settings["reg_data_dir"], settings["prior_loss_weight"], settings["regularization_images"]) == (
        str(reg),
        0.5,
        2,
    )
    assert settings["validation_images"] == 1 and settings["validate_every_n_steps"] == 4
    previews = sorted(p.name for p in (run_settings.parent / "images").iterdir())
    assert previews == ["uitrained-4-2.png", "uitrained-4.png", "uitrained-8-2.png", "uitrained-8.png"], previews
    with Image.open(run_settings.parent / "images" / "uitrained-8-2.png") as second:
        assert second.size == (72, 64)  # the second sample prompt's --w
    page.locator("#lora_train_validation_plot").wait_for()  # shown once the run measured it
    page.locator("#lora_train_preview img").wait_for()
    samples = page.locator("#lora_train_samples")  # both sample prompts' images of the last preview step
    samples.locator("img").nth(1).wait_for()
    assert samples.locator("img").count() == 2
    assert "a blue star" in samples.inner_text(), samples.inner_text()
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "train_lora.png"), full_page=True)
    with safe_open(str(server.data_dir / "models" / "Lora" / "uitrained.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape[:2] == (2, 32)
        assert (f.metadata()["ss_scale_weight_norms"], f.metadata()["ss_network_dropout"]) == ("1.0", "0.1")
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale").shape == (1, 32, 1, 1)
        assert f.metadata()["ss_loss_type"] == "huber"
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#lora_refresh").click()
    page.locator("#lora_cards").get_by_text("uitrained", exact=True).click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.includes('<lora:uitrained:1>')")


def test_train_a_lora_with_a_bundled_embedding_and_use_its_word(page, server, tmp_path):
    """Pivotal tuning from the LoRA tab: first refused (the default template never says the word), then trained
    with a template that does; the file carries the embedding and its word works in a prompt with the LoRA."""
    from tests.test_training import make_dataset

    dataset = make_dataset(tmp_path / "pivot-stars")
    open_ui(page, server)
    page.get_by_role("tab", name="LoRA").click()
    name = page.locator("#train_lora_lora input").first
    name.fill("uipivot")
    name.press("Tab")
    fill_field(page, "train_lora_dataset_directory", dataset)
    fill_field(page, "train_lora_steps", 4)
    fill_field(page, "train_lora_create_image_every", 4)
    page.locator("#train_lora_bundle").get_by_text("Bundled embedding").click()
    fill_in_opened_accordion(page, "train_lora_bundle_embedding", "uipivotword")
    fill_field(page, "train_lora_bundle_vectors", 2)
    fill_field(page, "train_lora_bundle_init_text", "red")
    fill_field(page, "train_lora_embedding_lr", "0.01")
    page.locator("#train_lora_train_lora").click()
    error = page.locator("#lora_train_message #train_error")
    error.wait_for(timeout=60000)
    assert "uipivotword" in error.inner_text() and "[name]" in error.inner_text(), error.inner_text()
    assert not (server.data_dir / "models" / "Lora" / "uipivot.safetensors").exists()
    pick_option(page, "#train_lora_template_file input", "subject_filewords.txt", exact=True)
    page.locator("#train_lora_train_lora").click()
    # (the panel shows the last run's message until this one's replaces it: wait for this run's)
    page.wait_for_function(
        "(document.querySelector('#lora_train_message #train_result') || {}).innerText"
        "?.includes('Training finished at step 4. LoRA saved to') && "
        "document.querySelector('#lora_train_message #train_result').innerText.includes('uipivot.safetensors')",
        timeout=90000,
    )
    with safe_open(str(server.data_dir / "models" / "Lora" / "uipivot.safetensors"), "pt") as f:
        assert f.get_tensor("bundle_emb.uipivotword.string_to_param.*").shape == (2, 64)
    # The preview <img> loads lazily: scrolled far down the form (the template picker), it waits to be near the view.
    page.locator("#lora_train_preview").scroll_into_view_if_needed()
    page.locator("#lora_train_preview img").wait_for()
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "train_lora_pivotal.png"), full_page=True)
    page.get_by_role("tab", name="txt2img").click()
    # its card shows the bundled word and, from the NAME.json training wrote, a click adds it after the tag
    page.locator("#lora_refresh").click()
    card = page.locator("#lora_cards tr", has_text="bundled: uipivotword")
    card.wait_for()
    fill_field(page, "txt2img_prompt", "a circle")
    card.get_by_text("uipivot", exact=True).click()
    page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a circle <lora:uipivot:1> uipivotword'"
    )
    fill_field(page, "txt2img_prompt", "a uipivotword circle <lora:uipivot:1>")
    page.locator("#txt2img_generate").click()
    info = page.locator("#generation_info_text").inner_text()
    assert 'TI hashes: "uipivotword: uipivot"' in info, info
    assert page.locator(".gen-note").count() == 0


@pytest.fixture(scope="module")
def xl_ui_server(tmp_path_factory, model_store):
    """A server whose checkpoint folder holds both shipped shapes models (as a fresh install has them)."""
    from tests.conftest import make_data_dir, serve

    base = tmp_path_factory.mktemp("xl-ui")
    data = make_data_dir(base / "data", model_store, ("shapes-64", "shapes-xl"))
    yield from serve(data, [], base / "server.log", "/")


def test_pick_shapes_xl_then_create_train_and_use_an_sdxl_embedding(page, xl_ui_server, tmp_path):
    from tests.test_training import make_dataset

    server = xl_ui_server
    dataset = make_dataset(tmp_path / "stars")
    open_ui(page, server)
    pick_option(page, "#sd_model_checkpoint input", re.compile("^shapes-xl"))
    page.wait_for_function(
        "document.querySelector('#quicksettings_status').innerText.includes('Loaded shapes-xl')", timeout=60000
    )
    # The dropdown shows the loaded model under its new title (with the hash computed on load).
    page.wait_for_function("document.querySelector('#sd_model_checkpoint input').value.startsWith('shapes-xl [')")
    page.get_by_role("tab", name="Textual Inversion").click()
    fill_field(page, "train_embedding_name", "uixl")
    fill_field(page, "train_initialization_text", "red")
    page.locator("#train_create_embedding").click()
    assert "uixl.safetensors" in page.locator("#ti_create_ok").inner_text()
    page.get_by_role("tab", name="Train").click()
    pick_option(page, "#train_embedding input", "uixl", exact=True)
    fill_field(page, "train_dataset_directory", dataset)
    fill_field(page, "train_steps", 8)
    fill_field(page, "train_create_image_every", 4)
    fill_field(page, "train_save_embedding_every", 4)
    page.locator("#train_train_embedding").click()
    done = page.locator("#train_result")
    done.wait_for(timeout=60000)
    assert "Training finished at step 8" in done.inner_text()
    page.locator("#ti_train_preview img").wait_for()
    page.screenshot(path=str(ROOT / "docs" / "screenshots" / "train_sdxl_embedding.png"), full_page=True)
    log_copies = list((server.data_dir / "log").rglob("uixl-8.safetensors"))
    assert len(log_copies) == 1
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_prompt textarea").fill("a uixl circle on a blue background")
    page.locator("#txt2img_generate").click()
    info = page.locator("#generation_info_text").inner_text()
    assert 'TI hashes: "uixl: ' in info and "Model: shapes-xl," in info
    assert page.external_requests == []


@pytest.fixture(scope="module")
def locked_ui(tmp_path_factory, model_store):
    """`--listen --gradio-auth`: the UI as someone serving it on their network starts it."""
    from tests.conftest import make_data_dir, serve

    base = tmp_path_factory.mktemp("locked_ui")
    data = make_data_dir(base / "data", model_store)
    yield from serve(data, ["--listen", "--gradio-auth", "carol:pw2"], base / "server.log", "/")


def test_login_then_generate_and_the_image_needs_the_session(page, locked_ui):
    import requests

    page.goto(locked_ui.url + "/")
    page.get_by_label("username").fill("carol")
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect Credentials").wait_for()
    page.get_by_label("username").fill("carol")  # the form is cleared after a failed try
    page.get_by_label("password").fill("pw2")
    page.get_by_role("button", name="Login").click()
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    page.locator("#txt2img_generate").click()
    image = page.locator("#txt2img_gallery img").first
    image.wait_for()
    src = image.get_attribute("src")
    assert "/gradio_api/file=" in src
    url = src if src.startswith("http") else locked_ui.url + src
    # The browser's session fetches it; the same address without the session is refused.
    assert page.request.get(url).status == 200
    assert requests.get(url, timeout=10).status_code == 401
    assert page.external_requests == []


def test_out_of_memory_shows_the_message_and_the_next_image_works(page, warm):  # noqa: F811 - the fixture
    open_ui(page, warm)
    page.locator("#txt2img_prompt textarea").fill("a red circle")
    for elem_id, value in (("txt2img_width", 2048), ("txt2img_height", 2048), ("txt2img_batch_size", 8)):
        set_number(page, elem_id, value)
    set_number(page, "txt2img_steps", 1)
    with capped_at(warm, 300):  # data memory 300 MB above the warm server's (tests/test_out_of_memory.py)
        page.locator("#txt2img_generate").click()
        error = page.locator("#generation_error")
        error.wait_for(timeout=120000)
        text = error.inner_text()
        assert text.startswith("Out of memory while generating 8 images of 2048×2048 ("), text
        assert "Try a smaller batch size or image size" in text
        for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_batch_size", 1)):
            set_number(page, elem_id, value)
        page.locator("#txt2img_generate").click()
        page.locator("#generation_info_text").wait_for()
    assert "Size: 64x64" in page.locator("#generation_info_text").inner_text()
    assert page.locator("#txt2img_gallery img").count() >= 1
