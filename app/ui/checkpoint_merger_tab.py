"""The Checkpoint Merger tab (A1111's): two or three checkpoints combined into a new one in the checkpoint folder."""

from __future__ import annotations

import gradio as gr

from app.errors import UserError
from app.lora.writer import SAVE_DTYPES
from app.models.merger import ADD_DIFFERENCE, INTERP_METHODS, WEIGHTED_SUM, MergerOptions
from app.services import Services
from app.ui.lora_extract_tab import follow
from app.ui.messages import error_html, message_html

NONE = "None"


def _titles(services: Services) -> list[str]:
    return [info.title for info in services.models.checkpoints]


def build_checkpoint_merger_tab(services: Services, checkpoint: gr.Dropdown) -> list:
    """The tab; a new checkpoint joins the checkpoint dropdown's choices at once. Returns its pickers (A, B, C and
    the VAE), whose choices `picker_choices` refreshes on page load."""
    gr.Markdown(
        "A merger of two or three checkpoints, written as a new `.safetensors` in the checkpoint folder. **Weighted "
        "sum**: (1 - M) A + M B. **Add difference**: A + M (B - C), which moves what a fine-tune B learned from its "
        "base C onto another model A. **No interpolation**: A alone, to save it in another precision, bake in a VAE "
        "or discard weights. The models are read and the result written one tensor at a time, so a merge needs "
        "little memory; the loaded model is not touched."
    )
    with gr.Row():
        # a merge hashes its inputs, which changes their titles ("name" -> "name [hash]"): the old title stays
        # valid (models are found by either), as in the checkpoint dropdown
        primary, secondary, tertiary = (
            gr.Dropdown(
                choices=_titles(services), value=None, label=label, elem_id=f"merger_{key}", allow_custom_value=True
            )
            for key, label in (("a", "Primary model (A)"), ("b", "Secondary model (B)"), ("c", "Tertiary model (C)"))
        )
        refresh = gr.Button("🔄", elem_id="merger_refresh", scale=0, min_width=48)
    custom_name = gr.Textbox(
        label="Custom Name (Optional; empty: A1111's, e.g. 0.7(a) + 0.3(b))", elem_id="merger_custom_name"
    )
    multiplier = gr.Slider(
        0, 1, step=0.05, value=0.3, label="Multiplier (M) - set to 0 to get model A", elem_id="merger_m"
    )
    method = gr.Radio(
        choices=list(INTERP_METHODS), value=WEIGHTED_SUM, label="Interpolation Method", elem_id="merger_method"
    )
    with gr.Row():
        precision = gr.Radio(
            choices=list(SAVE_DTYPES), value="fp16", label="Save precision", elem_id="merger_precision"
        )
        vae = gr.Dropdown(
            choices=[NONE, *services.models.vae_files()], value=NONE, label="Bake in VAE", elem_id="merger_vae"
        )
    discard = gr.Textbox(
        label="Discard weights with matching name (a regular expression)",
        placeholder=r"e.g. ^model_ema",
        elem_id="merger_discard",
    )
    with gr.Accordion("Metadata", open=False, elem_id="merger_metadata_accordion"):
        with gr.Row():
            save_metadata = gr.Checkbox(value=True, label="Save metadata", elem_id="merger_save_metadata")
            add_recipe = gr.Checkbox(value=True, label="Add merge recipe metadata", elem_id="merger_add_recipe")
            copy_fields = gr.Checkbox(
                value=True, label="Copy metadata from merged models", elem_id="merger_copy_metadata"
            )
        metadata_json = gr.Code(value="{}", language="json", label="Metadata (JSON)", elem_id="merger_metadata_json")
    merge = gr.Button("Merge", variant="primary", elem_id="merger_button")
    message = gr.HTML(elem_id="merger_message")

    def on_merge(a, b, c, name, m, how, dtype, vae_name, pattern, save, recipe, copy, extra, progress=gr.Progress()):
        try:
            options = MergerOptions(
                primary=a or "",
                secondary=(b or "") if how != "No interpolation" else "",
                tertiary=(c or "") if how == ADD_DIFFERENCE else "",
                interp_method=how,
                multiplier=float(m),
                save_precision=dtype or "fp16",
                custom_name=(name or "").strip(),
                bake_in_vae=vae_name or NONE,
                discard_weights=pattern or "",
                save_metadata=bool(save),
                add_merge_recipe=bool(recipe),
                copy_metadata_fields=bool(copy),
                metadata_json=(extra or "").strip() if (extra or "").strip() != "{}" else "",
            )
            path, report = follow(services, services.start_merge_checkpoints(options), progress)
        except UserError as e:
            return [error_html(e, "merger_error"), gr.update(), *picker_choices(services)]
        done = message_html(
            f"Checkpoint saved to {path}: {report.sentence()}. It is in the checkpoint list.",
            "train-done",
            "merger_done",
        )
        return [done, gr.update(choices=_titles(services)), *picker_choices(services)]

    pickers = [primary, secondary, tertiary, vae]
    merge.click(
        on_merge,
        inputs=[primary, secondary, tertiary, custom_name, multiplier, method, precision, vae, discard, save_metadata,
                add_recipe, copy_fields, metadata_json],
        outputs=[message, checkpoint, *pickers],
    )  # fmt: skip
    refresh.click(lambda: picker_choices(services, rescan=True), outputs=pickers)
    return pickers


def picker_choices(services: Services, rescan: bool = False) -> list:
    """Updates for the A, B, C and VAE pickers (after a rescan of the checkpoint folder with `rescan`)."""
    if rescan:
        services.models.refresh()
    titles = _titles(services)
    return [gr.update(choices=titles)] * 3 + [gr.update(choices=[NONE, *services.models.vae_files()])]
