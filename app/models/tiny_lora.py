"""Builds a small LoRA adapter for a local base model offline, for tests and demos (`make-tiny-lora`).

PEFT wraps the base model with a `LoraConfig` of the given rank on the attention and MLP projections (the layers
every engine of the kit applies LoRA to, vLLM included), the A and B matrices get seeded random weights (PEFT
starts B at zero, which would leave the output unchanged), and `save_pretrained` writes the ordinary adapter
folder: `adapter_config.json` + `adapter_model.safetensors`. Different seeds give adapters whose greedy outputs
differ from each other and from the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_SCALE = 0.3  # std of the random A and B weights: a visible change on a hidden-64 model


def build_tiny_lora(base_dir: str | Path, out_dir: str | Path, *, rank: int = 8, seed: int = 0) -> Path:
    """Write a LoRA adapter of `rank` for the model in `base_dir` to `out_dir`; returns `out_dir`."""
    if rank < 1:
        raise ValueError(f"--rank {rank}: must be at least 1")
    base = Path(base_dir)
    if not (base / "config.json").is_file():
        raise ValueError(f"{base}: not a model folder (no config.json); build one with `python -m app "
                         "make-tiny-model DIR`")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in TARGET_MODULES if t in present]
    if not targets:
        raise ValueError(f"{base}: the model has none of the layers {', '.join(TARGET_MODULES)}")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * WEIGHT_SCALE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    # the base it was made for, as an absolute path (PEFT writes what it was given)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing about this adapter
    return out
