"""Render the kustomize directory: read configs, tiers and the compose kit, refuse what cannot work, write one
YAML file per object plus `kustomization.yaml` (apply with `kubectl apply -k DIR`).

`render_objects` returns the objects (tests inspect them); `write_tree` writes them. Nothing here reads a secret
value: HF_TOKEN and API_KEYS are Secret references (`inputs.SECRET_KEYS`), whatever `.env` holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from app.k8s import core, deepspeed
from app.k8s.catalogue import DEFAULT_TIERS, K8sError, load_catalogue
from app.k8s.checks import check_config
from app.k8s.compose import DEFAULT_COMPOSE, ComposeKit
from app.k8s.inputs import Inputs
from app.k8s.ray import rayservice
from app.models.config import DEFAULT_CONFIG, load_model_configs, split_paths


def read_env(env_file: str | Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`.env` values under the process environment (exported values win, as in deploy-ray.sh and compose)."""
    from dotenv import dotenv_values

    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    return {**values, **dict(os.environ if environ is None else environ)}


def config_paths(env: Mapping[str, str], explicit: Sequence[Path] = ()) -> list[Path]:
    """MODEL_CONFIGS (or the files given) looked up in MODEL_CONFIG_DIR first, as `cluster deploy` does."""
    raw = list(explicit) or split_paths(env.get("MODEL_CONFIGS") or Path(DEFAULT_CONFIG).name)
    base = Path(env.get("MODEL_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "configs")
    out = []
    for p in raw:
        cands = [p] if p.is_absolute() else [base / p, p]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise K8sError(f"MODEL_CONFIGS: {str(p)!r} not found (looked in {base}/ and {Path.cwd()})")
        out.append(found)
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise K8sError(f"MODEL_CONFIGS: two files named {dup!r}; the ConfigMap keys them by file name")
    return out


def gather(env: Mapping[str, str], *, configs: Sequence[Path] = (), tiers: str | Path = DEFAULT_TIERS,
           compose_file: str | Path = DEFAULT_COMPOSE, **options: Any) -> Inputs:
    """Read and check everything a render needs; K8sError / ConfigError on the first problem."""
    parsed = load_model_configs(config_paths(env, configs))
    catalogue = load_catalogue(tiers)
    placed = {cfg.deployment_name: check_config(cfg, catalogue) for cfg in parsed}
    return Inputs(env=env, configs=parsed, tiers=placed, catalogue=catalogue,
                  compose=ComposeKit(compose_file, env), **options)


def render_objects(inp: Inputs) -> list[dict[str, Any]]:
    objs = [core.namespace(inp), core.config_map(inp), core.env_config_map(inp), core.model_cache(inp),
            rayservice(inp), core.fallback(inp), core.service(inp, "fallback", "fallback",
                                                               inp.port("FALLBACK_PORT", 8001)),
            core.front_door(inp), core.service(inp, "api", "front-door", inp.port("NGINX_PORT", 8080)),
            *core.network_policies(inp)]
    if inp.monitoring:
        objs += core.monitors(inp)
    if inp.deepspeed_as:
        deepspeed.check(inp)
        objs += deepspeed.objects(inp)
    return objs


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, the ConfigMap's files) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_tree(objs: list[dict[str, Any]], out: Path, namespace: str) -> list[Path]:
    """One file per object and a kustomization.yaml listing them (existing files of ours are replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objs:
        path = out / file_name(obj)
        path.write_text(dump(obj))
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": namespace, "resources": [p.name for p in written]}
    (out / "kustomization.yaml").write_text(
        "# rendered by `python -m app k8s render`: edit the model configs / .env / tiers and render again\n"
        + yaml.safe_dump(kustomization, sort_keys=False))
    return written
