#!/usr/bin/env bash
# Install what the tests need (Python packages into .venv, Debian's chromium for browser tests) and run them all.
# Extra arguments go to pytest, e.g. ./test.sh -k prompts
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv test

if ! command -v chromium >/dev/null 2>&1; then
    echo "Installing Debian's chromium for the browser tests"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium fonts-noto-color-emoji
fi

.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
