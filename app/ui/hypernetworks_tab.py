"""The Hypernetworks tab: create a hypernetwork (A1111's options) and train it on the shared engine."""

from __future__ import annotations

import html

import gradio as gr

from app.errors import UserError
from app.hypernetworks.attention import attention_widths
from app.hypernetworks.module import COMMON_ACTIVATIONS, WEIGHT_INITS
from app.hypernetworks.service import STANDARD_WIDTHS
from app.services import Services
from app.ui.extra_networks import NetworkList
from app.ui.messages import error_html, message_html
from app.ui.train_section import HYPERNETWORK, TrainSection


def build_hypernetworks_tab(
    services: Services, hypernetwork_list: NetworkList, txt2img: dict[str, gr.components.Component]
) -> None:
    model_widths = sorted(attention_widths(services.models.get().pipe.unet))
    choices = sorted(set(STANDARD_WIDTHS) | set(model_widths))
    default_sizes = [w for w in (768, 320, 640, 1280) if w in model_widths] or model_widths
    with gr.Tab("Create hypernetwork", id="hn_create"), gr.Column():
        name = gr.Textbox(label="Name", elem_id="hypernetwork_name")
        sizes = gr.CheckboxGroup(
            [str(w) for w in choices],
            value=[str(w) for w in default_sizes],
            label="Modules",
            info=f"Widths the loaded model uses: {', '.join(map(str, model_widths))}",
            elem_id="hypernetwork_new_sizes",
        )
        structure = gr.Textbox(
            "1, 2, 1",
            label="Enter hypernetwork layer structure",
            placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
            elem_id="hypernetwork_layer_structure",
        )
        activation = gr.Dropdown(
            COMMON_ACTIVATIONS,
            value="linear",
            label="Select activation function of hypernetwork. Recommended : Swish / Linear(none)",
            elem_id="hypernetwork_activation",
        )
        init = gr.Dropdown(
            WEIGHT_INITS,
            value="Normal",
            label="Select Layer weights initialization. Recommended: "
            "Kaiming for relu-like, Xavier for sigmoid-like, Normal otherwise",
            elem_id="hypernetwork_initialization",
        )
        layer_norm = gr.Checkbox(False, label="Add layer normalization", elem_id="hypernetwork_add_layer_norm")
        dropout = gr.Checkbox(False, label="Use dropout", elem_id="hypernetwork_use_dropout")
        dropout_structure = gr.Textbox(
            "0, 0, 0",
            label="Enter hypernetwork Dropout structure (or empty). "
            "Recommended : 0~0.35 incrementing sequence: 0, 0.05, 0.15",
            elem_id="hypernetwork_dropout_structure",
        )
        overwrite = gr.Checkbox(False, label="Overwrite Old Hypernetwork", elem_id="hypernetwork_overwrite")
        create = gr.Button("Create hypernetwork", variant="primary", elem_id="create_hypernetwork")
        result = gr.HTML(elem_id="hn_create_result")

    with gr.Tab("Train", id="hn_train"):
        train = TrainSection(services, HYPERNETWORK, txt2img)

    def on_create(
        name_v, sizes_v, structure_v, activation_v, init_v, norm_v, dropout_v, dropout_structure_v, overwrite_v
    ):
        try:
            path, warnings = services.hypernetworks.create(
                name_v,
                [int(s) for s in sizes_v or []],
                structure_v,
                activation_v,
                init_v,
                bool(norm_v),
                bool(dropout_v),
                dropout_structure_v or None,
                bool(overwrite_v),
            )
        except UserError as e:
            return [
                error_html(e, "hn_create_error"),
                *hypernetwork_list.refreshed(False),
                gr.update(),
            ]
        notes = "".join(message_html(w, "gen-note") for w in warnings)
        message = f"<p id='hn_create_ok'>Created hypernetwork: {html.escape(str(path))}</p>{notes}"
        return [message, *hypernetwork_list.refreshed(False), gr.update(choices=services.hypernetworks.names())]

    create.click(
        on_create,
        inputs=[name, sizes, structure, activation, init, layer_norm, dropout, dropout_structure, overwrite],
        outputs=[result, *hypernetwork_list.outputs, train.fields["name"]],
    )
