"""PNG Info: read the generation parameters stored in an image and send them to txt2img."""

from __future__ import annotations

import contextlib
import html

import gradio as gr
from PIL import Image, UnidentifiedImageError

from app.errors import UserError
from app.generation.infotext import parse_infotext, png_text_chunks
from app.generation.samplers import find_sampler, find_schedule
from app.ui.messages import error_html


def read_parameters(path: str | None) -> tuple[str, str]:
    """(infotext, html of every text chunk) from an uploaded file path."""
    if not path:
        return "", ""
    try:
        with Image.open(path) as image:
            chunks = png_text_chunks(image)
    except (UnidentifiedImageError, OSError) as e:
        return "", error_html(f"Not an image this app can read: {e}")
    text = chunks.get("parameters", "")
    if not chunks:
        return "", "<p>This image holds no generation parameters.</p>"
    rows = "".join(
        f"<div><b>{html.escape(k)}</b><pre style='white-space:pre-wrap'>{html.escape(v)}</pre></div>"
        for k, v in chunks.items()
    )
    return text, rows


def fields_from_infotext(text: str) -> dict:
    """The txt2img field values an infotext asks for; fields it does not mention stay as they are."""
    params = parse_infotext(text)
    values: dict = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    numeric = {
        "steps": ("Steps", int),
        "cfg_scale": ("CFG scale", float),
        "seed": ("Seed", int),
        "width": ("Size-1", int),
        "height": ("Size-2", int),
    }
    for field, (key, kind) in numeric.items():
        if key in params:
            with contextlib.suppress(ValueError):
                values[field] = kind(params[key])
    if "Sampler" in params:
        try:
            sampler, implied = find_sampler(params["Sampler"])
            values["sampler"] = sampler.name
            if implied:
                values["schedule"] = implied
        except UserError:
            pass
    if "Schedule type" in params:
        with contextlib.suppress(UserError):
            values["schedule"] = find_schedule(params["Schedule type"])
    return values


def build_pnginfo_tab(txt2img: dict[str, gr.components.Component], tabs: gr.Tabs) -> None:
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Source image", file_types=["image"], type="filepath", elem_id="pnginfo_image")
            shown = gr.Image(label="Image", interactive=False, height=256, elem_id="pnginfo_preview")
        with gr.Column():
            chunks = gr.HTML(elem_id="pnginfo_html")
            infotext = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_generation_info")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")

    def on_upload(path):
        text, rows = read_parameters(path)
        return path, rows, text

    upload.change(on_upload, inputs=upload, outputs=[shown, chunks, infotext])

    order = list(txt2img)

    def on_send(text: str):
        values = fields_from_infotext(text or "")
        return [gr.Tabs(selected="txt2img")] + [values[k] if k in values else gr.update() for k in order]

    send.click(on_send, inputs=infotext, outputs=[tabs] + [txt2img[k] for k in order])
