"""LoRA tab → Info: what a LoRA file says about itself (kohya's training metadata, its most frequent caption tags,
bundled embeddings, whether it fits the loaded model) and A1111's user metadata for it (description, trigger
words, preferred weight, negative text, notes), edited and saved to `<name>.json` as A1111's card editor does;
and resizing it to a lower rank into a new file."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from app.errors import UserError
from app.lora.service import TRAINING_KEYS
from app.services import Services
from app.ui.extra_networks import NetworkList
from app.ui.messages import error_html, message_html


def load_preview(path: Path | None) -> Image.Image | None:
    """The card image, or None where there is none or it cannot be read (a damaged file is not worth an error)."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.thumbnail((512, 512))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def summary_html(info: dict[str, Any]) -> str:
    """The file's facts as a two-column table, then its caption tags by frequency."""
    fits = "yes" if info["usable"] else f"no: {info['reason']}"
    rows = [
        ("File", info["path"]),
        ("Size", f"{info['size_mb']:.1f} MB"),
        ("Fits the loaded model", fits),
        ("Kind", info["kind"] or "-"),
        ("Layers", str(info["layers"])),
        ("Bundled embeddings", ", ".join(info["embeddings"]) or "none"),
    ]
    rows += [
        (label, info["training"][key])
        for key, label in TRAINING_KEYS.items()
        if info["training"].get(key) not in (None, "", "None")
    ]  # kohya: "None" = off
    if info["user"].problem:
        rows.append(("User metadata", info["user"].problem))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    if info["tags"]:
        tags = ", ".join(f"{html.escape(tag)} ({count})" for tag, count in info["tags"])
        caption_tags = f"<p id='lora_info_tags'><b>Most frequent caption tags:</b> {tags}</p>"
    else:
        caption_tags = "<p id='lora_info_tags'>No caption tags recorded in the file.</p>"
    return f"<table id='lora_info_table'>{table}</table>{caption_tags}"


def build_lora_info_tab(services: Services, lora_list: NetworkList, gallery: gr.Gallery) -> gr.Dropdown:
    """The Info view; returns its LoRA picker, whose choices the page load refreshes. `gallery`: txt2img's output,
    whose first image can become the LoRA's card image."""
    with gr.Row():
        name = gr.Dropdown(choices=services.loras.names(), value=None, label="LoRA", elem_id="lora_info_name", scale=4)
        refresh = gr.Button("🔄", elem_id="lora_info_refresh", scale=0, min_width=48)
    with gr.Row():
        summary = gr.HTML(elem_id="lora_info_summary")
        with gr.Column(scale=0, min_width=200):
            preview = gr.Image(
                label="Card image", interactive=False, height=200, elem_id="lora_info_preview", type="pil"
            )
            use_image = gr.Button("Use the last txt2img image", size="sm", elem_id="lora_info_use_image")
    description = gr.Textbox(label="Description", lines=2, elem_id="lora_info_description")
    with gr.Row():
        activation = gr.Textbox(
            label="Activation text (trigger words, added after the tag when the card is clicked)",
            elem_id="lora_info_activation_text",
        )
        weight = gr.Number(value=0, label="Preferred weight (0: the default, 1)", elem_id="lora_info_preferred_weight")
    negative = gr.Textbox(label="Negative text (added to the negative prompt)", elem_id="lora_info_negative_text")
    notes = gr.Textbox(label="Notes", lines=2, elem_id="lora_info_notes")
    save = gr.Button("Save to NAME.json", variant="primary", elem_id="lora_info_save")
    message = gr.HTML(elem_id="lora_info_message")
    fields = [summary, description, activation, weight, negative, notes, preview]
    with gr.Accordion("Resize (a lower rank, a smaller file; kohya's resize_lora)", open=False, elem_id="lora_resize"):
        with gr.Row():
            new_rank = gr.Number(value=16, precision=0, label="New rank (at most)", elem_id="lora_resize_rank")
            keep = gr.Number(
                value=0,
                label="Dynamic: per layer, the least rank keeping this share of its norm (0 = off; 0.9-0.99)",
                elem_id="lora_resize_keep",
            )
            new_name = gr.Textbox(label="New name (empty: NAME-rRANK)", elem_id="lora_resize_name")
        resize = gr.Button("Resize into a new file", elem_id="lora_resize_button")
        resize_message = gr.HTML(elem_id="lora_resize_message")

    def on_pick(picked: str | None) -> list:
        if not picked:
            return ["", "", "", 0, "", "", None]
        try:
            info = services.loras.info(picked)
        except UserError as e:
            return [error_html(e), "", "", 0, "", "", None]
        user = info["user"]
        weight_value = user.preferred_weight or 0
        texts = [user.description, user.activation_text, weight_value, user.negative_text, user.notes]
        return [summary_html(info), *texts, load_preview(info["preview"])]

    def on_save(picked, description_text, activation_text, weight_value, negative_text, notes_text) -> list:
        try:
            if not picked:
                raise UserError("Pick a LoRA first.")
            path = services.loras.save_user_metadata(
                picked,
                description=description_text or "",
                activation_text=activation_text or "",
                preferred_weight=float(weight_value) if weight_value is not None else None,
                negative_text=negative_text or "",
                notes=notes_text or "",
            )
        except UserError as e:
            return [error_html(e, "lora_info_error"), *lora_list.refreshed(False)]
        done = message_html(f"Saved {path}.", "train-done", "lora_info_saved")
        return [done, *lora_list.refreshed(False)]

    def on_resize(picked, rank_value, keep_value, new_name_text) -> list:
        try:
            if not picked:
                raise UserError("Pick a LoRA first.")
            if rank_value is None:
                raise UserError("'New rank' is empty: enter a whole number.", "rank")
            target = (new_name_text or "").strip() or f"{picked}-r{int(rank_value)}"
            path, report = services.loras.resize(picked, target, int(rank_value), float(keep_value or 0))
        except UserError as e:
            error = error_html(e, "lora_resize_error")
            return [error, gr.update(), *lora_list.refreshed(False)]
        done = message_html(f"Wrote {path}: {report.sentence()}", "train-done", "lora_resize_done")
        return [done, gr.update(choices=services.loras.names()), *lora_list.refreshed(False)]

    resize.click(
        on_resize,
        inputs=[name, new_rank, keep, new_name],
        outputs=[resize_message, name, *lora_list.outputs],
    )

    def on_use_image(picked, images) -> list:
        try:
            if not picked:
                raise UserError("Pick a LoRA first.")
            if not images:
                raise UserError("Generate an image in txt2img first: its first image becomes the card image.")
            first = images[0][0] if isinstance(images[0], tuple | list) else images[0]
            if isinstance(first, Image.Image):
                image = first
            elif isinstance(first, np.ndarray):
                image = Image.fromarray(first)
            else:  # a file path (the gallery's default)
                image = Image.open(first)
            path = services.loras.save_preview(picked, image)
        except (UserError, OSError) as e:
            error = error_html(e, "lora_info_error")
            return [gr.update(), error, *lora_list.refreshed(False)]
        saved = message_html(f"Saved {path}.", "train-done", "lora_info_preview_saved")
        return [load_preview(path), saved, *lora_list.refreshed(False)]

    use_image.click(on_use_image, inputs=[name, gallery], outputs=[preview, message, *lora_list.outputs])
    name.change(on_pick, inputs=name, outputs=fields)
    refresh.click(lambda: gr.update(choices=services.loras.names()), outputs=name)
    save.click(
        on_save,
        inputs=[name, description, activation, weight, negative, notes],
        outputs=[message, *lora_list.outputs],
    )
    return name
