#!/usr/bin/env bash
# The one test command (README and .ci/run call it): installs everything the
# suites need (Debian packages, a venv with CPU torch and all extras but vLLM),
# then runs lint, pytest and the bats suites. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
APT_PACKAGES=(nginx-light prometheus pdsh openssh-server openssh-client shellcheck bats iproute2 curl procps util-linux)

log() { printf '\n==> %s\n' "$*"; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "warning: not root; cannot install ${missing[*]} (suites needing them will skip, or fail under CI=true)" >&2
    return 0
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the packages' own services are not used: tests start private instances
  for svc in nginx prometheus ssh; do
    service "$svc" stop >/dev/null 2>&1 || true
  done
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # CPU torch first (a local wheel here); the package's torch range is then already satisfied
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  log "pip install -e .[dev,ray,deepspeed,mcp,langgraph]"
  "$VENV/bin/python" -m pip install -q -e ".[dev,ray,deepspeed,mcp,langgraph]"
  # hook (issue 14): packages whose declared deps the CPU path must not pull (see the file)
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
}

install_apt
install_python
export PATH="$PWD/$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

log "ruff"
ruff check app tests bench

log "shellcheck"
shopt -s nullglob
shellcheck -x deploy-ray.sh tests/*.sh compose/*.sh
shopt -u nullglob

log "pytest"
set +e
python -m pytest -q -rfEs --durations=15 "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
[ $rc -ne 0 ] && exit $rc

if ls tests/*.bats >/dev/null 2>&1; then
  log "bats"
  prove --exec 'bats --tap' tests/*.bats
fi
