"""Image substitution: what each compose service's image is replaced with when the harness runs it.

Only the image content is substituted; command, environment, user, working dir and volumes come from the
compose model. The kit's own images (services with a `build:` section) run from this checkout's venv: their
Dockerfile is read for ENV, WORKDIR, USER (with the uid its `useradd` gives) and the folders it `chown`s (a fresh
named volume mounted there gets that owner, as Docker's copy-up does), and the repository is bind-mounted at
WORKDIR, where the image puts the package. Third-party images map their binary to a Debian package's. Images with
no binary on this machine are reported as not executed, with the reason.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ImageSpec:
    """How one image is emulated."""

    image: str
    runs: bool = True
    reason: str = ""  # why it does not run, or what stands in for it
    binaries: dict[str, str] = field(default_factory=dict)  # argv[0] in the image -> binary here
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    users: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name -> (uid, gid, home)
    path_owners: dict[str, int] = field(default_factory=dict)  # folder in the image -> owner uid
    repo_at: str = ""  # where the checkout is bind-mounted (the kit's images)

    def resolve_user(self, user: str | None) -> tuple[int, int, str, str]:
        """(uid, gid, home, name) for a compose `user:` value or the image's USER."""
        name = user or self.user
        if name in ("root", "0", "0:0"):
            return 0, 0, "/root", "root"
        if name in self.users:
            uid, gid, home = self.users[name]
            return uid, gid, home, name
        uid_s, _, gid_s = name.partition(":")
        if uid_s.isdigit():
            return int(uid_s), int(gid_s or uid_s), "/", ""
        raise ValueError(f"{self.image}: user {name!r} is unknown to the image")


def _dockerfile(path: Path, image: str) -> ImageSpec:
    text = re.sub(r"\\\n", " ", path.read_text())
    spec = ImageSpec(image=image, reason=f"runs from this checkout's venv ({sys.version.split()[0]}), not "
                     f"the image built from {path.name}", binaries={"python": f"{VENV_BIN}/python"})
    spec.env = {"PATH": f"{VENV_BIN}:{BASE_PATH}"}
    for line in text.splitlines():
        op, _, rest = line.strip().partition(" ")
        op = op.upper()
        if op == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", rest):
                spec.env[key] = value
        elif op == "WORKDIR":
            spec.workdir = rest.strip()
        elif op == "USER":
            spec.user = rest.strip()
        elif op == "RUN":
            for m in re.finditer(r"useradd\b[^&;]*?--uid (\d+)[^&;]*?\b([a-z][a-z0-9_-]*)\s*(?:&&|;|$)", rest):
                uid = int(m.group(1))
                spec.users[m.group(2)] = (uid, uid, f"/home/{m.group(2)}")
            for m in re.finditer(r"chown (?:-R )?([a-z0-9_-]+)(?::\S+)? ((?:/\S+ ?)+)", rest):
                owner = m.group(1)
                for folder in m.group(2).split():
                    spec.path_owners[folder] = spec.users.get(owner, (0, 0, ""))[0]
    spec.env["PATH"] = f"{VENV_BIN}:{BASE_PATH}"
    spec.repo_at = spec.workdir
    return spec


def interpreter_mounts() -> list[dict[str, object]]:
    """What stands in for the image's Python, each bind-mounted read-only onto itself: the venv's base interpreter
    (its folders are rebuilt world-traversable on the service's root: an image's Python is usable by every user,
    here it may sit under root's 0700 home), the venv, and this checkout (the venv's editable install points there).
    A checkout under /tmp (CI's fresh clone) would otherwise vanish behind the service's private /tmp."""
    paths = sorted({sys.base_prefix, sys.prefix, str(ROOT)}, key=lambda p: len(Path(p).parts))
    kept: list[str] = []
    for path in paths:  # a folder inside one already mounted comes with it
        if not any(Path(path).is_relative_to(k) for k in kept):
            kept.append(path)
    return [{"source": path, "target": path, "read_only": True} for path in kept]


def _binary(image: str, binary: str, here: str, package: str, **kw: object) -> ImageSpec:
    found = shutil.which(here) or (here if Path(here).exists() else "")
    if not found:
        return ImageSpec(image=image, runs=False, reason=f"`{here}` is not installed here (apt-get install {package})")
    spec = ImageSpec(image=image, binaries={binary: found}, env={"PATH": BASE_PATH},
                     reason=f"Debian {package} stands in for {image}", **kw)  # type: ignore[arg-type]
    return spec


def image_spec(service: dict) -> ImageSpec:
    """The substitution for one service of `docker compose config --format json`."""
    image = service.get("image", "")
    build = service.get("build")
    if build:
        return _dockerfile(Path(build["context"]) / build.get("dockerfile", "Dockerfile"), image)
    repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image
    if repo in ("nginx", "library/nginx", "docker.io/library/nginx"):
        return _binary(image, "nginx", "/usr/sbin/nginx", "nginx-light")
    if repo in ("prom/prometheus", "quay.io/prometheus/prometheus"):
        return _binary(image, "prometheus", "prometheus", "prometheus", user="nobody",
                       users={"nobody": (65534, 65534, "/home")}, workdir="/prometheus",
                       path_owners={"/prometheus": 65534})
    if repo in ("nginx/nginx-prometheus-exporter",):
        return _binary(image, "nginx-prometheus-exporter", "prometheus-nginx-exporter", "prometheus-nginx-exporter",
                       user="nobody", users={"nobody": (65534, 65534, "/")})
    if repo.startswith("grafana/"):
        return ImageSpec(image=image, runs=False, reason="no Grafana binary exists for this machine (no Debian or "
                         "PyPI package); its provisioning and dashboards are checked by "
                         "tests/front_door/test_dashboards.py")
    if "dcgm-exporter" in repo:
        return ImageSpec(image=image, runs=False, reason="NVIDIA's DCGM exporter needs an NVIDIA GPU and driver")
    return ImageSpec(image=image, runs=False, reason=f"the harness has no stand-in for image {image!r}")


def passwd_lines(spec: ImageSpec) -> tuple[str, str]:
    """/etc/passwd and /etc/group as the image has them: this machine's plus the image's own users."""
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    known = {line.split(":")[0] for line in passwd.splitlines()}
    for name, (uid, gid, home) in spec.users.items():
        if name not in known:
            passwd += f"{name}:x:{uid}:{gid}::{home}:/bin/sh\n"
            group += f"{name}:x:{gid}:\n"
    return passwd, group
