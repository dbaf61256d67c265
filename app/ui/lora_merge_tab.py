"""LoRA tab → Merge: LoRAs baked into the loaded model, saved as a new checkpoint (kohya's `merge_lora.py`), or
several LoRAs made one (kohya's `svd_merge_lora.py`)."""

from __future__ import annotations

import gradio as gr

from app.errors import UserError
from app.lora.extract import ExtractOptions
from app.lora.writer import SAVE_DTYPES
from app.services import Services
from app.ui.extra_networks import NetworkList
from app.ui.lora_extract_tab import follow
from app.ui.messages import error_html, message_html

CHECKPOINT, LORA = "a new checkpoint", "a new LoRA"


def build_lora_merge_tab(
    services: Services, checkpoint: gr.Dropdown, lora_list: NetworkList, lora_info_name: gr.Dropdown
) -> None:
    """The Merge view; a new checkpoint joins the checkpoint dropdown's choices at once, a new LoRA the Lora list
    and the Info tab's picker."""
    gr.Markdown(
        "Write LoRAs as in a prompt, with their weights (`te=`/`unet=` and block weights work as in txt2img). "
        "**A new checkpoint**: the loaded model with them applied, saved in the checkpoint folder; it generates as "
        "the loaded model does with those tags, anywhere that loads a checkpoint. **A new LoRA**: their combined "
        "change as one LoRA of the given rank, in the LoRA folder."
    )
    loras = gr.Textbox(
        label="LoRAs to merge", placeholder="<lora:name:0.8> <lora:other:0.5>", elem_id="lora_merge_loras"
    )
    with gr.Row():
        into = gr.Radio(choices=[CHECKPOINT, LORA], value=CHECKPOINT, label="Merge into", elem_id="lora_merge_into")
        name = gr.Textbox(label="Name of the new file", elem_id="lora_merge_name")
        rank = gr.Number(value=32, precision=0, label="Rank (a new LoRA)", elem_id="lora_merge_rank")
        precision = gr.Dropdown(
            choices=list(SAVE_DTYPES), value="fp16", label="Save precision", elem_id="lora_merge_precision"
        )
    merge = gr.Button("Merge", variant="primary", elem_id="lora_merge_button")
    message = gr.HTML(elem_id="lora_merge_message")

    def on_merge(
        tags: str,
        target: str,
        new_name: str,
        rank_value,
        dtype: str,
        progress=gr.Progress(),
    ) -> list:
        try:
            if target == LORA:
                if rank_value is None:
                    raise UserError("'Rank' is empty: enter a whole number.", "rank")
                options = ExtractOptions(rank=int(rank_value), save_precision=dtype or "fp16")
                job = services.start_merge_to_lora(tags or "", (new_name or "").strip(), options)
                path, report = follow(services, job, progress)
            else:
                path, report = services.merge_lora(tags or "", (new_name or "").strip(), dtype or "fp16")
        except UserError as e:
            return [error_html(e, "lora_merge_error"), gr.update(), gr.update(), *lora_list.refreshed(False)]
        where = "checkpoint list" if target != LORA else "Lora list"
        done = message_html(
            f"Wrote {path}: {report.sentence().rstrip('.')}. It is in the {where}.", "train-done", "lora_merge_done"
        )
        checkpoints = gr.update(choices=[c.title for c in services.models.checkpoints])
        return [done, checkpoints, gr.update(choices=services.loras.names()), *lora_list.refreshed(False)]

    merge.click(
        on_merge,
        inputs=[loras, into, name, rank, precision],
        outputs=[message, checkpoint, lora_info_name, *lora_list.outputs],
    )
