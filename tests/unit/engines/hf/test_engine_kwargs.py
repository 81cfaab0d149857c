"""`engine_kwargs` as the transformers engine reads them: used, knowingly ignored, refused; never silently dropped."""

from __future__ import annotations

import pytest

from app.engines.hf.engine import IGNORED_VLLM_KWARGS, REFUSED_KWARGS, USED_KWARGS, transformers_engine_config
from app.engines.hf.runner import HFEngineConfig


def test_used_keys_fill_the_engine_config() -> None:
    cfg, notes = transformers_engine_config({
        "dtype": "bfloat16", "device": "cpu", "max_model_len": 512, "max_num_seqs": 3, "trust_remote_code": True,
        "revision": "abc", "tokenizer": "org/tok", "seed": 5, "tensor_parallel_size": 1, "prefill_chunk_tokens": 64,
        "cpu_threads": 3})
    assert cfg == HFEngineConfig(device="cpu", dtype="bfloat16", max_model_len=512, max_num_seqs=3,
                                 trust_remote_code=True, revision="abc", tokenizer="org/tok", seed=5,
                                 prefill_chunk_tokens=64, cpu_threads=3)
    assert notes == []
    # a batch of 16 sequences, prompts prefilled 512 tokens per step, auto device and dtype
    assert transformers_engine_config({}) == (HFEngineConfig(), [])
    assert (HFEngineConfig.max_num_seqs, HFEngineConfig.prefill_chunk_tokens) == (16, 512)


def test_vllm_tuning_keys_are_ignored_and_named() -> None:
    _, notes = transformers_engine_config({"gpu_memory_utilization": 0.9, "enable_prefix_caching": True})
    assert notes == ["ignores vLLM-only engine_kwargs enable_prefix_caching, gpu_memory_utilization"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantization": "awq"}, "engine_kwargs.quantization='awq': changes results"),
    ({"tensor_parallel_size": 2}, "engine_kwargs.tensor_parallel_size=2: changes results"),
    ({"max_num_seq": 4}, "engine_kwargs.max_num_seq: not an argument of the transformers engine"),
    ({"max_num_seqs": "4"}, "engine_kwargs.max_num_seqs='4': must be an integer >= 1"),
    ({"prefill_chunk_tokens": 0}, "engine_kwargs.prefill_chunk_tokens=0: must be an integer >= 1"),
    ({"max_num_seqs": 0}, "engine_kwargs.max_num_seqs=0: must be an integer >= 1"),
    ({"cpu_threads": 0}, "engine_kwargs.cpu_threads=0: must be an integer >= 1"),
    ({"max_model_len": 8}, "engine_kwargs.max_model_len=8: must be an integer >= 16"),
    ({"dtype": "float64"}, "engine_kwargs.dtype='float64'"),
    ({"trust_remote_code": "yes"}, "engine_kwargs.trust_remote_code='yes': must be true or false"),
    ({"device": 3}, "engine_kwargs.device=3"),
])
def test_refused_keys_and_bad_values_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        transformers_engine_config(kwargs)


def test_a_fallback_drops_what_it_cannot_honour_and_says_so() -> None:
    cfg, notes = transformers_engine_config(
        {"quantization": "awq", "num_gpu_blocks_override": 4, "kv_cache_dtype": "fp8", "max_num_seqs": 2},
        fallback=True)
    assert cfg.max_num_seqs == 2
    assert notes == ["ignores vLLM-only engine_kwargs kv_cache_dtype",
                     "dropped engine_kwargs quantization (results differ from vLLM's)",
                     "dropped engine_kwargs num_gpu_blocks_override (unknown to the transformers engine)"]
    with pytest.raises(ValueError, match="max_num_seqs"):  # a bad value of a key it uses is still an error
        transformers_engine_config({"max_num_seqs": -1}, fallback=True)


def test_the_declared_sets_do_not_overlap() -> None:
    assert not (USED_KWARGS & IGNORED_VLLM_KWARGS) and not (USED_KWARGS & REFUSED_KWARGS)
    assert not (IGNORED_VLLM_KWARGS & REFUSED_KWARGS)
    assert {"gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "kv_cache_dtype",
            "max_num_batched_tokens", "enable_chunked_prefill"} <= IGNORED_VLLM_KWARGS
