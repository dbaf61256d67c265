"""The extra-network lists under the txt2img prompt (Textual Inversion, Hypernetworks): click a name to insert it
into the prompt; files that cannot be used are listed with the reason."""

from __future__ import annotations

import html
from collections.abc import Callable

import gradio as gr


def insert_into_prompt(prompt: str, text: str) -> str:
    """Append `text` to the prompt with a separating space, as A1111's extra-network cards do."""
    prompt = prompt or ""
    if prompt and not prompt.endswith((" ", "\n", ",")):
        prompt += " "
    return prompt + text


def skipped_html(skipped: list[tuple[str, str, str]], elem_id: str) -> str:
    """(name, path, reason) rows as a collapsible list."""
    if not skipped:
        return ""
    rows = "".join(
        f"<li><b>{html.escape(name)}</b> ({html.escape(path)}): {html.escape(reason)}</li>"
        for name, path, reason in skipped
    )
    return f"<details id='{elem_id}'><summary>{len(skipped)} skipped</summary><ul>{rows}</ul></details>"


class NetworkList:
    """A titled, clickable list of names plus a refresh control and the skipped files."""

    def __init__(
        self,
        title: str,
        elem_prefix: str,
        prompt: gr.Textbox,
        names: Callable[[], list[str]],
        skipped: Callable[[], list[tuple[str, str, str]]],
        refresh: Callable[[], None],
        insert_text: Callable[[str], str],
        noun: str,
    ):
        self._names, self._skipped, self._refresh, self.elem_prefix = names, skipped, refresh, elem_prefix
        self.noun = noun
        with gr.Accordion(title, open=True, elem_id=f"txt2img_{elem_prefix}"):
            with gr.Row():
                self.refresh_button = gr.Button(
                    "🔄 Refresh", size="sm", elem_id=f"{elem_prefix}_refresh", scale=0, min_width=120
                )
                self.count = gr.Markdown(self._count_text(), elem_id=f"{elem_prefix}_count")
            self.cards = gr.Dataset(
                components=[gr.Textbox(visible=False)],
                samples=self._samples(),
                label=f"{title} (click to add to the prompt)",
                elem_id=f"{elem_prefix}_cards",
                samples_per_page=40,
                type="values",
            )
            self.skipped = gr.HTML(skipped_html(skipped(), f"{elem_prefix}_skipped"))
        self.cards.click(
            lambda value, p: insert_into_prompt(p, insert_text(value[0])),
            inputs=[self.cards, prompt],
            outputs=prompt,
            queue=False,
        )
        self.refresh_button.click(self.refreshed, outputs=self.outputs)

    @property
    def outputs(self) -> list:
        return [self.cards, self.count, self.skipped]

    def _samples(self) -> list[list[str]]:
        return [[name] for name in self._names()]

    def _count_text(self) -> str:
        n = len(self._names())
        return f"{n} loaded" if n else f"No {self.noun} yet."

    def refreshed(self, force: bool = True) -> list:
        if force:
            self._refresh()
        return [
            gr.Dataset(samples=self._samples()),
            self._count_text(),
            skipped_html(self._skipped(), f"{self.elem_prefix}_skipped"),
        ]
