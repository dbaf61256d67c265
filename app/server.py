"""The ASGI app: the API and/or the Gradio UI on one FastAPI server."""

from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import FastAPI
from starlette.routing import Mount

from app.access import AccessGate, gradio_session_user
from app.jobs import JobRunner
from app.services import Services
from app.settings import parse_credentials

log = logging.getLogger(__name__)


def build_app(services: Services) -> FastAPI:
    settings = services.settings
    app = FastAPI(title="sd-personalize-webui", docs_url="/docs" if settings.serve_api else None)
    if settings.serve_api:
        from app.api.routes import register_api

        register_api(app, services)
    if not settings.nowebui:
        import gradio as gr

        from app.ui.blocks import CSS, build_ui, ui_theme

        blocks = build_ui(services)
        auth = parse_credentials(settings.gradio_auth) or None
        app = gr.mount_gradio_app(
            app, blocks, path="/", auth=auth, theme=ui_theme(), css=CSS, ssr_mode=False, footer_links=[]
        )
    ui_user = None
    if settings.gradio_auth and not settings.nowebui:
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens"))
        ui_user = gradio_session_user(gradio_app)
    api_credentials = parse_credentials(settings.api_auth)
    if api_credentials or ui_user:  # without a password to ask for, requests skip the gate entirely
        app.add_middleware(AccessGate, api_credentials=api_credentials, ui_user=ui_user)
    warn_open_surfaces(services)
    return app


def warn_open_surfaces(services: Services) -> None:
    """Reachable from other machines, a part served without a password is open to anyone who finds the port."""
    settings = services.settings
    if not services.folders.confined:
        return
    open_parts = []
    if settings.serve_api and not settings.api_auth:
        open_parts.append("the API (add --api-auth user:password)")
    if not settings.nowebui and not settings.gradio_auth:
        open_parts.append("the UI (add --gradio-auth user:password)")
    if open_parts:
        log.warning(
            "Serving on %s without a password for %s: anyone who can reach this port can generate and train.",
            settings.host,
            " and ".join(open_parts),
        )


class StoppingServer(uvicorn.Server):
    """uvicorn waits for open requests before it stops, and ours may wait on queued jobs for minutes. On SIGINT/SIGTERM
    the job runner stops first: queued jobs are dropped, the running one is interrupted (a training run saves its
    checkpoint), so the waiting requests answer and the server exits within seconds."""

    def __init__(self, config: uvicorn.Config, jobs: JobRunner):
        super().__init__(config)
        self.jobs = jobs

    def handle_exit(self, sig, frame) -> None:
        # Not on the signal handler's own stack: shutdown joins the job thread.
        threading.Thread(target=self.jobs.shutdown, name="stop-jobs", daemon=True).start()
        super().handle_exit(sig, frame)
