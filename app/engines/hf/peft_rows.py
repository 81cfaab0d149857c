"""LoRA adapters in a transformers model, applied row by row: `PeftRows` (PEFT does the LoRA math).

`load(name, folder)` injects PEFT LoRA layers for adapter `name` into the model in place
(`peft.inject_adapter_in_model` + `set_peft_model_state_dict`, the weights from the folder's
`adapter_model.safetensors`), `unload(name)` deletes them (`peft`'s `delete_adapter`). Several adapters live in
the model at once. Which adapter each row of a forward uses is PEFT's mixed-batch inference: a LoRA layer called
with `adapter_names=[...]` (one per row, `"__base__"` for none) adds each adapter's low-rank product to that
adapter's rows only. PEFT passes that list through forward hooks it registers for each call; here one
pre-forward hook per LoRA layer, registered once, hands every layer the list of the forward under way (`rows`),
so the ragged decode step (`app.engines.hf.ragged`) keeps calling the plain transformers model. Once any adapter
is loaded every forward names its rows (all `"__base__"` when none has an adapter), so an injected adapter is
never applied to a row by default.

All calls run on the thread that runs the model's forwards (the scheduler thread), between forwards.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from app.engines.lora import WEIGHTS_FILE

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_PREFIX = "base_model.model."  # how PEFT's save_pretrained prefixes the keys of a causal LM's adapter


class PeftRows:
    """The PEFT adapters injected into one model, and the per-row adapter names of the forward under way."""

    def __init__(self, model: Any):
        self.model = model
        self.names: set[str] = set()
        self._rows: list[str] | None = None
        self._hooked: set[int] = set()

    def load(self, name: str, folder: str) -> None:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        if name in self.names:
            return
        config = LoraConfig.from_pretrained(folder)
        config.inference_mode = True
        state = {key.removeprefix(_PREFIX): value for key, value in load_file(str(Path(folder) / WEIGHTS_FILE)).items()}
        with warnings.catch_warnings():  # "Already found a `peft_config` attribute": several adapters is the point
            warnings.filterwarnings("ignore", message=".*peft_config.*", category=UserWarning)
            inject_adapter_in_model(config, self.model, adapter_name=name)
        self.names.add(name)
        try:
            result: Any = set_peft_model_state_dict(self.model, state, adapter_name=name)
            ours = f".{name}."
            missing = [k for k in result.missing_keys if ours in k and "lora_" in k]
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if missing or unexpected:
                raise ValueError(f"weights do not match the adapter's layers (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
        except BaseException:
            self.unload(name)
            raise
        self._hook_layers()

    def unload(self, name: str) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import delete_adapter

        if name not in self.names:
            return
        self.names.discard(name)
        with warnings.catch_warnings():  # "Adapter X was active which is now deleted": no adapter is active here
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*", category=UserWarning)
            delete_adapter(self.model, name, prefix="lora_", layer_cls=LoraLayer)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | None], rows: int) -> Iterator[None]:
        """Within: the next forward's row i uses adapter `names[i]` (None, or past the list: no adapter)."""
        listed = [BASE if n is None else n for n in names]
        self._rows = listed + [BASE] * (rows - len(listed))
        try:
            yield
        finally:
            self._rows = None

    def _hook_layers(self) -> None:
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                layer: Any = module  # a torch Module (PEFT's LoraLayer is its mixin)
                layer.register_forward_pre_hook(self._name_rows, with_kwargs=True)
                self._hooked.add(id(module))

    def _name_rows(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = self._rows
        if rows is None:  # a forward outside `rows` (warm-up, probes): every row is the base model's
            x: Any = args[0] if args else kwargs["x"]
            rows = [BASE] * int(x.shape[0])
        kwargs["adapter_names"] = rows
        return args, kwargs
