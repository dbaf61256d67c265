"""`/sdapi/v1` routes with A1111's paths, payloads and response shapes; each calls a service and formats."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from app.access import credentials_match
from app.api.imagecodec import decode_image, encode_png
from app.api.memory import memory_report
from app.api.models import (
    ERROR_RESPONSES,
    CreateEmbeddingRequest,
    CreateHypernetworkRequest,
    ErrorResponse,
    ExtractLoraRequest,
    ExtractLoraResponse,
    MergeCheckpointRequest,
    MergeCheckpointResponse,
    MergeLoraRequest,
    MergeLoraResponse,
    PNGInfoRequest,
    PreprocessRequest,
    ProgressResponse,
    ProgressState,
    TrainEmbeddingRequest,
    TrainHypernetworkRequest,
    TrainLoraRequest,
    TrainRequest,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from app.errors import QueueFullError, UserError
from app.generation.hires import LATENT_MODES
from app.generation.infotext import parse_infotext, png_text_chunks
from app.generation.samplers import SAMPLERS, SCHEDULES
from app.generation.txt2img import Txt2ImgParams
from app.lora.extract import ExtractOptions
from app.models.merger import MergerOptions
from app.models.out_of_memory import OutOfMemoryError, is_out_of_memory, memory_state
from app.services import Services
from app.settings import parse_credentials
from app.training.config import LoraNetwork, PivotalEmbedding, TrainConfig
from app.training.preprocess import PreprocessOptions, preprocess

log = logging.getLogger(__name__)

# A1111 request fields we accept but do not act on; a request that sets one gets a note in `info`.
_IGNORED = {
    "script_name": "scripts are not supported",
    "alwayson_scripts": "scripts are not supported",
    "refiner_checkpoint": "refiner models are not supported",
    "hr_checkpoint_name": "a separate hires checkpoint is not supported",
    "firstpass_image": "a first-pass image is not supported",
}
_OVERRIDES = ("CLIP_stop_at_last_layers", "sd_model_checkpoint", "sd_vae")


def _auth_dependency(credentials_text: str | None):
    """The API's HTTP Basic check as a dependency, so the schema declares it (the AccessGate enforces the same
    check in front of the docs and the schema too)."""
    allowed = parse_credentials(credentials_text)
    if not allowed:
        return None
    basic = HTTPBasic(auto_error=False)

    def check(request: Request, _: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not credentials_match(request.headers.get("authorization"), allowed):
            raise HTTPException(
                status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
            )

    return check


def params_from_request(req: Txt2ImgRequest) -> Txt2ImgParams:
    notes = [f"{name}: {why}; ignored" for name, why in _IGNORED.items() if getattr(req, name, None)]
    notes += [f"{name}: not a field of A1111's txt2img API; ignored" for name in sorted(req.model_extra or {})]
    overrides = dict(req.override_settings or {})
    notes += [f"override_settings.{key}: not supported; ignored" for key in overrides if key not in _OVERRIDES]
    clip_skip = overrides.get("CLIP_stop_at_last_layers")
    return Txt2ImgParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        sampler_name=req.sampler_name or req.sampler_index or "Euler",
        scheduler=req.scheduler or "Automatic",
        steps=req.steps,
        cfg_scale=req.cfg_scale,
        width=req.width,
        height=req.height,
        seed=req.seed,
        batch_size=req.batch_size,
        n_iter=req.n_iter,
        clip_skip=int(clip_skip) if clip_skip is not None else None,
        save_images=req.save_images and not req.do_not_save_samples,
        notes=notes,
        subseed=req.subseed,
        subseed_strength=req.subseed_strength,
        seed_resize_from_w=req.seed_resize_from_w,
        seed_resize_from_h=req.seed_resize_from_h,
        tiling=bool(req.tiling),
        styles=list(req.styles or []),
        restore_faces=bool(req.restore_faces),
        enable_hr=req.enable_hr,
        hr_scale=req.hr_scale,
        hr_upscaler=req.hr_upscaler or "Latent",
        hr_second_pass_steps=req.hr_second_pass_steps,
        hr_resize_x=req.hr_resize_x,
        hr_resize_y=req.hr_resize_y,
        denoising_strength=req.denoising_strength,
        hr_prompt=req.hr_prompt,
        hr_negative_prompt=req.hr_negative_prompt,
        hr_sampler_name=req.hr_sampler_name,
    )


def train_config(req: TrainRequest, name: str, save_every: int) -> TrainConfig:
    """Map A1111's payload onto our TrainConfig (field names match, but for the target's name and save_every)."""
    fields = {f: getattr(req, f) for f in TrainConfig.__dataclass_fields__ if f in type(req).model_fields}
    fields["learn_rate"] = str(req.learn_rate)
    fields["clip_grad_value"] = str(req.clip_grad_value)
    if req.preview_sampler_name is None:
        fields.pop("preview_sampler_name", None)
    return TrainConfig(name=name, save_every=save_every, **fields)


def error_body(error: UserError, renames: dict[str, str] | None = None) -> dict[str, Any]:
    """`detail` and the error's kind, and the request field at fault (services name TrainConfig's fields; a route
    whose payload calls one differently passes `renames`)."""
    body: dict[str, Any] = {"detail": str(error), "error": type(error).__name__}
    if error.field:
        body["field"] = (renames or {}).get(error.field, error.field)
    return body


def a1111_error(error: UserError, action: str, renames: dict[str, str] | None = None) -> JSONResponse:
    """A 4xx with `detail` like every error here, plus A1111's `info: "<action> error: ..."` its clients read."""
    content = {**error_body(error, renames), "info": f"{action} error: {error}"}
    return JSONResponse(status_code=error.status_code, content=content)


