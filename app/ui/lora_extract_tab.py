"""LoRA tab → Extract: a LoRA of the change from a base model to a fine-tuned one (kohya's
`extract_lora_from_models.py`), written to the LoRA folder."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from app.errors import UserError
from app.jobs import Job
from app.lora.extract import ExtractOptions, ExtractReport
from app.lora.writer import SAVE_DTYPES
from app.services import Services, extraction_result
from app.ui.extra_networks import NetworkList
from app.ui.messages import error_html, message_html

LOADED = "The loaded model"


def follow(services: Services, job: Job, progress: gr.Progress) -> tuple[Path, ExtractReport]:
    """Wait for a layer-progress job (extraction, merging into a LoRA), showing its progress under the button as
    /progress reports it; its result, or the message when it was interrupted."""
    while not job.finished:
        position = services.jobs.queue_position(job)
        text = job.progress.text or (f"Waiting: {position} jobs ahead" if position else "Reading the models")
        progress(job.progress.fraction, desc=text)
        time.sleep(0.25)
    return extraction_result(job.wait())


def _titles(services: Services) -> list[str]:
    return [info.title for info in services.models.checkpoints]


def build_lora_extract_tab(services: Services, lora_list: NetworkList, lora_info_name: gr.Dropdown) -> list:
    """The Extract view; a new file shows in the txt2img Lora list and the Info tab's picker at once. Returns the
    two model pickers, whose choices the page load refreshes."""
    gr.Markdown(
        "Turn a fine-tuned checkpoint (DreamBooth, a full fine-tune, a merge) into a LoRA: the change from the base "
        "model to it, layer by layer, cut to the rank by SVD. The LoRA applies to the base model and to other "
        "models of its family; a higher rank keeps more of the change in a larger file."
    )
    with gr.Row():
        tuned = gr.Dropdown(
            choices=_titles(services), value=None, label="Fine-tuned model", elem_id="lora_extract_tuned"
        )
        base = gr.Dropdown(
            choices=[LOADED, *_titles(services)], value=LOADED, label="Base model", elem_id="lora_extract_base"
        )
        refresh = gr.Button("🔄", elem_id="lora_extract_refresh", scale=0, min_width=48)
    with gr.Row():
        name = gr.Textbox(label="Name of the new LoRA", elem_id="lora_extract_name")
        rank = gr.Number(value=32, precision=0, label="Rank (kohya's dim)", elem_id="lora_extract_rank")
        conv_dim = gr.Number(
            value=0, precision=0, label="Conv rank (ResNet convolutions; 0 = left out)", elem_id="lora_extract_conv_dim"
        )
        sv_fro = gr.Number(
            value=0,
            label="Dynamic: per layer, the least rank keeping this share of its change (0 = off; 0.9-0.99)",
            elem_id="lora_extract_sv_fro",
        )
    with gr.Accordion("Advanced", open=False, elem_id="lora_extract_advanced"), gr.Row():
        clamp = gr.Number(value=0.99, label="Clamp quantile (1 = no clamping)", elem_id="lora_extract_clamp_quantile")
        min_diff = gr.Number(
            value=0.01,
            label="Minimum text encoder change (at most this: UNet only)",
            elem_id="lora_extract_min_diff",
        )
        precision = gr.Dropdown(
            choices=list(SAVE_DTYPES), value="fp16", label="Save precision", elem_id="lora_extract_precision"
        )
    extract = gr.Button("Extract", variant="primary", elem_id="lora_extract_button")
    message = gr.HTML(elem_id="lora_extract_message")

    def on_extract(
        tuned_title,
        base_title,
        new_name,
        rank_value,
        conv_value,
        share,
        clamp_value,
        min_value,
        dtype,
        progress=gr.Progress(),
    ):
        try:
            if not tuned_title:
                raise UserError("Pick the fine-tuned model first.")
            numbers = {"Rank": rank_value, "Conv rank": conv_value, "Clamp quantile": clamp_value}
            for label, value in {**numbers, "Minimum text encoder change": min_value}.items():
                if value is None:
                    raise UserError(f"'{label}' is empty: enter a number.")
            options = ExtractOptions(
                rank=int(rank_value),
                conv_dim=int(conv_value),
                sv_fro=float(share or 0),
                clamp_quantile=float(clamp_value),
                min_diff=float(min_value),
                save_precision=dtype or "fp16",
            )
            base_query = "" if base_title in (None, "", LOADED) else base_title
            job = services.start_extract_lora(tuned_title, base_query, (new_name or "").strip(), options)
            path, report = follow(services, job, progress)
        except UserError as e:
            return [error_html(e, "lora_extract_error"), gr.update(), *lora_list.refreshed(False)]
        done = message_html(f"Wrote {path}: {report.sentence()}", "train-done", "lora_extract_done")
        return [done, gr.update(choices=services.loras.names()), *lora_list.refreshed(False)]

    extract.click(
        on_extract,
        inputs=[tuned, base, name, rank, conv_dim, sv_fro, clamp, min_diff, precision],
        outputs=[message, lora_info_name, *lora_list.outputs],
    )

    refresh.click(lambda: model_choices(services, rescan=True), outputs=[tuned, base])
    return [tuned, base]


def model_choices(services: Services, rescan: bool = False) -> list:
    """Updates for the two model pickers (after a rescan of the checkpoint folder with `rescan`)."""
    if rescan:
        services.models.refresh()
    titles = _titles(services)
    return [gr.update(choices=titles), gr.update(choices=[LOADED, *titles])]
