"""`k8s render` runs what the compose kit runs: every container's image and `python -m app` entrypoint is one a
compose service pairs (read from `docker-compose config --format json`, the resolved model, as
tests/compose/test_compose.py reads it), and the only containers without a command are the Ray nodes (KubeRay runs their
`ray start`, which `python -m app cluster head|worker` wraps on VMs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from app.k8s.render import gather, render_objects
from tests.support.compose_model import PROFILES, compose, example_env
from tests.support.env import ROOT


def entrypoint(cmd: list[str]) -> tuple[str, ...]:
    """`python -m app <command> [<subcommand>]`: the words before the first option."""
    words = []
    for word in cmd:
        if word.startswith("-") and len(words) >= 3:
            break
        words.append(word)
    return tuple(words)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(obj.get("spec", {}))
    return found


def test_every_image_and_entrypoint_is_the_compose_kits(tmp_path: Path) -> None:
    text = example_env(DS_MODEL="/cache/hf/models/qwen")
    res = compose(tmp_path, "config", "--format", "json", env_text=text, profiles=tuple(PROFILES))
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    pairs = {(s["image"], entrypoint(s.get("command") or [])) for s in services.values()}
    ray_images = {services[n]["image"] for n in ("ray-head", "ray-worker", "ray-worker-cpu")}

    (tmp_path / ".env").write_text(text)
    env = {k: v or "" for k, v in dotenv_values(tmp_path / ".env").items()}
    configs = [ROOT / "app" / "configs" / "qwen2.5-0.5b.yaml", ROOT / "app" / "configs" / "tiny-vllm.yaml"]
    tiny_cpu = tmp_path / "tiny-cpu.yaml"
    text = configs[1].read_text().replace("small-model-workers: 1", "cpu-workers: 1")
    assert "cpu-workers" in text  # a CPU-tier model: the render adds the CPU worker group (cpu image)
    tiny_cpu.write_text(text)
    objs = [o for mode in ("mpijob", "lws")
            for o in render_objects(gather(env, configs=[configs[0], tiny_cpu], deepspeed_as=mode))]
    seen_ray = set()
    checked = 0
    for obj in objs:
        for c in containers(obj):
            checked += 1
            if "command" not in c:
                assert obj["kind"] == "RayService" and c["image"] in ray_images, c["name"]
                seen_ray.add(c["image"])
                continue
            assert (c["image"], entrypoint(c["command"])) in pairs, (obj["kind"], c["name"], c["command"])
    assert seen_ray == ray_images  # head, GPU worker group (t4) and CPU worker group (cpu)
    assert checked >= 9
    fallback = next(o for o in objs if o["metadata"]["name"] == "llmkit-fallback" and o["kind"] == "Deployment")
    cmd = fallback["spec"]["template"]["spec"]["containers"][0]["command"]
    compose_cmd = services["fallback"]["command"]
    i = compose_cmd.index("--host")
    assert cmd == [*compose_cmd[: i + 1], "0.0.0.0", *compose_cmd[i + 2:]]  # only the bind address differs