def train_info(job, kind: str) -> str:
    """Wait for the run and answer as A1111 does: `train <kind> complete: filename: <f> error: <e or None>`."""
    try:
        result = job.wait()
    except UserError as e:
        return f"train {kind} complete: filename: None error: {e}"
    if job.status == "interrupted" and result is None:
        return f"train {kind} complete: filename: None error: interrupted before it started"
    return f"train {kind} complete: filename: {result.path} error: {result.error}"


def disconnected(request: Request) -> Callable[[], bool]:
    """Whether the client of `request` went away, asked from the worker thread FastAPI runs the route on."""
    return lambda: anyio.from_thread.run(request.is_disconnected)


def register_api(app: FastAPI, services: Services) -> None:
    """Mount `/sdapi/v1` on `app`, with HTTP Basic auth when `--api-auth` is set."""
    auth = _auth_dependency(services.settings.api_auth)
    responses = dict(ERROR_RESPONSES)
    if auth:
        responses[401] = {"model": ErrorResponse, "description": "Missing or wrong HTTP Basic credentials"}
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(auth)] if auth else [], responses=responses)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return JSONResponse(status_code=exc.status_code, content=error_body(exc), headers=headers)

    @app.exception_handler(MemoryError)
    @app.exception_handler(RuntimeError)
    async def out_of_memory(request: Request, exc: Exception) -> JSONResponse:
        # The services turn running out of memory into OutOfMemoryError where it is likely (generating, training,
        # loading); anywhere else in a request it is still the request's size, not a server fault: 507, not 500.
        if not is_out_of_memory(exc):
            raise exc
        error = OutOfMemoryError(
            f"Out of memory while handling {request.method} {request.url.path} "
            f"({memory_state(services.models.device)}). Try a smaller request."
        )
        log.warning("%s", error)
        return JSONResponse(status_code=error.status_code, content=error_body(error))

    @router.post("/txt2img", response_model=Txt2ImgResponse)
    def txt2img(req: Txt2ImgRequest, request: Request) -> Txt2ImgResponse:
        params = params_from_request(req)
        result = services.generate_with_overrides(
            params, req.override_settings or {}, req.override_settings_restore_afterwards, disconnected(request)
        )
        pairs = zip(result.images, result.infotexts, strict=True)
        images = [encode_png(im, text) for im, text in pairs] if req.send_images else []
        return Txt2ImgResponse(images=images, parameters=req.model_dump(), info=result.info_json())

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        jobs = services.jobs
        job = jobs.current
        if job is None:
            return ProgressResponse(
                progress=0, eta_relative=0, state=ProgressState(job_count=len(jobs.pending())), textinfo=None
            )
        p = job.progress
        image = None
        if not skip_current_image and p.preview is not None:
            image = encode_png(p.preview())
        state = ProgressState(
            interrupted=job.interrupted,
            job=job.kind,
            job_count=p.job_count + len(jobs.pending()),
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started_at or time.time())),
            job_no=p.job_no,
            sampling_step=p.sampling_step,
            sampling_steps=p.sampling_steps,
        )
        return ProgressResponse(
            progress=p.fraction,
            eta_relative=job.eta_seconds() or 0.0,
            state=state,
            current_image=image,
            textinfo=p.text or None,
        )

    @router.post("/interrupt")
    def interrupt() -> None:
        services.jobs.interrupt()

    @router.post("/skip")
    def skip() -> None:
        services.jobs.interrupt()

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        return services.options.as_dict()

    @router.post("/options")
    def set_options(values: dict[str, Any]) -> None:
        services.set_options(values)

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        s = services.settings
        return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in vars(s).items()}

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": c.title,
                "model_name": c.model_name,
                "hash": c.short_hash,
                "sha256": c.sha256,
                "filename": str(c.path),
                "config": None,
            }
            for c in services.models.checkpoints
        ]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        services.models.refresh()

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [
            {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for label, name, _ in SCHEDULES
        ]

    @router.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info")
    def script_info() -> list:
        return []

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for name in ("None", "Lanczos", "Nearest")
        ]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_MODES]

    @router.get("/face-restorers")
    def face_restorers() -> list:
        return []

    @router.get("/realesrgan-models")
    def realesrgan_models() -> list:
        return []

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, str]]:
        return [
            {"name": st.name, "prompt": st.prompt, "negative_prompt": st.negative_prompt}
            for st in services.styles.styles().values()
        ]

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, str]]:
        return [{"model_name": name, "filename": str(path)} for name, path in services.models.vae_files().items()]

    @router.post("/refresh-vae")
    def refresh_vae() -> None:
        return None

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return memory_report()

    @router.post("/png-info")
    def png_info(req: PNGInfoRequest) -> dict[str, Any]:
        if not req.image:
            raise UserError("Image not found: send the PNG as base64 in 'image'.")
        image = decode_image(req.image)
        chunks = png_text_chunks(image)
        text = chunks.pop("parameters", "")
        return {"info": text, "items": chunks, "parameters": parse_infotext(text) if text else {}}

    @router.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        return services.embeddings.listing()

    @router.post("/refresh-embeddings")
    def refresh_embeddings() -> None:
        services.embeddings.refresh()

    @router.post("/create/embedding")
    def create_embedding(req: CreateEmbeddingRequest) -> Any:
        try:
            path = services.embeddings.create(req.name, req.num_vectors_per_token, req.init_text, req.overwrite_old)
        except UserError as e:
            return a1111_error(e, "create embedding")
        return {"info": f"create embedding filename: {path}"}

    @router.post("/train/embedding")
    def train_embedding(req: TrainEmbeddingRequest) -> Any:
        cfg = train_config(req, req.embedding_name, req.save_embedding_every)
        cfg.save_image_with_stored_embedding = req.save_image_with_stored_embedding
        try:
            job = services.training.train_embedding(cfg)
        except UserError as e:
            return a1111_error(e, "train embedding", {"save_every": "save_embedding_every"})
        return {"info": train_info(job, "embedding")}

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        """A1111's LoRA list: name, alias (`ss_output_name`), path and the file's metadata."""
        return services.loras.listing()

    @router.post("/refresh-loras")
    def refresh_loras() -> None:
        services.loras.refresh()

    @router.post("/train/lora")
    def train_lora(req: TrainLoraRequest) -> Any:
        """Train a LoRA (created on the first save if `lora_name` does not exist, continued if it does)."""
        cfg = train_config(req, req.lora_name, req.save_lora_every)
        try:
            network = LoraNetwork(**{f: getattr(req, f) for f in LoraNetwork.__dataclass_fields__})
            pivotal = PivotalEmbedding(req.bundle_embedding, req.bundle_vectors, req.bundle_init_text)
            job = services.training.train_lora(cfg, network, pivotal)
        except UserError as e:
            return a1111_error(e, "train lora", {"save_every": "save_lora_every"})
        return {"info": train_info(job, "lora")}

    @router.post("/extract/lora", response_model=ExtractLoraResponse)
    def extract_lora(req: ExtractLoraRequest, request: Request) -> ExtractLoraResponse:
        """A LoRA of the change from `model_org` (empty: the loaded model) to `model_tuned` (kohya's
        `extract_lora_from_models.py`), written to the LoRA folder; waits until it is written."""
        fields = {f: getattr(req, f) for f in ExtractOptions.__dataclass_fields__}
        path, report = services.extract_lora(
            req.model_tuned, req.model_org, req.lora_name, ExtractOptions(**fields), disconnected(request)
        )
        return ExtractLoraResponse(
            info=f"extract lora complete: {path}: {report.sentence()}",
            path=str(path),
            layers=report.layers,
            text_encoder=report.text_encoder,
            size_mb=round(report.size_bytes / 2**20, 3),
        )

    @router.post("/merge/lora", response_model=MergeLoraResponse)
    def merge_lora(req: MergeLoraRequest, request: Request) -> MergeLoraResponse:
        """The loaded model with `loras` merged in, written as a new checkpoint (kohya's `merge_lora.py`), or the
        LoRAs as one new LoRA (`into: "lora"`, kohya's `svd_merge_lora.py`)."""
        fields = ("rank", "conv_dim", "sv_fro", "clamp_quantile", "save_precision")
        options = ExtractOptions(**{f: getattr(req, f) for f in fields})
        options.check()  # whichever the target: a value out of range is refused, not ignored
        if req.into == "lora":
            path, report = services.merge_to_lora(req.loras, req.name, options, disconnected(request))
            return MergeLoraResponse(
                info=f"merge lora complete: {path}: {report.sentence()}",
                path=str(path),
                title="",
                changed=report.layers,
            )
        path, merged = services.merge_lora(req.loras, req.name, req.save_precision)
        title = next((c.title for c in services.models.checkpoints if c.path == path), path.name)
        return MergeLoraResponse(
            info=f"merge lora complete: {path}: {merged.sentence()}",
            path=str(path),
            title=title,
            changed=merged.changed,
        )

    @router.post("/merge/checkpoint", response_model=MergeCheckpointResponse)
    def merge_checkpoint(req: MergeCheckpointRequest, request: Request) -> MergeCheckpointResponse:
        """A1111's Checkpoint Merger: A and B (weighted sum), A + M (B - C) (add difference), or A alone, written as
        a new checkpoint in the checkpoint folder; waits until it is written."""
        options = MergerOptions(
            primary=req.primary_model_name,
            secondary=req.secondary_model_name,
            tertiary=req.tertiary_model_name,
            **req.model_dump(exclude={"primary_model_name", "secondary_model_name", "tertiary_model_name",
                                      "checkpoint_format"}),
        )  # fmt: skip
        path, report = services.merge_checkpoints(options, disconnected(request))
        title = next((c.title for c in services.models.checkpoints if c.path == path), path.name)
        return MergeCheckpointResponse(
            info=f"Checkpoint saved to {path}: {report.sentence()}",
            path=str(path),
            title=title,
            merged=report.merged,
            kept=report.kept,
            discarded=report.discarded,
        )

    @router.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, str]]:
        return services.hypernetworks.listing()

    @router.post("/create/hypernetwork")
    def create_hypernetwork(req: CreateHypernetworkRequest) -> Any:
        try:
            path, warnings = services.hypernetworks.create(
                req.name,
                req.enable_sizes,
                req.layer_structure or "1, 2, 1",
                req.activation_func or "linear",
                req.weight_init or "Normal",
                req.add_layer_norm,
                req.use_dropout,
                req.dropout_structure,
                req.overwrite_old,
                req.last_layer_dropout,
            )
        except UserError as e:
            return a1111_error(e, "create hypernetwork")
        return {"info": f"create hypernetwork filename: {path}", "warnings": warnings}

    @router.post("/train/hypernetwork")
    def train_hypernetwork(req: TrainHypernetworkRequest) -> Any:
        cfg = train_config(req, req.hypernetwork_name, req.save_hypernetwork_every)
        try:
            job = services.training.train_hypernetwork(cfg)
        except UserError as e:
            return a1111_error(e, "train hypernetwork", {"save_every": "save_hypernetwork_every"})
        return {"info": train_info(job, "hypernetwork")}

    @router.post("/preprocess")
    def preprocess_images(req: PreprocessRequest) -> dict[str, str]:
        options = PreprocessOptions(
            src=req.process_src,
            dst=req.process_dst,
            width=req.process_width,
            height=req.process_height,
            crop="auto" if req.process_focal_crop else "center",
            flip=req.process_flip,
            split=req.process_split,
            split_threshold=req.process_split_threshold,
            overlap_ratio=req.process_overlap_ratio,
            keep_captions=req.preprocess_txt_action != "ignore",
        )
        result = preprocess(options, folders=services.folders)
        notes = (
            " Captioning models (BLIP, deepbooru) are not available; captions were not generated."
            if (req.process_caption or req.process_caption_deepbooru)
            else ""
        )
        return {"info": f"Preprocess complete: {len(result.written)} images written.{notes}"}

    app.include_router(router)
