#!/usr/bin/env bash
# Start the web UI: creates/updates .venv on first run, then serves http://127.0.0.1:7860 (flags as in A1111).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv
exec .venv/bin/python webui.py "$@"
