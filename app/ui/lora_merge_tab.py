"""LoRA tab → Merge: the loaded model with LoRAs applied, saved as a new checkpoint (kohya's `merge_lora.py`)."""

from __future__ import annotations

import gradio as gr

from app.errors import UserError
from app.lora.merge import SAVE_DTYPES
from app.services import Services
from app.ui.messages import error_html, message_html


def build_lora_merge_tab(services: Services, checkpoint: gr.Dropdown) -> None:
    """The Merge view; the new checkpoint joins the checkpoint dropdown's choices at once."""
    gr.Markdown(
        "Bake LoRAs into the loaded checkpoint: write them as in a prompt, with their weights (`te=`/`unet=` and "
        "block weights work as in txt2img), and the model with them applied is saved as a new checkpoint in the "
        "checkpoint folder. It generates as the loaded model does with those tags, without them, anywhere that "
        "loads a checkpoint."
    )
    loras = gr.Textbox(
        label="LoRAs to merge", placeholder="<lora:name:0.8> <lora:other:0.5>", elem_id="lora_merge_loras"
    )
    with gr.Row():
        name = gr.Textbox(label="Name of the new checkpoint", elem_id="lora_merge_name")
        precision = gr.Dropdown(
            choices=list(SAVE_DTYPES), value="fp16", label="Save precision", elem_id="lora_merge_precision"
        )
    merge = gr.Button("Merge into a new checkpoint", variant="primary", elem_id="lora_merge_button")
    message = gr.HTML(elem_id="lora_merge_message")

    def on_merge(tags: str, new_name: str, dtype: str) -> list:
        try:
            path, report = services.merge_lora(tags or "", (new_name or "").strip(), dtype or "fp16")
        except UserError as e:
            return [error_html(e, "lora_merge_error"), gr.update()]
        done = message_html(
            f"Wrote {path}: {report.sentence()}. Pick it in the checkpoint list to use it.",
            "train-done",
            "lora_merge_done",
        )
        return [done, gr.update(choices=[c.title for c in services.models.checkpoints])]

    merge.click(on_merge, inputs=[loras, name, precision], outputs=[message, checkpoint])
