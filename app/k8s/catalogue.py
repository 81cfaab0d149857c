"""The tier catalogue: one KubeRay worker group per tier (GPU shape, node pool, Ray resource, autoscaling bounds).

The shipped default is `tiers.yaml` next to this module; `--tiers FILE` reads the user's copy. Checked strictly:
an unknown or invalid key is a `K8sError` naming the file and the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_TIERS = Path(__file__).with_name("tiers.yaml")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class K8sError(ValueError):
    """What `k8s render` refuses; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bounds(_Strict):
    request: str
    limit: str

    @field_validator("request", "limit")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not _QUANTITY.match(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        return v


class Taint(_Strict):
    key: str = Field(min_length=1)
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class Tier(_Strict):
    resource: str = Field(min_length=1, description="Custom Ray resource model configs request.")
    gpus: int = Field(ge=0, le=16, description="nvidia.com/gpu per worker pod (0: CPU tier).")
    slots: float | None = Field(default=None, gt=0, description="Amount of `resource` a worker carries.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    cpu: Bounds
    memory: Bounds
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> Tier:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} is above max_workers {self.max_workers}")
        return self

    @property
    def resource_slots(self) -> float:
        return self.slots if self.slots is not None else float(self.gpus or 1)


class Head(_Strict):
    """The Ray head pod (no GPU, no model replica): its CPU and memory."""

    cpu: Bounds = Bounds(request="2", limit="4")
    memory: Bounds = Bounds(request="8Gi", limit="8Gi")


class Catalogue(_Strict):
    head: Head = Head()
    tiers: dict[str, Tier] = Field(min_length=1)
    source: str = Field(default="", exclude=True)

    @field_validator("tiers")
    @classmethod
    def _names(cls, v: dict[str, Tier]) -> dict[str, Tier]:
        for name in v:
            if not _DNS_LABEL.match(name) or len(name) > 30:
                raise ValueError(f"tier name {name!r} must be a short DNS label ([a-z0-9-], it names a worker group)")
        seen: dict[str, str] = {}
        for name, tier in v.items():
            if tier.resource in seen:
                raise ValueError(f"tiers {seen[tier.resource]!r} and {name!r} both carry resource {tier.resource!r}")
            seen[tier.resource] = name
        return v

    def by_resource(self, resource: str) -> tuple[str, Tier] | None:
        return next(((n, t) for n, t in self.tiers.items() if t.resource == resource), None)


def load_catalogue(path: str | Path = DEFAULT_TIERS) -> Catalogue:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise K8sError(f"{path}: tier catalogue not found") from None
    except yaml.YAMLError as exc:
        raise K8sError(f"{path}: not valid YAML: {exc}") from None
    try:
        cat = Catalogue.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
        raise K8sError(f"{path}: {key}: {msg}") from None
    cat.source = str(path)
    return cat
