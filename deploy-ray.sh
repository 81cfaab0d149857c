#!/usr/bin/env bash
# Operator entrypoint. (Minimal version: `local` only; the compose kit extends it.)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

setup_venv() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[ray]"
}

cmd_local() {
  setup_venv
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  local model_dir=.cache/tiny-model port=${LLM_PORT:-8000}
  [ -f "$model_dir/config.json" ] || "$VENV/bin/python" -m app make-tiny-model "$model_dir"
  echo "Serving the tiny model on http://127.0.0.1:$port (Ctrl-C stops it). Try:"
  echo "  curl -s http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\"
  echo "    -d '{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"max_tokens\":32}'"
  exec "$VENV/bin/python" -m app serve --model "$model_dir" --served-model-name tiny --port "$port"
}

case "${1:-}" in
  local) cmd_local ;;
  *) echo "usage: $0 local" >&2; exit 2 ;;
esac
