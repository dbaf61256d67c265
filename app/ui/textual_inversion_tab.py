"""The Textual Inversion tab: create an embedding (training arrives in the Train section)."""

from __future__ import annotations

import html

import gradio as gr

from app.errors import UserError
from app.services import Services
from app.ui.extra_networks import EmbeddingList


def build_textual_inversion_tab(services: Services, embedding_list: EmbeddingList) -> None:
    with gr.Tab("Create embedding", id="ti_create"), gr.Column():
        name = gr.Textbox(label="Name", elem_id="train_embedding_name")
        init_text = gr.Textbox(label="Initialization text", value="*", elem_id="train_initialization_text")
        vectors = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token", elem_id="train_nvpt")
        overwrite = gr.Checkbox(value=False, label="Overwrite Old Embedding", elem_id="train_overwrite_old")
        create = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding")
        result = gr.HTML(elem_id="ti_create_result")

    def on_create(name_value, init_value, count, overwrite_value):
        try:
            path = services.embeddings.create(name_value, int(count), init_value, bool(overwrite_value))
        except UserError as e:
            return [
                f"<p class='gen-error' id='ti_create_error'>{html.escape(str(e))}</p>",
                *embedding_list.refreshed(False),
            ]
        message = f"<p id='ti_create_ok'>Created embedding: {html.escape(str(path))}</p>"
        return [message, *embedding_list.refreshed(False)]

    create.click(on_create, inputs=[name, init_text, vectors, overwrite], outputs=[result, *embedding_list.outputs])
