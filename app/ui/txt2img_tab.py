"""The txt2img tab: A1111's fields, a Generate button that turns into Interrupt, live progress, gallery, info."""

from __future__ import annotations

import html
import math
import time

import gradio as gr

from app.errors import UserError
from app.generation.hires import upscaler_names
from app.generation.samplers import sampler_names, schedule_labels
from app.generation.txt2img import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_SIZE, MAX_STEPS, MIN_SIZE, Txt2ImgParams
from app.jobs import Job
from app.services import Services
from app.ui.extra_networks import Listing, NetworkList, lora_about
from app.ui.messages import error_html, message_html

POLL_SECONDS = 0.25


def progress_html(job: Job, position: int) -> str:
    if position > 0:
        return f"<div class='progress-text'>Waiting in queue: {position} job(s) ahead</div>"
    p = job.progress
    percent = int(p.fraction * 100)
    eta = job.eta_seconds()
    eta_text = f" · ETA {eta:.0f}s" if eta is not None else ""
    return (
        "<div class='progress-wrap' style='width:100%;background:#eee;border-radius:4px'>"
        f"<div id='progress_bar' style='width:{percent}%;background:#f97316;height:8px;border-radius:4px'></div>"
        f"</div><div class='progress-text'>{percent}% · {html.escape(p.text)}{eta_text}</div>"
    )


def info_html(infotext: str, seconds: float, notes: list[str], interrupted: bool) -> str:
    lines = [f"<p id='generation_info_text' style='white-space:pre-wrap'>{html.escape(infotext)}</p>"]
    if interrupted:
        lines.append("<p><b>Interrupted</b>: showing what finished.</p>")
    lines += [message_html(n, "gen-note") for n in notes]
    lines.append(f"<p class='gen-time'>Time taken: {seconds:.2f} s</p>")
    return "".join(lines)


