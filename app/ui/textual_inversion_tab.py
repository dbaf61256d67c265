"""The Textual Inversion tab: create an embedding, and train one (A1111's fields and defaults)."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from app.errors import UserError
from app.folders import FolderPolicy
from app.services import Services
from app.training.preprocess import PreprocessOptions, preprocess
from app.ui.extra_networks import NetworkList
from app.ui.messages import error_html
from app.ui.train_section import EMBEDDING, TrainSection


def build_textual_inversion_tab(
    services: Services, embedding_list: NetworkList, txt2img: dict[str, gr.components.Component]
) -> None:
    with gr.Tab("Create embedding", id="ti_create"), gr.Column():
        name = gr.Textbox(label="Name", elem_id="train_embedding_name")
        init_text = gr.Textbox(label="Initialization text", value="*", elem_id="train_initialization_text")
        vectors = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token", elem_id="train_nvpt")
        overwrite = gr.Checkbox(value=False, label="Overwrite Old Embedding", elem_id="train_overwrite_old")
        create = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding")
        result = gr.HTML(elem_id="ti_create_result")

    with gr.Tab("Preprocess images", id="ti_preprocess"):
        build_preprocess_section(services.folders)

    with gr.Tab("Train", id="ti_train"):
        train = TrainSection(services, EMBEDDING, txt2img)

    def on_create(name_value, init_value, count, overwrite_value):
        try:
            path = services.embeddings.create(name_value, int(count), init_value, bool(overwrite_value))
        except UserError as e:
            return [
                error_html(e, "ti_create_error"),
                *embedding_list.refreshed(False),
                gr.update(),
            ]
        message = f"<p id='ti_create_ok'>Created embedding: {html.escape(str(path))}</p>"
        names = services.embeddings.names()
        return [message, *embedding_list.refreshed(False), gr.update(choices=names)]

    create.click(
        on_create,
        inputs=[name, init_text, vectors, overwrite],
        outputs=[result, *embedding_list.outputs, train.fields["name"]],
    )


def build_preprocess_section(folders: FolderPolicy) -> None:
    with gr.Column():
        src = gr.Textbox(label="Source directory", elem_id="preprocess_src")
        dst = gr.Textbox(label="Destination directory", elem_id="preprocess_dst")
        with gr.Row():
            width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="preprocess_width")
            height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="preprocess_height")
        crop = gr.Radio(
            [("Center crop", "center"), ("Auto focal point crop", "auto"), ("No crop (stretch)", "none")],
            value="center",
            label="Crop",
            elem_id="preprocess_crop",
        )
        with gr.Row():
            flip = gr.Checkbox(False, label="Create flipped copies", elem_id="preprocess_flip")
            split = gr.Checkbox(False, label="Split oversized images", elem_id="preprocess_split")
            captions = gr.Checkbox(True, label="Use existing caption text files", elem_id="preprocess_captions")
        with gr.Row():
            threshold = gr.Slider(
                0, 1, value=0.5, step=0.05, label="Split image threshold", elem_id="preprocess_split_threshold"
            )
            overlap = gr.Slider(
                0, 0.9, value=0.2, step=0.05, label="Split image overlap ratio", elem_id="preprocess_overlap_ratio"
            )
        run = gr.Button("Preprocess", variant="primary", elem_id="preprocess_run")
        message = gr.HTML(elem_id="preprocess_message")

    def on_run(src_v, dst_v, w, h, crop_v, flip_v, split_v, captions_v, threshold_v, overlap_v):
        options = PreprocessOptions(
            src_v,
            dst_v,
            int(w),
            int(h),
            crop_v,
            bool(flip_v),
            bool(split_v),
            float(threshold_v),
            float(overlap_v),
            bool(captions_v),
        )
        try:
            result = preprocess(options, folders=folders)
        except UserError as e:
            return error_html(e, "preprocess_error")
        skipped = f" Skipped: {html.escape('; '.join(result.skipped))}" if result.skipped else ""
        return (
            f"<p id='preprocess_done'>Preprocessing finished: {len(result.written)} images written to "
            f"{html.escape(str(Path(dst_v).resolve()))}.{skipped}</p>"
        )

    run.click(
        on_run, inputs=[src, dst, width, height, crop, flip, split, captions, threshold, overlap], outputs=message
    )
