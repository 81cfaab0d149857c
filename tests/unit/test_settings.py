"""One definition per knob: `ServingKnobs` is shared by LLM_* settings, model configs, engine specs and DS_*.

Also: the engine batch cap has one name (`max_num_seqs`, `LLM_MAX_NUM_SEQS`, `--max-num-seqs`); a retired
`LLM_MAX_RUNNING` in the environment or `.env` fails with the new name; the serve CLI's help comes from the
same field descriptions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from app.deepspeed.config import DSSettings
from app.engines.base import EngineSpec, ServingKnobs
from app.models.config import ModelConfig
from app.settings import Settings
from app.standalone import spec_from_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for prefix in ("LLM_", "DS_"):
        for key in [k for k in __import__("os").environ if k.startswith(prefix)]:
            monkeypatch.delenv(key)


@pytest.mark.parametrize("model", [Settings, ModelConfig, EngineSpec, DSSettings])
def test_the_knobs_are_declared_once(model: type) -> None:
    for name, field in ServingKnobs.model_fields.items():
        mine = model.model_fields[name]
        assert (mine.default, mine.description, mine.metadata) == (field.default, field.description, field.metadata)


def test_knobs_from_the_environment_and_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MAX_WAITING", "7")
    monkeypatch.setenv("DS_RETRY_AFTER_S", "3")
    assert Settings().max_waiting == 7 and DSSettings().retry_after_s == 3.0
    monkeypatch.setenv("LLM_MAX_WAITING", "-1")
    with pytest.raises(ValidationError, match="max_waiting"):
        Settings()


def test_max_num_seqs_is_the_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_num_seqs is None  # each engine's own default (transformers 16, vLLM its own)
    assert "max_num_seqs" not in spec_from_settings(Settings(model="m")).engine_kwargs
    monkeypatch.setenv("LLM_MAX_NUM_SEQS", "6")
    spec = spec_from_settings(Settings(model="m"))
    assert spec.engine_kwargs["max_num_seqs"] == 6 and spec.source == "LLM_* settings / serve options"


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_the_retired_max_running_fails_naming_the_new_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               where: str) -> None:
    if where == "env":
        monkeypatch.setenv("LLM_MAX_RUNNING", "4")
    else:
        (tmp_path / ".env").write_text("LLM_MAX_RUNNING=4\n")
    with pytest.raises(ValidationError, match="LLM_MAX_RUNNING was renamed: set LLM_MAX_NUM_SEQS"):
        Settings()


def test_serve_help_derives_from_the_knob_definitions() -> None:
    from app.cli import cli

    out = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.replace("│", " ").split())  # rich's help panel, borders dropped
    assert "--max-num-seqs" in text and "--max-running" not in text
    for name, field in ServingKnobs.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join((field.description or "").split()[:4]) in text


def test_engine_spec_pickles_and_validates() -> None:
    import pickle

    spec = EngineSpec(model_id="m", model_source="/x", engine="transformers", max_waiting=3)
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValidationError):
        EngineSpec(model_id="m", model_source="/x", engine="tensorrt")  # type: ignore[arg-type]


def test_missing_local_model_tells_paths_from_hub_ids(tmp_path: Path) -> None:
    from app.engines.base import missing_local_model

    (tmp_path / "weights.bin").write_text("x")
    for hub_id in ("gpt2", "Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path)):
        assert missing_local_model(hub_id) is None, hub_id
    for path in ("./m", ".cache/tiny-model", "/models/qwen", "~/m", "a/b/c"):
        assert "does not exist" in (missing_local_model(path) or ""), path
    assert "is a file, not a model folder" in (missing_local_model(str(tmp_path / "weights.bin")) or "")


def test_engine_start_refuses_a_missing_folder_before_any_engine(tmp_path: Path) -> None:
    """Ray replicas and DeepSpeed start engines from specs: the same message, and no fallback tried."""
    import asyncio

    from app.engines.select import start_engine
    from app.metrics import PrometheusSink

    spec = EngineSpec(model_id="tiny", model_source=str(tmp_path / "missing"), engine="auto")
    with pytest.raises(ValueError, match=r"model tiny: '.*missing' is a local path .* does not exist"):
        asyncio.run(start_engine(spec, PrometheusSink()))