def build_txt2img_tab(
    services: Services,
) -> tuple[dict[str, gr.components.Component], NetworkList, NetworkList, NetworkList, gr.Gallery]:
    size = services.models.get().native_size
    with gr.Row():
        with gr.Column(scale=6):
            prompt = gr.Textbox(
                label="Prompt", lines=3, elem_id="txt2img_prompt", placeholder="Prompt (press Ctrl+Enter to generate)"
            )
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
        with gr.Column(scale=1, elem_id="generate_box"):
            generate_btn = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            interrupt_btn = gr.Button("Interrupt", variant="stop", visible=False, elem_id="txt2img_interrupt")
            with gr.Row(equal_height=True):
                styles = gr.Dropdown(
                    sorted(services.styles.styles()),
                    value=[],
                    multiselect=True,
                    label="Styles",
                    elem_id="txt2img_styles",
                    scale=4,
                )
                apply_styles = gr.Button("📋", elem_id="txt2img_style_apply", scale=0, min_width=48)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                sampler = gr.Dropdown(
                    sampler_names(), value="DPM++ 2M", label="Sampling method", elem_id="txt2img_sampling"
                )
                schedule = gr.Dropdown(
                    schedule_labels(), value="Automatic", label="Schedule type", elem_id="txt2img_scheduler"
                )
            steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
            with gr.Row():
                with gr.Column():
                    width = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Height", elem_id="txt2img_height")
                with gr.Column():
                    batch_count = gr.Slider(
                        1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count"
                    )
                    batch_size = gr.Slider(
                        1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size"
                    )
            cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            with gr.Row(equal_height=True):
                seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed", scale=4)
                random_seed = gr.Button("🎲", elem_id="txt2img_random_seed", scale=0, min_width=48)
                reuse_seed = gr.Button("♻️", elem_id="txt2img_reuse_seed", scale=0, min_width=48)
                extra_seed = gr.Checkbox(False, label="Extra", elem_id="txt2img_subseed_show", scale=1)
            with gr.Group(visible=False) as variation_group:
                with gr.Row():
                    subseed = gr.Number(value=-1, precision=0, label="Variation seed", elem_id="txt2img_subseed")
                    subseed_strength = gr.Slider(
                        0, 1, value=0, step=0.01, label="Variation strength", elem_id="txt2img_subseed_strength"
                    )
                with gr.Row():
                    seed_resize_w = gr.Slider(
                        0,
                        MAX_SIZE,
                        value=0,
                        step=8,
                        label="Resize seed from width",
                        elem_id="txt2img_seed_resize_from_w",
                    )
                    seed_resize_h = gr.Slider(
                        0,
                        MAX_SIZE,
                        value=0,
                        step=8,
                        label="Resize seed from height",
                        elem_id="txt2img_seed_resize_from_h",
                    )
            extra_seed.change(lambda on: gr.update(visible=on), inputs=extra_seed, outputs=variation_group, queue=False)
            tiling = gr.Checkbox(False, label="Tiling", elem_id="txt2img_tiling")
            with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
                enable_hr = gr.Checkbox(False, label="Enable hires. fix", elem_id="txt2img_enable_hr")
                with gr.Row():
                    hr_upscaler = gr.Dropdown(
                        upscaler_names(), value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler"
                    )
                    hr_steps = gr.Slider(
                        0, MAX_STEPS, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps"
                    )
                    denoising = gr.Slider(
                        0, 1, value=0.7, step=0.01, label="Denoising strength", elem_id="txt2img_denoising_strength"
                    )
                with gr.Row():
                    hr_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                    hr_resize_x = gr.Slider(
                        0, MAX_SIZE, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x"
                    )
                    hr_resize_y = gr.Slider(
                        0, MAX_SIZE, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y"
                    )
        with gr.Column(scale=1):
            progress = gr.HTML(elem_id="progress_text")
            preview = gr.Image(label="Preview", visible=False, interactive=False, elem_id="txt2img_preview", height=256)
            gallery = gr.Gallery(
                label="Output", elem_id="txt2img_gallery", columns=4, height="auto", object_fit="contain", format="png"
            )
            info = gr.HTML(elem_id="html_info_txt2img")

    def default_weight() -> float:
        """A1111's `extra_networks_default_multiplier`: the weight a card click writes (1 unless changed)."""
        weight = services.options["extra_networks_default_multiplier"]
        return float(weight) if isinstance(weight, int | float) and math.isfinite(weight) else 1.0

    def embedding_listing() -> Listing:
        skipped = services.embeddings.listing()["skipped"]
        return Listing(
            [[n] for n in services.embeddings.names()], [(n, i["path"], i["reason"]) for n, i in skipped.items()]
        )

    def hypernetwork_listing() -> Listing:
        rows = services.hypernetworks.details()
        return Listing(
            [[d["name"]] for d in rows if d["usable"]],
            [(d["name"], d["path"], d["reason"]) for d in rows if not d["usable"]],
        )

    def lora_listing() -> Listing:
        rows = services.loras.details()  # one look: fit, user metadata and card image of every file
        return Listing(
            [[d["name"], lora_about(d), d["preview"]] for d in rows if d["usable"]],
            [(d["name"], d["path"], d["reason"]) for d in rows if not d["usable"]],
        )

    embedding_list = NetworkList(
        "Textual Inversion",
        "ti",
        prompt,
        embedding_listing,
        services.embeddings.refresh,
        lambda name: name,
        "embeddings",
    )
    hypernetwork_list = NetworkList(
        "Hypernetworks",
        "hn",
        prompt,
        hypernetwork_listing,
        lambda: None,
        lambda name: f"<hypernet:{name}:{default_weight():g}>",
        "hypernetworks",
    )
    lora_list = NetworkList(
        "Lora",
        "lora",
        prompt,
        lora_listing,
        services.loras.refresh,
        lambda name: services.loras.user_metadata(name).card_prompt("lora", name, default_weight()),
        "LoRAs",
        extra_columns=("Trigger words, description",),
        image_column="Card image",
        negative=negative,
        insert_negative=lambda name: services.loras.user_metadata(name).card_negative(),
    )
    last_seed = gr.State(-1)
    running_job = gr.State("")  # this page's job id, so Interrupt never stops someone else's job

    named_inputs = {
        "prompt": prompt,
        "negative_prompt": negative,
        "sampler_name": sampler,
        "scheduler": schedule,
        "steps": steps,
        "cfg_scale": cfg,
        "width": width,
        "height": height,
        "seed": seed,
        "n_iter": batch_count,
        "batch_size": batch_size,
        "styles": styles,
        "tiling": tiling,
        "subseed": subseed,
        "subseed_strength": subseed_strength,
        "seed_resize_from_w": seed_resize_w,
        "seed_resize_from_h": seed_resize_h,
        "enable_hr": enable_hr,
        "hr_upscaler": hr_upscaler,
        "hr_second_pass_steps": hr_steps,
        "denoising_strength": denoising,
        "hr_scale": hr_scale,
        "hr_resize_x": hr_resize_x,
        "hr_resize_y": hr_resize_y,
    }
    inputs = list(named_inputs.values())
    integers = {
        "steps",
        "width",
        "height",
        "seed",
        "n_iter",
        "batch_size",
        "subseed",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
    }

    def generate(*values):
        started = time.time()
        given = dict(zip(named_inputs, values, strict=True))
        for key in integers:
            given[key] = int(given[key] if given[key] is not None else -1)
        given["prompt"], given["negative_prompt"] = given["prompt"] or "", given["negative_prompt"] or ""
        given["styles"] = list(given["styles"] or [])
        for key in ("cfg_scale", "subseed_strength", "denoising_strength", "hr_scale"):
            given[key] = float(given[key])
        if given["seed_resize_from_w"] <= 0 or given["seed_resize_from_h"] <= 0:
            given["seed_resize_from_w"] = given["seed_resize_from_h"] = -1
        params = Txt2ImgParams(**given)
        try:
            job = services.txt2img.submit(params)
        except UserError as e:
            yield {info: error_html(e, "generation_error"), progress: ""}
            return
        yield {
            running_job: job.id,
            generate_btn: gr.update(visible=False),
            interrupt_btn: gr.update(visible=True),
            progress: progress_html(job, services.jobs.queue_position(job)),
            info: "",
        }
        shown_preview = 0
        while not job.finished:
            time.sleep(POLL_SECONDS)
            update = {progress: progress_html(job, services.jobs.queue_position(job))}
            p = job.progress
            if p.preview is not None and p.preview_id != shown_preview and services.options["live_previews_enable"]:
                shown_preview = p.preview_id
                update[preview] = gr.update(value=p.preview(), visible=True)
            yield update
        done = {
            generate_btn: gr.update(visible=True),
            interrupt_btn: gr.update(visible=False),
            progress: "",
            preview: gr.update(value=None, visible=False),
        }
        if job.error is not None:
            message = str(job.error) if isinstance(job.error, UserError) else f"Generation failed: {job.error}"
            done[info] = error_html(message, "generation_error")
            yield done
            return
        result = job.result
        if not result.images:
            done[info] = "<p>Interrupted before any image finished.</p>"
            yield done
            return
        done[gallery] = result.paths or result.images
        done[info] = info_html(result.infotexts[0], time.time() - started, result.notes, result.interrupted)
        done[last_seed] = result.seeds[0]
        yield done

    outputs = [generate_btn, interrupt_btn, progress, preview, gallery, info, last_seed, running_job]
    generate_btn.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)
    prompt.submit(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)

    def on_interrupt(job_id: str) -> None:
        job = services.jobs.find(job_id)
        if job is not None:
            services.jobs.interrupt(job)

    interrupt_btn.click(on_interrupt, inputs=running_job, queue=False)
    random_seed.click(lambda: -1, outputs=seed, queue=False)

    def on_apply_styles(prompt_text, negative_text, chosen):
        text, negative_text, _ = services.styles.apply(prompt_text or "", negative_text or "", chosen or [])
        return text, negative_text, []

    apply_styles.click(
        on_apply_styles, inputs=[prompt, negative, styles], outputs=[prompt, negative, styles], queue=False
    )
    reuse_seed.click(lambda s: s, inputs=last_seed, outputs=seed, queue=False)

    fields = {
        "prompt": prompt,
        "negative_prompt": negative,
        "sampler": sampler,
        "schedule": schedule,
        "steps": steps,
        "cfg_scale": cfg,
        "width": width,
        "height": height,
        "seed": seed,
        "styles": styles,
    }
    return fields, embedding_list, hypernetwork_list, lora_list, gallery
