"""DS_* settings of the DeepSpeed mode (environment / `.env`), shared by launcher and ranks.

Names are the shared `.env` contract: DS_HOSTS, DS_MASTER_PORT, DS_NET_IFNAME, DS_MODEL,
DS_SERVED_MODEL_NAME, DS_PORT, DS_COLLECTIVE_TIMEOUT_S, DS_LAUNCH_DEADLINE_S, DS_SSH_KEY,
plus a few tuning knobs with the same prefix. The launcher forwards every DS_* value to
the remote ranks through `.deepspeed_env`, so both sides read the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engines.hf.runner import HFEngineConfig
from app.http_guard import HTTPServerKnobs
from app.knobs import ConfiguredKnobs
from app.settings import default_model_id


@dataclass(frozen=True)
class Host:
    """One VM of the group: its address and how many ranks (slots) it runs."""

    addr: str
    slots: int = 1


def parse_hosts(value: str) -> list[Host]:
    """Parse DS_HOSTS (`ip[:slots],ip[:slots],...`; the first host runs rank 0 and the launcher)."""
    hosts: list[Host] = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        addr, _, slots = item.partition(":")
        if not addr:
            raise ValueError(f"DS_HOSTS entry {item!r} has no address")
        try:
            n = int(slots) if slots else 1
        except ValueError:
            raise ValueError(f"DS_HOSTS entry {item!r}: slots must be an integer") from None
        if n < 1:
            raise ValueError(f"DS_HOSTS entry {item!r}: slots must be >= 1")
        if any(h.addr == addr for h in hosts):
            raise ValueError(f"DS_HOSTS lists {addr} twice")
        hosts.append(Host(addr, n))
    if not hosts:
        raise ValueError("DS_HOSTS is empty: set it to the VMs' private addresses, e.g. 10.0.0.1,10.0.0.2")
    return hosts


class DSSettings(ConfiguredKnobs, HTTPServerKnobs, BaseSettings):
    """Settings of the DeepSpeed mode; CLI options override them (DS_MAX_WAITING etc. from ServingKnobs)."""

    model_config = SettingsConfigDict(
        env_prefix="DS_", env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )


    hosts: str = Field(default="", description="Comma list ip[:slots]; first = rank-0/launcher VM.")
    master_port: int = Field(default=29500, ge=1, le=65535)
    net_ifname: str = Field(default="", description="NIC of the private network (GLOO/NCCL_SOCKET_IFNAME).")
    model: str = ""
    served_model_name: str = ""
    host: str = Field(default="127.0.0.1", description="Address rank 0's API binds (host network: opt in to 0.0.0.0).")
    port: int = Field(default=8002, ge=1, le=65535)
    collective_timeout_s: float = Field(default=60.0, gt=0)
    heartbeat_s: float | None = Field(default=None, gt=0, description="Idle heartbeat period (timeout/4).")
    load_timeout_s: float = Field(default=1800.0, gt=0, description="How long ranks wait for each other to load.")
    launch_deadline_s: float = Field(default=1800.0, gt=0, description="Launch -> rank 0 ready, else give up.")
    exit_grace_s: float = Field(default=30.0, ge=0, description="After rank 0 dies, time for the rest to exit.")
    dead_linger_s: float = Field(default=5.0, ge=0, description="Rank 0 answers 503 this long before exiting.")
    ssh_key: str = ""
    ssh_port: int | None = Field(default=None, ge=1, le=65535, description="sshd port on every VM (default 22).")
    run_dir: str = Field(default="", description="Where the launcher writes hostfile and .deepspeed_env.")
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=HFEngineConfig.max_num_seqs, ge=1, le=256,
                              description="Sequences batched per decode step (same value on every rank).")
    prefill_chunk_tokens: int = Field(default=HFEngineConfig.prefill_chunk_tokens, ge=1,
                                      description="Prompt tokens prefilled per scheduler step.")
    device: str = Field(default="cpu", description="cpu | cuda (cuda uses nccl).")
    dtype: str = Field(default="float32")
    torch_extensions_dir: str = ""
    log_level: str = "info"
    api_keys: str = Field(default="", validation_alias=AliasChoices("API_KEYS", "DS_API_KEYS"))
    keys_file: str = Field(default="", validation_alias=AliasChoices("KEYS_FILE", "DS_KEYS_FILE"),
                           description="Keys file rank 0 enforces (named keys with limits; see README).")
    usage_db: str = Field(default="", validation_alias=AliasChoices("LLM_USAGE_DB", "DS_USAGE_DB"),
                          description="SQLite file of rank 0's per-key usage (empty: in memory).")

    @property
    def host_list(self) -> list[Host]:
        return parse_hosts(self.hosts)

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.host_list)

    @property
    def heartbeat_period_s(self) -> float:
        return self.heartbeat_s or max(0.2, min(10.0, self.collective_timeout_s / 4))

    @property
    def model_id(self) -> str:
        return self.served_model_name or default_model_id(self.model)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
