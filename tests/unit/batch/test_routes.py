"""Batch API ownership with named keys, in process: a file belongs to the key's name; other keys get a 404."""

from __future__ import annotations

from pathlib import Path

from app.batch.service import BatchService
from app.metrics import PrometheusSink
from app.settings import Settings
from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save
from tests.support.fakes import FakeEngine, client, make_app


async def test_files_belong_to_the_key_name_and_survive_a_key_rotation(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    save(keys, KeysFile(keys=[KeyEntry(name="a", hash=hash_key("key-a")), KeyEntry(name="b", hash=hash_key("key-b"))]))
    sink = PrometheusSink()
    settings = Settings(batch_dir=str(tmp_path / "batch"), _env_file=None)  # type: ignore[call-arg]
    batch = BatchService.from_settings(settings, sink, "http://127.0.0.1:9")
    app = make_app(FakeEngine("fake", metrics=sink), metrics=sink, api_keys=["plain"], keys_file=str(keys),
                   batch=batch)
    line = b'{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"model": "fake", "prompt": "x"}}\n'

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with client(app) as http:
        up = await http.post("/v1/files", files={"file": ("in.jsonl", line)}, data={"purpose": "batch"},
                             headers=auth("key-a"))
        assert up.status_code == 200, up.text
        fid = up.json()["id"]
        assert (await http.get(f"/v1/files/{fid}", headers=auth("key-a"))).status_code == 200
        assert (await http.get(f"/v1/files/{fid}", headers=auth("key-b"))).status_code == 404
        assert (await http.get(f"/v1/files/{fid}", headers=auth("plain"))).status_code == 404
        # the key of `a` rotated: a new key under the same name still owns the file
        save(keys, KeysFile(keys=[KeyEntry(name="a", hash=hash_key("key-a2")),
                                  KeyEntry(name="b", hash=hash_key("key-b"))]))
        app.state.tenants.registry.refresh(force=True)
        assert (await http.get(f"/v1/files/{fid}", headers=auth("key-a2"))).status_code == 200
        assert (await http.get(f"/v1/files/{fid}", headers=auth("key-a"))).status_code == 401
    batch.store.close()
