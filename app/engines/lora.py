"""LoRA adapter folders, checked the same way for every engine: `AdapterFolder`.

A model with a `lora_config` serves the PEFT adapters found under `dynamic_lora_loading_path`, one folder each
(`adapter_config.json` + `adapter_model.safetensors`), named by the request as `model: "<base id>:<folder>"`.
The folder is read on demand, so an adapter copied there while the server runs is served without a redeploy.

`AdapterFolder.check(name)` is what an engine calls before it loads an adapter (cheap: it reads the JSON config
and the safetensors header, never the weights), and the errors it raises are the API's:
- a name that is not a plain folder name (`../x`, `a/b`, empty, hidden): 400 naming the rule;
- no such folder: 404 `model_not_found`, listing the adapters there are;
- a folder that is not a loadable LoRA adapter (no or bad `adapter_config.json`, another PEFT type, DoRA or
  other variants the engines do not run, no or unreadable `adapter_model.safetensors`, tensors that do not
  match the config's rank): 400 naming the adapter and what is wrong;
- a rank above the engine's `max_lora_rank`: 400 naming both;
- weights shaped for another base model (a lora_A/lora_B whose width is not the base layer's): 400 naming the
  layer, found from the base model's own safetensors headers (when the base is a local folder).
The result is cached by the files' modification times (a folder replaced in place is checked again).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engines.base import InvalidRequestError, LoraConfig, ModelNotFoundError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_MAX_LORA_RANK = 16  # vLLM's default for max_lora_rank; the transformers engine uses the same
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_UNSUPPORTED_VARIANTS = ("use_dora", "use_qalora", "use_bdlora")
_HEADER_LIMIT = 100 * 1024 * 1024  # a safetensors JSON header larger than this is not an adapter's


def split_model_id(model: str, served: list[str] | set[str]) -> tuple[str, str | None]:
    """(base id, adapter) for a request's `model`: an id served as is, else `<base>:<adapter>` (first ':' whose
    prefix is a served id); (model, None) when neither applies (the caller answers 404)."""
    if model in served:
        return model, None
    start = 0
    while (i := model.find(":", start)) > 0:
        if model[:i] in served:
            return model[:i], model[i + 1 :]
        start = i + 1
    return model, None


def check_name(name: str, model_id: str) -> None:
    """400 unless `name` is a plain folder name (no path separators, no '..', no leading dot)."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"model {model_id}:{name!r}: an adapter name is a folder name of letters, digits, '_', '.' and '-' "
            "(no '/', no '..', at most 128 characters)", param="model")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, offsets); ValueError when unreadable."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file too short for a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size <= 0 or size > _HEADER_LIMIT:
            raise ValueError(f"safetensors header size {size} is implausible")
        raw = f.read(size)
    if len(raw) != size:
        raise ValueError("safetensors header is truncated")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a mapping")
    header.pop("__metadata__", None)
    return header


