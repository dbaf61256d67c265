"""Start the web UI (and/or the A1111-compatible API): `python webui.py [--api] [--port N] ...`."""

from __future__ import annotations

import logging
import os
import sys

# Before gradio is imported: no analytics, no telemetry, nothing fetched from outside.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.settings import settings_from_args

    settings = settings_from_args(argv)
    import uvicorn

    from app.errors import UserError
    from app.logs import quiet_libraries
    from app.server import StoppingServer, build_app
    from app.services import build_services

    quiet_libraries()
    try:
        services = build_services(settings)
    except UserError as e:  # e.g. --bf16 on a GPU without it: a sentence, not a traceback
        print(f"Cannot start: {e}", file=sys.stderr, flush=True)
        return 2
    app = build_app(services)
    shown_host = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    url = f"http://{shown_host}:{settings.effective_port}"
    if settings.nowebui:
        print(f"API running on {url}/sdapi/v1 (docs: {url}/docs)", flush=True)
    else:
        print(f"Running on local URL:  {url}", flush=True)
        if settings.serve_api:
            print(f"API running on {url}/sdapi/v1", flush=True)
    server = StoppingServer(
        uvicorn.Config(app, host=settings.host, port=settings.effective_port, log_level="warning"), services.jobs
    )
    server.run()
    services.jobs.shutdown(timeout=8)  # whatever still runs gets its interrupt's save done before the process ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
