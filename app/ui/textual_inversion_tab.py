"""The Textual Inversion tab: create an embedding, and train one (A1111's fields and defaults)."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from app.errors import UserError
from app.services import Services
from app.training.config import TrainConfig
from app.training.preprocess import PreprocessOptions, preprocess
from app.ui.extra_networks import EmbeddingList
from app.ui.training_panel import TrainingPanel


def build_textual_inversion_tab(
    services: Services, embedding_list: EmbeddingList, txt2img: dict[str, gr.components.Component]
) -> None:
    with gr.Tab("Create embedding", id="ti_create"), gr.Column():
        name = gr.Textbox(label="Name", elem_id="train_embedding_name")
        init_text = gr.Textbox(label="Initialization text", value="*", elem_id="train_initialization_text")
        vectors = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token", elem_id="train_nvpt")
        overwrite = gr.Checkbox(value=False, label="Overwrite Old Embedding", elem_id="train_overwrite_old")
        create = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding")
        result = gr.HTML(elem_id="ti_create_result")

    with gr.Tab("Preprocess images", id="ti_preprocess"):
        build_preprocess_section()

    with gr.Tab("Train", id="ti_train"), gr.Row():
        with gr.Column():
            fields = train_fields(services)
        with gr.Column():
            panel = TrainingPanel(services, "embedding", "ti_train")

    def on_create(name_value, init_value, count, overwrite_value):
        try:
            path = services.embeddings.create(name_value, int(count), init_value, bool(overwrite_value))
        except UserError as e:
            return [
                f"<p class='gen-error' id='ti_create_error'>{html.escape(str(e))}</p>",
                *embedding_list.refreshed(False),
                gr.update(),
            ]
        message = f"<p id='ti_create_ok'>Created embedding: {html.escape(str(path))}</p>"
        names = services.embeddings.names()
        return [message, *embedding_list.refreshed(False), gr.update(choices=names)]

    create.click(
        on_create,
        inputs=[name, init_text, vectors, overwrite],
        outputs=[result, *embedding_list.outputs, fields["name"]],
    )

    order = [k for k in fields if k not in ("name_refresh", "template_refresh", "train", "interrupt")]
    preview_inputs = [
        txt2img[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "width", "height")
    ]

    def on_train(*values):
        given = dict(zip(order, values[: len(order)], strict=True))
        prompt, negative, steps, sampler, cfg_scale, seed, width, height = values[len(order) :]
        cfg = TrainConfig(
            name=given["name"] or "",
            learn_rate=given["learn_rate"],
            batch_size=int(given["batch_size"]),
            gradient_step=int(given["gradient_step"]),
            data_root=given["data_root"],
            log_directory=given["log_directory"],
            template_filename=given["template_filename"] or "",
            training_width=int(given["training_width"]),
            training_height=int(given["training_height"]),
            varsize=bool(given["varsize"]),
            steps=int(given["steps"]),
            clip_grad_mode=given["clip_grad_mode"],
            clip_grad_value=given["clip_grad_value"],
            shuffle_tags=bool(given["shuffle_tags"]),
            tag_drop_out=float(given["tag_drop_out"]),
            latent_sampling_method=given["latent_sampling_method"],
            create_image_every=int(given["create_image_every"]),
            save_every=int(given["save_every"]),
            save_image_with_stored_embedding=bool(given["save_image_with_stored_embedding"]),
            preview_from_txt2img=bool(given["preview_from_txt2img"]),
            preview_prompt=prompt or "",
            preview_negative_prompt=negative or "",
            preview_steps=int(steps),
            preview_sampler_name=sampler,
            preview_cfg_scale=float(cfg_scale),
            preview_seed=int(seed if seed is not None else -1),
            preview_width=int(width),
            preview_height=int(height),
        )
        try:
            services.training.train_embedding(cfg)
        except UserError as e:
            return f"<p class='gen-error' id='train_error'>{html.escape(str(e))}</p>"
        return f"<p id='train_started'>Training embedding '{html.escape(cfg.name)}' started.</p>"

    fields["train"].click(on_train, inputs=[fields[k] for k in order] + preview_inputs, outputs=panel.message)
    fields["interrupt"].click(lambda: services.jobs.interrupt(services.training.running()), queue=False)
    fields["name_refresh"].click(lambda: gr.update(choices=services.embeddings.names()), outputs=fields["name"])
    fields["template_refresh"].click(
        lambda: gr.update(choices=services.training.templates()), outputs=fields["template_filename"]
    )


def build_preprocess_section() -> None:
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
            result = preprocess(options)
        except UserError as e:
            return f"<p class='gen-error' id='preprocess_error'>{html.escape(str(e))}</p>"
        skipped = f" Skipped: {html.escape('; '.join(result.skipped))}" if result.skipped else ""
        return (
            f"<p id='preprocess_done'>Preprocessing finished: {len(result.written)} images written to "
            f"{html.escape(str(Path(dst_v).resolve()))}.{skipped}</p>"
        )

    run.click(
        on_run, inputs=[src, dst, width, height, crop, flip, split, captions, threshold, overlap], outputs=message
    )


def train_fields(services: Services) -> dict[str, gr.components.Component]:
    size = services.models.get().native_size
    templates = services.training.templates()
    f: dict[str, gr.components.Component] = {}
    with gr.Row(equal_height=True):
        f["name"] = gr.Dropdown(services.embeddings.names(), label="Embedding", elem_id="train_embedding", scale=4)
        f["name_refresh"] = gr.Button("🔄", elem_id="train_embedding_refresh", scale=0, min_width=48)
    f["learn_rate"] = gr.Textbox(label="Embedding Learning rate", value="0.005", elem_id="train_embedding_lr")
    with gr.Row():
        f["clip_grad_mode"] = gr.Dropdown(
            ["disabled", "value", "norm"], value="disabled", label="Gradient Clipping", elem_id="train_clip_grad_mode"
        )
        f["clip_grad_value"] = gr.Textbox(value="0.1", label="Clipping value", elem_id="train_clip_grad_value")
    with gr.Row():
        f["batch_size"] = gr.Number(value=1, precision=0, label="Batch size", elem_id="train_batch_size")
        f["gradient_step"] = gr.Number(
            value=1, precision=0, label="Gradient accumulation steps", elem_id="train_gradient_step"
        )
    f["data_root"] = gr.Textbox(
        label="Dataset directory", placeholder="Path to directory with input images", elem_id="train_dataset_directory"
    )
    f["log_directory"] = gr.Textbox(label="Log directory", value="log", elem_id="train_log_directory")
    with gr.Row(equal_height=True):
        default_template = "style_filewords.txt" if "style_filewords.txt" in templates else None
        f["template_filename"] = gr.Dropdown(
            templates, value=default_template, label="Prompt template", elem_id="train_template_file", scale=4
        )
        f["template_refresh"] = gr.Button("🔄", elem_id="train_template_refresh", scale=0, min_width=48)
    f["training_width"] = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="train_width")
    f["training_height"] = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="train_height")
    f["varsize"] = gr.Checkbox(False, label="Do not resize images", elem_id="train_varsize")
    f["steps"] = gr.Number(value=100000, precision=0, label="Max steps", elem_id="train_steps")
    with gr.Row():
        f["create_image_every"] = gr.Number(
            value=500,
            precision=0,
            label="Save an image to log directory every N steps, 0 to disable",
            elem_id="train_create_image_every",
        )
        f["save_every"] = gr.Number(
            value=500,
            precision=0,
            label="Save a copy of embedding to log directory every N steps, 0 to disable",
            elem_id="train_save_embedding_every",
        )
    f["save_image_with_stored_embedding"] = gr.Checkbox(
        True, label="Save images with embedding in PNG chunks", elem_id="train_save_image_with_stored_embedding"
    )
    f["preview_from_txt2img"] = gr.Checkbox(
        False,
        label="Read parameters (prompt, etc...) from txt2img tab when making previews",
        elem_id="train_preview_from_txt2img",
    )
    f["shuffle_tags"] = gr.Checkbox(
        False, label="Shuffle tags by ',' when creating prompts.", elem_id="train_shuffle_tags"
    )
    f["tag_drop_out"] = gr.Slider(
        0, 0.99, value=0, step=0.01, label="Drop out tags when creating prompts.", elem_id="train_tag_drop_out"
    )
    f["latent_sampling_method"] = gr.Radio(
        ["once", "deterministic", "random"],
        value="once",
        label="Choose latent sampling method",
        elem_id="train_latent_sampling_method",
    )
    with gr.Row():
        f["interrupt"] = gr.Button("Interrupt", elem_id="train_interrupt_training")
        f["train"] = gr.Button("Train Embedding", variant="primary", elem_id="train_train_embedding")
    return f
