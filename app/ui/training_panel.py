"""The live view of a training run, shared by the Textual Inversion and Hypernetwork tabs.

It polls the job runner (not the browser session), so closing the page never stops training and reopening it
shows the run where it is.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from app.services import Services
from app.training.service import result_message
from app.ui.messages import error_html, message_html

POLL_SECONDS = 1.0


def _progress_html(job) -> str:
    p = job.progress
    percent = int(p.fraction * 100)
    eta = job.eta_seconds()
    eta_text = f" · ETA {eta:.0f}s" if eta is not None and job.status == "running" else ""
    notes = []
    if skipped := p.extra.get("skipped_images"):
        notes.append(f"Skipped unreadable images: {'; '.join(skipped)}")
    if checkpointing := p.extra.get("gradient_checkpointing"):
        notes.append(checkpointing)
    note = "".join(message_html(text, "gen-note", tag="div") for text in notes)
    return (
        "<div style='width:100%;background:#eee;border-radius:4px'>"
        f"<div class='train-progress-bar' style='width:{percent}%;background:#f97316;height:8px;border-radius:4px'>"
        f"</div></div><div class='train-progress-text'>{html.escape(p.text)}{eta_text}</div>{note}"
    )


class TrainingPanel:
    def __init__(self, services: Services, kind: str, elem_prefix: str):
        self.services = services
        self.kind = kind  # "embedding" or "hypernetwork"
        with gr.Column():
            self.message = gr.HTML(elem_id=f"{elem_prefix}_message")
            self.progress = gr.HTML(elem_id=f"{elem_prefix}_progress")
            self.preview = gr.Image(
                label="Latest preview", interactive=False, height=256, elem_id=f"{elem_prefix}_preview"
            )
            # kohya's sample prompts give one image per line at each preview step: all of them, captioned with
            # their prompts, once a run has more than one (the image above stays the first line's)
            self.samples = gr.Gallery(
                label="Sample prompts at the latest preview step",
                columns=4,
                height=220,
                visible=False,
                elem_id=f"{elem_prefix}_samples",
            )
            self.plot = gr.LinePlot(
                pd.DataFrame({"step": [], "loss": []}),
                x="step",
                y="loss",
                title="Loss (mean of recent steps)",
                elem_id=f"{elem_prefix}_loss_plot",
                height=240,
            )
            # A plot of its own, shown once a run measures it: gradio 6 does not redraw a plot's second colour
            # series on update (tried), and the two losses have different scales anyway.
            self.validation_plot = gr.LinePlot(
                pd.DataFrame({"step": [], "loss": []}),
                x="step",
                y="loss",
                title="Validation loss (held-out images)",
                elem_id=f"{elem_prefix}_validation_plot",
                height=200,
                visible=False,
            )
        shown_preview = gr.State(-1)  # per browser session: which preview this page already shows
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(self.poll, inputs=shown_preview, outputs=[*self.outputs, shown_preview], show_progress="hidden")

    @property
    def outputs(self) -> list:
        return [self.message, self.progress, self.preview, self.samples, self.plot, self.validation_plot]

    def poll(self, shown_preview: int):
        job = self.services.training.running()
        if job is None or not job.kind.endswith(self.kind):
            return [gr.update()] * len(self.outputs) + [shown_preview]
        message = gr.update()
        if job.finished:
            if job.error is not None:
                message = error_html(job.error, "train_error")
            elif job.result is not None:
                text = result_message(job.result, self.kind)
                css = "gen-error" if job.result.error else "train-done"
                message = message_html(text, css, "train_result")
        preview = samples = gr.update()
        p = job.progress
        if p.preview is not None and p.preview_id != shown_preview:
            shown_preview = p.preview_id
            preview = p.preview()
            shown = p.previews() if p.previews is not None else []
            samples = gr.update(value=shown, visible=True) if len(shown) > 1 else gr.update(visible=False)
        history = list(p.history)
        plot = pd.DataFrame(history, columns=["step", "loss"]) if history else gr.update()
        measured = list(p.extra.get("validation_history", []))
        validation = (
            gr.update(value=pd.DataFrame(measured, columns=["step", "loss"]), visible=True)
            if measured
            else gr.update(visible=False)
        )
        return [message, _progress_html(job), preview, samples, plot, validation, shown_preview]
