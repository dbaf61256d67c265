"""The txt2img tab: A1111's fields, a Generate button that turns into Interrupt, live progress, gallery, info."""

from __future__ import annotations

import html
import time

import gradio as gr

from app.errors import UserError
from app.generation.samplers import sampler_names, schedule_labels
from app.generation.txt2img import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_SIZE, MAX_STEPS, MIN_SIZE, Txt2ImgParams
from app.jobs import Job
from app.services import Services
from app.ui.extra_networks import NetworkList

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
    lines += [f"<p class='gen-note'>{html.escape(n)}</p>" for n in notes]
    lines.append(f"<p class='gen-time'>Time taken: {seconds:.2f} s</p>")
    return "".join(lines)


def build_txt2img_tab(services: Services) -> tuple[dict[str, gr.components.Component], NetworkList, NetworkList]:
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
        with gr.Column(scale=1):
            progress = gr.HTML(elem_id="progress_text")
            preview = gr.Image(label="Preview", visible=False, interactive=False, elem_id="txt2img_preview", height=256)
            gallery = gr.Gallery(
                label="Output", elem_id="txt2img_gallery", columns=4, height="auto", object_fit="contain", format="png"
            )
            info = gr.HTML(elem_id="html_info_txt2img")
    embedding_list = NetworkList(
        "Textual Inversion",
        "ti",
        prompt,
        services.embeddings.names,
        lambda: [(n, i["path"], i["reason"]) for n, i in services.embeddings.listing()["skipped"].items()],
        services.embeddings.refresh,
        lambda name: name,
        "embeddings",
    )
    hypernetwork_list = NetworkList(
        "Hypernetworks",
        "hn",
        prompt,
        lambda: [d["name"] for d in services.hypernetworks.details() if d["usable"]],
        lambda: [(d["name"], d["path"], d["reason"]) for d in services.hypernetworks.details() if not d["usable"]],
        lambda: None,
        lambda name: f"<hypernet:{name}:1>",
        "hypernetworks",
    )
    last_seed = gr.State(-1)

    inputs = [prompt, negative, sampler, schedule, steps, cfg, width, height, seed, batch_count, batch_size]

    def generate(
        prompt_text, negative_text, sampler_name, schedule_type, n_steps, cfg_scale, w, h, seed_value, n_iter, n_batch
    ):
        started = time.time()
        params = Txt2ImgParams(
            prompt=prompt_text or "",
            negative_prompt=negative_text or "",
            sampler_name=sampler_name,
            scheduler=schedule_type,
            steps=int(n_steps),
            cfg_scale=float(cfg_scale),
            width=int(w),
            height=int(h),
            seed=int(seed_value if seed_value is not None else -1),
            n_iter=int(n_iter),
            batch_size=int(n_batch),
        )
        try:
            job = services.txt2img.submit(params)
        except UserError as e:
            yield {info: f"<p class='gen-error' id='generation_error'>{html.escape(str(e))}</p>", progress: ""}
            return
        yield {
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
            done[info] = f"<p class='gen-error' id='generation_error'>{html.escape(message)}</p>"
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

    outputs = [generate_btn, interrupt_btn, progress, preview, gallery, info, last_seed]
    generate_btn.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)
    prompt.submit(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)
    interrupt_btn.click(lambda: services.jobs.interrupt(), queue=False)
    random_seed.click(lambda: -1, outputs=seed, queue=False)
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
    }
    return fields, embedding_list, hypernetwork_list
