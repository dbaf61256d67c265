# Shared by webui.sh and test.sh: create/update .venv so a fresh machine needs nothing but Python 3.10+.
# Usage: ensure_venv [extra]   (extra = "test" installs the test dependencies too)

pick_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "No Python 3.10+ found. Install Python 3.11 (or set PYTHON=/path/to/python) and run again." >&2
    return 1
}

ensure_venv() {
    local extra="${1:-}"
    local spec="."
    [ -n "$extra" ] && spec=".[$extra]"
    if [ ! -x .venv/bin/python ]; then
        local python
        python=$(pick_python) || exit 1
        echo "Creating .venv with $python"
        "$python" -m venv .venv
    fi
    # torch first and pinned: an open range pulls a multi-GB CUDA build where a CPU wheel would do.
    if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
        echo "Installing ${TORCH_PACKAGE:-torch==2.13.0}"
        .venv/bin/pip install -q "${TORCH_PACKAGE:-torch==2.13.0}"
    fi
    local stamp=".venv/.installed-${extra:-base}"
    local want
    want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "Installing the project into .venv ($spec)"
        .venv/bin/pip install -q -e "$spec"
        echo "$want" >"$stamp"
    fi
}
