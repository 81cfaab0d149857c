"""The offline tiny model (`python -m app make-tiny-model DIR`): builds without network, loads like any checkpoint.

The session fixture `tiny_model` builds it with the real CLI under HF_HUB_OFFLINE=1;
these tests load it with the ordinary transformers Auto classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)


def test_folder_layout_and_size(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "tiny_model.json"} <= names
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["max_position_embeddings"] == 2048
    size = sum(p.stat().st_size for p in tiny_model.iterdir())
    assert size < 5 * 1024 * 1024, size


def test_loads_with_auto_classes_and_has_a_chat_template(loaded) -> None:  # type: ignore[no-untyped-def]
    tok, model = loaded
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", ["hello world", "Ünïcödé ✓ 你好", "0123 +-*/ {json: true}", "🚀 unseen"])
def test_tokenizer_round_trips(loaded, text: str) -> None:  # type: ignore[no-untyped-def]
    tok, _ = loaded
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_generates_with_transformers_generate(loaded) -> None:  # type: ignore[no-untyped-def]
    import torch

    tok, model = loaded
    ids = tok("the cluster", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    with torch.inference_mode():
        again = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out, again)


def test_build_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    from app.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "again", seed=0)
    assert (other / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert json.loads((other / "tokenizer.json").read_text()) == json.loads((tiny_model / "tokenizer.json").read_text())
