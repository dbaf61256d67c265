"""The ASGI app: the API and/or the Gradio UI on one FastAPI server."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI

from app.jobs import JobRunner
from app.services import Services
from app.settings import parse_credentials


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
    return app


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
