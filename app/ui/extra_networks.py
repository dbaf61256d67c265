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


def lora_about(row: dict) -> str:
    """A LoRA card's second column: its trigger words (the .json's activation text, embeddings bundled in the
    file), preferred weight and the first line of its description."""
    parts = []
    if row.get("activation_text"):
        parts.append(row["activation_text"])
    if row.get("embeddings"):
        parts.append("bundled: " + ", ".join(row["embeddings"]))
    if row.get("preferred_weight"):
        parts.append(f"weight {row['preferred_weight']:g}")
    description = (row.get("description") or "").strip().splitlines()
    if description:
        first = description[0]
        parts.append(first if len(first) <= 80 else first[:79] + "…")
    if row.get("user_metadata_problem"):
        parts.append(f"({row['user_metadata_problem']})")
    return " · ".join(parts)


class NetworkList:
    """A titled, clickable list of names plus a refresh control and the skipped files. With `about`, each name has
    a second column (e.g. a LoRA's trigger words); with `images`, a third with its card image (a path, or None);
    with `negative`, a click may add to the negative prompt too."""

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
        about: Callable[[], dict[str, str]] | None = None,
        images: Callable[[], dict[str, str | None]] | None = None,
        negative: gr.Textbox | None = None,
        insert_negative: Callable[[str], str] | None = None,
    ):
        self._names, self._skipped, self._refresh, self.elem_prefix = names, skipped, refresh, elem_prefix
        self.noun, self._about, self._images = noun, about, images
        with gr.Accordion(title, open=True, elem_id=f"txt2img_{elem_prefix}"):
            with gr.Row():
                self.refresh_button = gr.Button(
                    "🔄 Refresh", size="sm", elem_id=f"{elem_prefix}_refresh", scale=0, min_width=120
                )
                self.count = gr.Markdown(self._count_text(), elem_id=f"{elem_prefix}_count")
            columns = [gr.Textbox(visible=False, label="Name")]
            if about is not None:
                columns.append(gr.Textbox(visible=False, label="Trigger words, description"))
            if about is not None and images is not None:
                columns.append(gr.Image(visible=False, label="Card image"))
            self.cards = gr.Dataset(
                components=columns,
                samples=self._samples(),
                label=f"{title} (click to add to the prompt)",
                elem_id=f"{elem_prefix}_cards",
                samples_per_page=40,
                type="values",
            )
            self.skipped = gr.HTML(skipped_html(skipped(), f"{elem_prefix}_skipped"))
        if negative is not None and insert_negative is not None:
            self.cards.click(
                lambda value, p, n: (
                    insert_into_prompt(p, insert_text(value[0])),
                    insert_into_prompt(n, text) if (text := insert_negative(value[0])) else n,
                ),
                inputs=[self.cards, prompt, negative],
                outputs=[prompt, negative],
                queue=False,
            )
        else:
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
        if self._about is None:
            return [[name] for name in self._names()]
        about = self._about()
        if self._images is None:
            return [[name, about.get(name, "")] for name in self._names()]
        images = self._images()
        return [[name, about.get(name, ""), images.get(name)] for name in self._names()]

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
