"""The "Textual Inversion" list under the txt2img prompt: click a name to insert it; see what was skipped why."""

from __future__ import annotations

import html

import gradio as gr

from app.embeddings.service import EmbeddingService


def insert_into_prompt(prompt: str, text: str) -> str:
    """Append `text` to the prompt with a separating space, as A1111's extra-network cards do."""
    prompt = prompt or ""
    if prompt and not prompt.endswith((" ", "\n", ",")):
        prompt += " "
    return prompt + text


def skipped_html(service: EmbeddingService) -> str:
    skipped = service.listing()["skipped"]
    if not skipped:
        return ""
    rows = "".join(
        f"<li><b>{html.escape(name)}</b> ({html.escape(info['path'])}): {html.escape(info['reason'])}</li>"
        for name, info in skipped.items()
    )
    return f"<details id='ti_skipped'><summary>{len(skipped)} skipped</summary><ul>{rows}</ul></details>"


class EmbeddingList:
    """The clickable list of loaded embeddings and its refresh control."""

    def __init__(self, service: EmbeddingService, prompt: gr.Textbox):
        self.service = service
        with gr.Accordion("Textual Inversion", open=True, elem_id="txt2img_textual_inversion"):
            with gr.Row():
                self.refresh_button = gr.Button("🔄 Refresh", size="sm", elem_id="ti_refresh", scale=0, min_width=120)
                self.count = gr.Markdown(self._count_text(), elem_id="ti_count")
            self.cards = gr.Dataset(
                components=[gr.Textbox(visible=False)],
                samples=self._samples(),
                label="Embeddings (click to add to the prompt)",
                elem_id="ti_cards",
                samples_per_page=40,
                type="values",
            )
            self.skipped = gr.HTML(skipped_html(service), elem_id="ti_skipped_html")
        self.cards.click(
            lambda value, p: insert_into_prompt(p, value[0]), inputs=[self.cards, prompt], outputs=prompt, queue=False
        )
        self.refresh_button.click(self.refreshed, outputs=self.outputs)

    @property
    def outputs(self) -> list:
        return [self.cards, self.count, self.skipped]

    def _samples(self) -> list[list[str]]:
        return [[name] for name in self.service.names()]

    def _count_text(self) -> str:
        n = len(self.service.names())
        return f"{n} embedding{'s' if n != 1 else ''} loaded" if n else "No embeddings loaded yet."

    def refreshed(self, force: bool = True) -> list:
        if force:
            self.service.refresh()
        return [gr.Dataset(samples=self._samples()), self._count_text(), skipped_html(self.service)]
