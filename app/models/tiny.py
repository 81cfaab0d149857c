"""Builds a tiny Qwen2-architecture causal LM offline, for tests, CI and the demo.

No network: a byte-level BPE tokenizer is trained locally (with `tokenizers`) on
text generated here, the model gets seeded random weights, and both are written
with `save_pretrained`, so the ordinary loading code (AutoModelForCausalLM,
AutoTokenizer, vLLM) loads the folder like any hub checkpoint.

The EOS row of the output layer is scaled down so that random weights do not
end most answers after a token or two; generations usually run to max_tokens.

Default shape: hidden 64 with 2 attention heads and 2 KV heads, so head_dim is 32, the smallest head size
vLLM's CPU attention kernel accepts (it supports 32, 64, 80, 96, 112, 128, ...), and DeepSpeed TP=2 gives each
rank one query head and one KV head: every engine of the kit (transformers, DeepSpeed TP, vLLM on CPU or GPU)
runs the same model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import cast

from app.models.chat_templates import QWEN_TOOLS_TEMPLATE

# the Qwen family's layout, tools included (`<tools>` in the system turn, `<tool_call>` blocks, tool responses)
CHAT_TEMPLATE = QWEN_TOOLS_TEMPLATE
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an of to in is it that for on with as was at by be this are from or have not but had they "
    "model cluster request token server engine replica worker head node serve stream answer question "
    "data system time user prompt batch latency throughput memory cache layer tensor parallel gpu cpu "
    "network route failover proxy metric alert deploy config health ready queue retry error success "
    "one two three four five six seven eight nine ten hello world quick brown fox jumps over lazy dog "
    "python rust docker compose ray vllm nginx prometheus grafana deepspeed linux kernel process thread"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    out += ["0123456789 +-*/=()[]{}<>:;'\"`~@#$%^&_|\\", "Ünïcödé ✓ 你好 – “quotes” …"]
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 2,
    max_context: int = 2048,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight Qwen2 model + tokenizer to `out_dir` and return the path."""
    if heads < 1 or kv_heads < 1 or hidden_size % heads or heads % kv_heads:
        raise ValueError(f"hidden_size {hidden_size}, heads {heads}, kv_heads {kv_heads}: hidden_size must be a "
                         "multiple of heads and heads a multiple of kv_heads")
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(out)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = cast(int, tok.convert_tokens_to_ids("<|endoftext|>"))  # one token in: one id out
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_context,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for special in (eos_id, pad_id):
            model.lm_head.weight[special] *= 0.05
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tiny_model.json").write_text(
        json.dumps({"built_by": "python -m app make-tiny-model", "seed": seed, "hidden_size": hidden_size,
                    "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": hidden_size // heads,
                    "max_context": max_context}, indent=2)
    )
    return out
