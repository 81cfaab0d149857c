"""`python -m app make-tiny-lora BASE OUT`: a PEFT LoRA adapter folder with non-zero A and B weights.

The session fixture `tiny_loras` builds A (rank 8, seed 1), B (rank 4, seed 2) and C with the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engines.base import LoraConfig
from app.engines.lora import AdapterFolder
from app.models.tiny_lora import TARGET_MODULES, build_tiny_lora

pytestmark = pytest.mark.slow  # builds adapters with torch + PEFT


def test_the_cli_writes_plain_peft_lora_folders(tiny_loras: Path, tiny_model: Path) -> None:
    from safetensors.torch import load_file

    for name, rank in (("A", 8), ("B", 4)):
        folder = tiny_loras / name
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", rank, 2 * rank)
        assert set(cfg["target_modules"]) == set(TARGET_MODULES)
        assert cfg["base_model_name_or_path"] == str(tiny_model.resolve())
        weights = load_file(str(folder / "adapter_model.safetensors"))
        assert weights and all(float(t.abs().sum()) > 0 for t in weights.values())  # B is not PEFT's zero init
    a = load_file(str(tiny_loras / "A" / "adapter_model.safetensors"))
    c = load_file(str(tiny_loras / "C" / "adapter_model.safetensors"))
    assert any(not (a[k] == c[k]).all() for k in a)  # seeds differ
    # what every engine checks before loading passes
    adapters = AdapterFolder(LoraConfig(dynamic_lora_loading_path=str(tiny_loras)), model_id="tiny",
                             model_source=str(tiny_model))
    assert adapters.names() == ["A", "B", "C"]
    assert adapters.check("A").rank == 8


def test_bad_arguments_are_refused_before_loading(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="--rank 0: must be at least 1"):
        build_tiny_lora(tiny_model, tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="not a model folder"):
        build_tiny_lora(tmp_path, tmp_path / "x")
