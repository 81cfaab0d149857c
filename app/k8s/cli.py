"""`python -m app k8s render`: the kustomize directory for Kubernetes from MODEL_CONFIGS, `.env` and the tiers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.console import fail

k8s = typer.Typer(help="Kubernetes: render KubeRay / MPIJob manifests from the same model configs and .env.",
                  no_args_is_help=True)


@k8s.command()
def render(
    out: Annotated[Path, typer.Option(help="Folder to write (kustomize directory).")],
    configs: Annotated[list[Path] | None, typer.Argument(
        help="Model config files (default: MODEL_CONFIGS, looked up in MODEL_CONFIG_DIR).")] = None,
    env_file: Annotated[Path, typer.Option(help="The VM kit's .env (exported variables win).")] = Path(".env"),
    tiers: Annotated[Path | None, typer.Option(help="Tier catalogue YAML (default: the shipped app/k8s/tiers.yaml)."
                                               )] = None,
    compose_file: Annotated[Path | None, typer.Option(
        help="The compose kit images and entrypoints are read from (default: the kit's docker-compose-ray.yml).")]
    = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "llmkit",
    name: Annotated[str, typer.Option(help="Name of the RayService and prefix of every object.")] = "llmkit",
    secret_name: Annotated[str, typer.Option(help="Secret holding HF_TOKEN and API_KEYS (created by you).")]
    = "llmkit-secrets",
    keys_secret: Annotated[str | None, typer.Option(
        help="Secret whose keys.yaml is the keys file (python -m app keys ...; kubectl create secret generic NAME "
             "--from-file=keys.yaml): mounted into the Ray head, the fallback and DeepSpeed rank 0, re-read on "
             "change. Default: API_KEYS only.")] = None,
    cache_size: Annotated[str, typer.Option(help="Model cache PVC size (ReadOnlyMany).")] = "200Gi",
    storage_class: Annotated[str | None, typer.Option(help="Model cache storage class.")] = None,
    allow_namespace: Annotated[list[str] | None, typer.Option(
        "--allow-namespace", help="Namespace whose pods may reach the API (front door); repeatable.")] = None,
    operator_namespace: Annotated[str, typer.Option(help="KubeRay operator's namespace (reaches the dashboard).")]
    = "ray-system",
    monitoring: Annotated[bool, typer.Option(help="Also render a PodMonitor and a ServiceMonitor.")] = False,
    monitoring_namespace: Annotated[str, typer.Option(help="Prometheus' namespace (reaches metrics ports).")]
    = "monitoring",
    deepspeed: Annotated[bool, typer.Option(help="Also render the DeepSpeed TP mode (DS_* of .env).")] = False,
    deepspeed_as: Annotated[str, typer.Option(help="mpijob (Kubeflow MPIJob) or lws (LeaderWorkerSet).")]
    = "mpijob",
    deepspeed_tier: Annotated[str, typer.Option(help="Catalogue tier of the DeepSpeed pods.")] = "2xa100",
    deepspeed_pods: Annotated[int, typer.Option(min=1, help="Pods of the tensor-parallel group.")] = 2,
) -> None:
    """Write Namespace, RayService, ConfigMaps, PVC, Services, NetworkPolicies, fallback and front door."""
    from app.k8s.catalogue import DEFAULT_TIERS, K8sError
    from app.k8s.compose import DEFAULT_COMPOSE
    from app.k8s.render import gather, read_env, render_objects, write_tree
    from app.models.config import ConfigError

    if deepspeed_as not in ("mpijob", "lws"):
        raise fail(f"--deepspeed-as: {deepspeed_as!r}: use mpijob or lws")
    env = read_env(env_file)
    try:
        inp = gather(env, configs=list(configs or []), tiers=tiers or DEFAULT_TIERS,
                     compose_file=compose_file or DEFAULT_COMPOSE, namespace=namespace, name=name,
                     secret_name=secret_name, keys_secret=keys_secret, cache_size=cache_size,
                     storage_class=storage_class,
                     allow_namespaces=list(allow_namespace or []), operator_namespace=operator_namespace,
                     monitoring=monitoring, monitoring_namespace=monitoring_namespace,
                     deepspeed_as=deepspeed_as if deepspeed else None, deepspeed_tier=deepspeed_tier,
                     deepspeed_workers=deepspeed_pods, env_file=str(env_file))
        objs = render_objects(inp)
    except (K8sError, ConfigError) as exc:
        hint = "" if env_file.is_file() else (f" (no {env_file} was found, so only exported variables were read: "
                                               "cp .env.example .env and fill it in, or pass --env-file)")
        raise fail(f"{exc}{hint}") from None
    written = write_tree(objs, out, namespace)
    tiers_used = sorted(set(inp.tiers.values()))
    typer.echo(f"wrote {len(written)} objects to {out}/ (worker groups: {', '.join(tiers_used)}); "
               f"apply with: kubectl apply -k {out}")


def register(cli: typer.Typer) -> None:
    cli.add_typer(k8s, name="k8s")
