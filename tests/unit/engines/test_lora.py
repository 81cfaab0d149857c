"""LoRA adapter folders (`app.engines.lora`): names, listing, and the checks every engine applies before loading.

Adapters and a base model are written here as real files (safetensors headers with zero weights: the checks read
headers only), so these tests need neither torch nor a model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from app.engines.base import InvalidRequestError, LoraConfig, ModelNotFoundError
from app.engines.lora import AdapterFolder, split_model_id

LAYER = "model.layers.0.self_attn.q_proj"
MLP = "model.layers.0.mlp.down_proj"


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def write_adapter(root: Path, name: str, *, rank: int = 4, config: dict[str, object] | None = None,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    prefix = "base_model.model."
    write_safetensors(folder / "adapter_model.safetensors", shapes if shapes is not None else {
        f"{prefix}{LAYER}.lora_A.weight": (rank, 64), f"{prefix}{LAYER}.lora_B.weight": (64, rank),
        f"{prefix}{MLP}.lora_A.weight": (rank, 256), f"{prefix}{MLP}.lora_B.weight": (64, rank)})
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> AdapterFolder:
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors(base / "model.safetensors", {f"{LAYER}.weight": (64, 64), f"{MLP}.weight": (64, 256),
                                                   "model.embed_tokens.weight": (100, 64)})
    root = tmp_path / "adapters"
    write_adapter(root, "good")
    return AdapterFolder(LoraConfig(dynamic_lora_loading_path=str(root), max_num_adapters_per_replica=2),
                         model_id="m", model_source=str(base), max_rank=8)


def test_model_ids_split_on_the_first_colon_after_a_served_id() -> None:
    served = {"m", "org:m"}
    assert split_model_id("m", served) == ("m", None)
    assert split_model_id("m:a", served) == ("m", "a")
    assert split_model_id("m:a:b", served) == ("m", "a:b")  # the adapter name check refuses it later
    assert split_model_id("org:m", served) == ("org:m", None)
    assert split_model_id("org:m:a", served) == ("org:m", "a")
    assert split_model_id("other:a", served) == ("other:a", None)


def test_a_good_adapter_is_listed_and_checked(folder: AdapterFolder) -> None:
    (folder.root / "not-an-adapter").mkdir()
    (folder.root / ".hidden").mkdir()
    (folder.root / ".hidden" / "adapter_config.json").write_text("{}")
    assert folder.names() == ["good"]
    info = folder.check("good")
    assert (info.name, info.rank, info.path) == ("good", 4, str(folder.root / "good"))
    assert folder.check("good") is info  # cached by the files' modification times


@pytest.mark.parametrize("name", ["../good", "a/b", ".hidden", "", "x" * 129, "..", "a..b"])
def test_names_that_are_not_plain_folder_names_are_400(folder: AdapterFolder, name: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        folder.check(name)
    assert "an adapter name is a folder name" in err.value.message
    assert err.value.status_code == 400


def test_an_unknown_adapter_is_404_and_lists_those_there_are(folder: AdapterFolder) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        folder.check("nope")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "model 'm:nope' does not exist" in err.value.message and "m:good" in err.value.message


def _bad(folder: AdapterFolder, name: str) -> str:
    with pytest.raises(InvalidRequestError) as err:
        folder.check(name)
    assert err.value.status_code == 400
    assert err.value.message.startswith(f"adapter m:{name} cannot be served: ")
    return err.value.message


def test_corrupt_folders_are_400_naming_the_adapter_and_the_problem(folder: AdapterFolder) -> None:
    root = folder.root
    (root / "noconfig").mkdir()
    (root / "noconfig" / "adapter_model.safetensors").write_bytes(b"")
    assert "adapter_config.json is missing" in _bad(folder, "noconfig")
    write_adapter(root, "badjson")
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in _bad(folder, "badjson")
    write_adapter(root, "noweights")
    (root / "noweights" / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in _bad(folder, "noweights")
    write_adapter(root, "truncated")
    (root / "truncated" / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    assert "adapter_model.safetensors is corrupt" in _bad(folder, "truncated")
    write_adapter(root, "garbage")
    (root / "garbage" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!")
    assert "is corrupt: safetensors header is not JSON" in _bad(folder, "garbage")
    write_adapter(root, "dora", config={"use_dora": True})
    assert "use_dora is set" in _bad(folder, "dora")
    write_adapter(root, "prefix", config={"peft_type": "PREFIX_TUNING"})
    assert "only LoRA adapters are served" in _bad(folder, "prefix")
    write_adapter(root, "norank", config={"r": "eight"})
    assert "r='eight'" in _bad(folder, "norank")


def test_a_rank_above_max_lora_rank_is_400_naming_both(folder: AdapterFolder) -> None:
    write_adapter(folder.root, "big", rank=16)
    message = _bad(folder, "big")
    assert "its rank 16 is above max_lora_rank 8 of model m" in message
    write_adapter(folder.root, "patterned", config={"rank_pattern": {"q_proj": 32}})
    assert "its rank 32 is above max_lora_rank 8" in _bad(folder, "patterned")


def test_an_adapter_of_another_base_is_400_naming_the_layer(folder: AdapterFolder) -> None:
    p = "base_model.model."
    write_adapter(folder.root, "wide", shapes={f"{p}{LAYER}.lora_A.weight": (4, 128),
                                               f"{p}{LAYER}.lora_B.weight": (128, 4)})
    assert f"layer {LAYER} is 64->64 in the base model m but 128->128 in the adapter" in _bad(folder, "wide")
    write_adapter(folder.root, "elsewhere", shapes={f"{p}model.layers.9.self_attn.q_proj.lora_A.weight": (4, 64),
                                                    f"{p}model.layers.9.self_attn.q_proj.lora_B.weight": (64, 4)})
    assert "layer model.layers.9.self_attn.q_proj does not exist in the base model m" in _bad(folder, "elsewhere")
    write_adapter(folder.root, "halves", shapes={f"{p}{LAYER}.lora_A.weight": (4, 64)})
    assert "lora_A and lora_B must both be present" in _bad(folder, "halves")
    write_adapter(folder.root, "ranks", shapes={f"{p}{LAYER}.lora_A.weight": (4, 64),
                                                f"{p}{LAYER}.lora_B.weight": (64, 2)})
    assert "do not match a rank of at most 4" in _bad(folder, "ranks")
    write_adapter(folder.root, "extra", shapes={f"{p}{LAYER}.weight": (64, 64)})
    assert "which is not a LoRA A/B weight" in _bad(folder, "extra")


def test_a_folder_replaced_in_place_is_checked_again(folder: AdapterFolder) -> None:
    folder.check("good")
    cfg = folder.root / "good" / "adapter_config.json"
    cfg.write_text("{broken")
    later = os.stat(cfg).st_mtime + 5
    os.utime(cfg, (later, later))
    assert "not valid JSON" in _bad(folder, "good")


def test_a_missing_root_lists_nothing(tmp_path: Path) -> None:
    empty = AdapterFolder(LoraConfig(dynamic_lora_loading_path=str(tmp_path / "none")), model_id="m",
                          model_source="org/model")
    assert empty.names() == []
    with pytest.raises(ModelNotFoundError):
        empty.check("a")
