"""The page: quick settings on top (checkpoint, Clip skip), then the tabs."""

from __future__ import annotations

import html
import platform
from importlib.metadata import PackageNotFoundError, version

import gradio as gr

from app.errors import UserError
from app.services import Services
from app.ui.checkpoint_merger_tab import build_checkpoint_merger_tab, picker_choices
from app.ui.hypernetworks_tab import build_hypernetworks_tab
from app.ui.lora_extract_tab import build_lora_extract_tab, model_choices
from app.ui.lora_info_tab import build_lora_info_tab
from app.ui.lora_merge_tab import build_lora_merge_tab
from app.ui.messages import error_html
from app.ui.pnginfo_tab import build_pnginfo_tab
from app.ui.textual_inversion_tab import build_textual_inversion_tab
from app.ui.train_section import LORA, TrainSection
from app.ui.txt2img_tab import build_txt2img_tab

CSS = """
#generate_box button { min-height: 4.5em; }
#tool_button { max-width: 3em; min-width: 3em !important; }
.gen-error { color: #c0392b; font-weight: 600; }
#footer { text-align: center; opacity: 0.7; font-size: 0.85em; margin-top: 1em; }
#progress_text { min-height: 1.5em; }
"""


def ui_theme() -> gr.themes.Base:
    # System fonts only: the page must load completely with no internet access (no web fonts).
    return gr.themes.Default(
        font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def footer_text(services: Services) -> str:
    """A1111's footer line, for bug reports: versions, and where and in what precision the model runs (so that
    whether `--bf16` or `--no-half` took effect is visible on the page). Versions from the installed packages'
    metadata: the UI does not import torch."""
    models = services.models
    precision = str(models.dtype).replace("torch.", "")
    if models.vae_dtype != models.dtype:
        precision += ", VAE " + str(models.vae_dtype).replace("torch.", "")
    parts = [f"python: {platform.python_version()}"]
    parts += [f"{name}: {_version(name)}" for name in ("torch", "diffusers", "transformers", "gradio")]
    parts.append(f"device: {models.device} ({precision})")
    return " \u2022 ".join(parts)


def build_ui(services: Services) -> gr.Blocks:
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(
                label="Stable Diffusion checkpoint",
                choices=[c.title for c in services.models.checkpoints],
                value=services.options["sd_model_checkpoint"],
                elem_id="sd_model_checkpoint",
                scale=4,
                # Titles change when a load computes the hash ("name" -> "name [hash]"); an event still carrying
                # the old title must not be refused by Gradio's choice check (select_checkpoint finds either).
                allow_custom_value=True,
            )
            refresh = gr.Button("🔄", elem_id="refresh_checkpoints", scale=0, min_width=48)
            clip_skip = gr.Slider(
                1,
                12,
                step=1,
                value=int(services.options["CLIP_stop_at_last_layers"] or 1),
                label="Clip skip",
                elem_id="clip_skip",
                scale=2,
            )
        status = gr.HTML(elem_id="quicksettings_status")

        def on_checkpoint(title: str):
            try:
                info = services.select_checkpoint(title)
            except UserError as e:
                return gr.update(), error_html(e, tag="span")  # the message may hold a file's name: escaped
            # Loading computes the hash, which changes the title ("name [hash]"): new choices with it, or the
            # dropdown would hold a value that is not among its choices and show nothing.
            choices = [c.title for c in services.models.refresh()]
            return gr.update(choices=choices, value=info.title), html.escape(f"Loaded {info.title}")

        def on_refresh():
            found = services.models.refresh()
            word = "checkpoint" if len(found) == 1 else "checkpoints"
            return gr.update(choices=[c.title for c in found]), f"Found {len(found)} {word}"

        def on_clip_skip(value: float):
            services.set_options({"CLIP_stop_at_last_layers": int(value)})

        checkpoint.input(on_checkpoint, inputs=checkpoint, outputs=[checkpoint, status])
        refresh.click(on_refresh, outputs=[checkpoint, status])
        clip_skip.release(on_clip_skip, inputs=clip_skip)

        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                txt2img_fields, embedding_list, hypernetwork_list, lora_list, gallery = build_txt2img_tab(services)
            with gr.Tab("Textual Inversion", id="textual_inversion"), gr.Tabs():
                build_textual_inversion_tab(services, embedding_list, txt2img_fields)
            with gr.Tab("Hypernetworks", id="hypernetworks"), gr.Tabs():
                build_hypernetworks_tab(services, hypernetwork_list, txt2img_fields)
            with gr.Tab("LoRA", id="lora"), gr.Tabs():
                with gr.Tab("Train", id="lora_train_tab"):
                    TrainSection(services, LORA, txt2img_fields)
                with gr.Tab("Info", id="lora_info_tab"):
                    lora_info_name = build_lora_info_tab(services, lora_list, gallery)
                with gr.Tab("Extract", id="lora_extract_tab"):
                    extract_pickers = build_lora_extract_tab(services, lora_list, lora_info_name)
                with gr.Tab("Merge", id="lora_merge_tab"):
                    build_lora_merge_tab(services, checkpoint, lora_list, lora_info_name)
            with gr.Tab("Checkpoint Merger", id="modelmerger"):
                merger_pickers = build_checkpoint_merger_tab(services, checkpoint)
            with gr.Tab("PNG Info", id="pnginfo"):
                build_pnginfo_tab(txt2img_fields, tabs)
        gr.HTML(f"<div>{html.escape(footer_text(services))}</div>", elem_id="footer")

        # The page is built once; what changed since (new files, a model picked through the API) shows on load.
        def on_page_load():
            current = services.options["sd_model_checkpoint"]
            # A rescan is a directory listing (hashes are cached), so a reloaded page shows new files.
            choices = [c.title for c in services.models.refresh()]
            return [
                gr.update(choices=sorted(services.styles.styles())),
                gr.update(choices=choices, value=current),
                *embedding_list.refreshed(False),
                *hypernetwork_list.refreshed(False),
                *lora_list.refreshed(False),
                gr.update(choices=services.loras.names()),
                *model_choices(services),
                *picker_choices(services),
            ]

        demo.load(
            on_page_load,
            outputs=[
                txt2img_fields["styles"],
                checkpoint,
                *embedding_list.outputs,
                *hypernetwork_list.outputs,
                *lora_list.outputs,
                lora_info_name,
                *extract_pickers,
                *merger_pickers,
            ],
        )
    return demo
