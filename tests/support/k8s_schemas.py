"""Offline, strict validation of rendered Kubernetes objects (no cluster reachable from the build machines).

Core kinds: the `kubernetes-validate` package's schemas of one pinned Kubernetes version, strict (an unknown
field fails). Custom resources: the upstream CRDs' `openAPIV3Schema` in `../shared/k8s-crds/` (next to the
repository), tightened the way kubeconform's openapi2jsonschema does: `additionalProperties: false` on every
object that lists `properties` (unless it preserves unknown fields), `x-kubernetes-int-or-string` as integer or
string, apiVersion/kind/metadata allowed at the root.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from tests.support.env import ROOT, need

CRD_DIR = ROOT.parent / "shared" / "k8s-crds"
K8S_VERSION = "1.33"
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("kubeflow.org/v2beta1", "MPIJob"): "kubeflow.org_mpijobs.yaml",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
}


class SchemaError(AssertionError):
    """An object does not validate; the message says where."""


def crd_dir() -> Path:
    """The upstream CRDs (../shared/k8s-crds beside the repository): a skip where they are not, a failure in CI."""
    need((CRD_DIR / "README.md").is_file(), f"the upstream CRDs are expected in {CRD_DIR} (../shared/k8s-crds next "
         "to the repository, see its README); without them custom resources cannot be validated")
    return CRD_DIR


def _tighten(node: Any) -> Any:
    if isinstance(node, list):
        return [_tighten(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _tighten(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The tightened JSON schema of a custom resource kind."""
    path = crd_dir() / CRD_FILES[(api_version, kind)]
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _tighten(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    props = schema.setdefault("properties", {})
    props.update({"apiVersion": {"type": "string", "enum": [api_version]}, "kind": {"type": "string", "enum": [kind]},
                  "metadata": {"type": "object"}})
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Raise SchemaError unless `obj` validates strictly (core kind or one of the shipped CRDs)."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CRD_FILES:
        import jsonschema

        validator = jsonschema.Draft7Validator(crd_schema(*key))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            raise SchemaError(f"{key[1]} {'.'.join(map(str, err.absolute_path))}: {err.message}")
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise SchemaError(f"{key[1]}: {exc.message}") from None