def base_linear_shapes(model_source: str) -> dict[str, tuple[int, ...]]:
    """Weight shapes of a local base model's tensors (name without `.weight` -> shape); {} when the base is not
    a local folder of safetensors (a hub id: the engine's load then checks the shapes)."""
    folder = Path(model_source)
    if not folder.is_dir():
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            header = read_safetensors_header(file)
        except (OSError, ValueError) as exc:
            log.warning("base model file %s: %s (adapter shapes are checked when loading)", file, exc)
            return {}
        for key, meta in header.items():
            if key.endswith(".weight") and isinstance(meta, dict):
                shapes[key.removesuffix(".weight")] = tuple(int(d) for d in meta.get("shape", ()))
    return shapes


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter: its name, folder, rank and the stamp its check is cached by."""

    name: str
    path: str
    rank: int
    stamp: tuple[float, float]


class AdapterFolder:
    """The adapter folders of one base model, with the checks every engine applies before loading one."""

    def __init__(self, config: LoraConfig, *, model_id: str, model_source: str, max_rank: int = DEFAULT_MAX_LORA_RANK):
        self.config = config
        self.root = Path(config.dynamic_lora_loading_path)
        self.model_id = model_id
        self.model_source = model_source
        self.max_rank = max_rank
        self._checked: dict[str, AdapterInfo] = {}
        self._base_shapes: dict[str, tuple[int, ...]] | None = None
        self._lock = threading.Lock()

    @property
    def max_adapters(self) -> int:
        return self.config.max_num_adapters_per_replica

    def names(self) -> list[str]:
        """Adapter folders found now (those with an adapter_config.json), sorted; [] when the root is missing."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        return sorted(e.name for e in entries if _NAME.match(e.name) and (e / CONFIG_FILE).is_file())

    def path(self, name: str) -> Path:
        return self.root / name

    def _not_found(self, name: str) -> ModelNotFoundError:
        found = ", ".join(f"{self.model_id}:{n}" for n in self.names()[:20]) or "none"
        return ModelNotFoundError(f"model '{self.model_id}:{name}' does not exist: no adapter folder {name!r} under "
                                  f"{self.root} (adapters: {found})")

    def check(self, name: str) -> AdapterInfo:
        """The adapter `name`, checked (see the module docstring for the errors); cached by modification time."""
        check_name(name, self.model_id)
        folder = self.path(name)
        if not folder.is_dir():
            raise self._not_found(name)
        stamp = (_mtime(folder / CONFIG_FILE), _mtime(folder / WEIGHTS_FILE))
        with self._lock:
            cached = self._checked.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        info = AdapterInfo(name=name, path=str(folder), rank=self._check_files(name, folder), stamp=stamp)
        with self._lock:
            self._checked[name] = info
        return info

    def _bad(self, name: str, what: str) -> InvalidRequestError:
        return InvalidRequestError(f"adapter {self.model_id}:{name} cannot be served: {what}", param="model")

    def _check_files(self, name: str, folder: Path) -> int:
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise self._bad(name, f"{CONFIG_FILE} is missing (is {folder} a PEFT LoRA adapter folder?)") from None
        except (OSError, ValueError) as exc:
            raise self._bad(name, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise self._bad(name, f"{CONFIG_FILE} is not a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise self._bad(name, f"peft_type {config.get('peft_type')!r}: only LoRA adapters are served")
        for variant in _UNSUPPORTED_VARIANTS:
            if config.get(variant):
                raise self._bad(name, f"{variant} is set: only plain LoRA adapters are served")
        if config.get("modules_to_save"):
            raise self._bad(name, "modules_to_save (fully trained layers) is set: only plain LoRA adapters are served")
        rank = config.get("r")
        ranks = [rank, *(config.get("rank_pattern") or {}).values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise self._bad(name, f"{CONFIG_FILE}: r={rank!r} (and rank_pattern) must be positive integers")
        top = max(int(r) for r in ranks)
        if top > self.max_rank:
            raise self._bad(name, f"its rank {top} is above max_lora_rank {self.max_rank} of model {self.model_id} "
                                  "(raise engine_kwargs.max_lora_rank, or serve an adapter of a lower rank)")
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise self._bad(name, f"{WEIGHTS_FILE} is missing (adapters are served from safetensors only)")
        try:
            header = read_safetensors_header(weights)
        except (OSError, ValueError) as exc:
            raise self._bad(name, f"{WEIGHTS_FILE} is corrupt: {exc}") from None
        self._check_shapes(name, header, top)
        return top

    def _check_shapes(self, name: str, header: dict[str, Any], rank: int) -> None:
        pairs: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, meta in header.items():
            m = _LORA_KEY.match(key)
            if m is None:
                raise self._bad(name, f"{WEIGHTS_FILE} holds {key!r}, which is not a LoRA A/B weight")
            shape = tuple(int(d) for d in (meta.get("shape") if isinstance(meta, dict) else None) or ())
            if len(shape) != 2:
                raise self._bad(name, f"{key}: shape {list(shape)} is not a matrix")
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = shape
        if not pairs:
            raise self._bad(name, f"{WEIGHTS_FILE} holds no LoRA weights")
        base = self._shapes_of_base()
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise self._bad(name, f"{module}: lora_A and lora_B must both be present")
            (r_a, width_in), (width_out, r_b) = ab["A"], ab["B"]
            if r_a != r_b or r_a > rank:
                raise self._bad(name, f"{module}: lora_A {list(ab['A'])} and lora_B {list(ab['B'])} do not match a "
                                      f"rank of at most {rank}")
            if not base:
                continue
            want = base.get(module)
            if want is None:
                raise self._bad(name, f"layer {module} does not exist in the base model {self.model_id} "
                                      "(an adapter of another model?)")
            if len(want) == 2 and (want[0] != width_out or want[1] != width_in):
                raise self._bad(name, f"layer {module} is {want[1]}->{want[0]} in the base model {self.model_id} "
                                      f"but {width_in}->{width_out} in the adapter (an adapter of another model?)")

    def _shapes_of_base(self) -> dict[str, tuple[int, ...]]:
        if self._base_shapes is None:
            self._base_shapes = base_linear_shapes(self.model_source)
        return self._base_shapes


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0
