"""The ASGI app: the API and/or the Gradio UI on one FastAPI server."""

from __future__ import annotations

from fastapi import FastAPI

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
