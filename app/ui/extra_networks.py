"""The extra-network lists under the txt2img prompt (Textual Inversion, Hypernetworks): click a name to insert it
into the prompt; files that cannot be used are listed with the reason."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Listing:
    """One look at a folder: a row per usable file (its name first, then the list's extra columns) and the
    skipped files as (name, path, reason). Read once per refresh: the columns come from the same look."""

    rows: list[list]
    skipped: list[tuple[str, str, str]]


class NetworkList:
    """A titled, clickable list of names plus a refresh control and the skipped files. `extra_columns` label text
    columns after the name (e.g. a LoRA's trigger words) and `image_column` a last one of card images (a path, or
    None), in the order `listing` gives each row; with `negative`, a click may add to the negative prompt too."""

    def __init__(
        self,
        title: str,
        elem_prefix: str,
        prompt: gr.Textbox,
        listing: Callable[[], Listing],
        refresh: Callable[[], None],
        insert_text: Callable[[str], str],
        noun: str,
        extra_columns: tuple[str, ...] = (),
        image_column: str | None = None,
        negative: gr.Textbox | None = None,
        insert_negative: Callable[[str], str] | None = None,
    ):
        self._listing, self._refresh, self.elem_prefix, self.noun = listing, refresh, elem_prefix, noun
        first = listing()
        with gr.Accordion(title, open=True, elem_id=f"txt2img_{elem_prefix}"):
            with gr.Row():
                self.refresh_button = gr.Button(
                    "🔄 Refresh", size="sm", elem_id=f"{elem_prefix}_refresh", scale=0, min_width=120
                )
                self.count = gr.Markdown(self._count_text(first), elem_id=f"{elem_prefix}_count")
            columns = [gr.Textbox(visible=False, label=label) for label in ("Name", *extra_columns)]
            if image_column is not None:
                columns.append(gr.Image(visible=False, label=image_column))
            self.cards = gr.Dataset(
                components=columns,
                samples=first.rows,
                label=f"{title} (click to add to the prompt)",
                elem_id=f"{elem_prefix}_cards",
                samples_per_page=40,
                type="values",
            )
            self.skipped = gr.HTML(skipped_html(first.skipped, f"{elem_prefix}_skipped"))
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

    def _count_text(self, listing: Listing) -> str:
        n = len(listing.rows)
        return f"{n} loaded" if n else f"No {self.noun} yet."

    def refreshed(self, force: bool = True) -> list:
        if force:
            self._refresh()
        listing = self._listing()
        return [
            gr.Dataset(samples=listing.rows),
            self._count_text(listing),
            skipped_html(listing.skipped, f"{self.elem_prefix}_skipped"),
        ]
