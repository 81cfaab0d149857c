"""Render `monitoring/prometheus.yml.template` from the environment / `.env`, with the alert rules beside it.

Targets follow the shared contract: the fallback server(s) on
127.0.0.1:FALLBACK_PORT, Ray's metrics export port on HEAD_IP (plus every node
listed in RAY_NODE_TARGETS, plus Ray's own service-discovery file when Ray's
dashboard writes it), the nginx exporter and NVIDIA's DCGM exporter on the GPU
VMs. The output folder is self-contained: `prometheus --config.file=DIR/prometheus.yml`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.ops.render import REPO_ROOT, parse_hostports, parse_ports, substitute

MONITORING = REPO_ROOT / "monitoring"
TEMPLATE = MONITORING / "prometheus.yml.template"
RULES = MONITORING / "rules"
_DURATION = re.compile(r"^\d+(ms|s|m|h)$")


class PrometheusSettings(BaseSettings):
    """Scrape targets and intervals (env names as in `.env.example`)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    prometheus_scrape_interval: str = "15s"
    prometheus_eval_interval: str = "15s"
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    fallback_port: str = Field(default="8001", description="Fallback server port(s) on this VM, comma list.")
    prom_fallback_targets: str = Field(default="", description="host:port list overriding FALLBACK_PORT.")
    prom_app_targets: str = Field(default="", description="Other standalone servers, e.g. DeepSpeed 127.0.0.1:8002.")
    batch_port: int = Field(default=8005, ge=1, le=65535, description="The batch service's port on this VM.")
    prom_batch_targets: str = Field(default="", description="host:port list overriding 127.0.0.1:BATCH_PORT.")
    head_ip: str = "127.0.0.1"
    ray_metrics_export_port: int = Field(default=8090, ge=1, le=65535)
    ray_node_targets: str = Field(default="", description="host:port of every Ray node's metrics export port.")
    ray_sd_file: str = "/tmp/ray/prom_metrics_service_discovery.json"
    alertmanager_targets: str = Field(default="", description="host:port list of Alertmanagers.")
    dcgm_discovery: bool = Field(default=True, description="Scrape DCGM on every non-head node of RAY_SD_FILE.")
    nginx_exporter_targets: str = "127.0.0.1:9113"
    dcgm_targets: str = Field(default="", description="host:port list of DCGM exporters.")
    dcgm_exporter_port: int = Field(default=9400, ge=1, le=65535)

    @field_validator("prometheus_scrape_interval", "prometheus_eval_interval")
    @classmethod
    def _duration(cls, v: str) -> str:
        if not _DURATION.match(v):
            raise ValueError(f"{v!r} is not a Prometheus duration like 15s")
        return v

    def ray_nodes(self) -> list[str]:
        head = f"{self.head_ip}:{self.ray_metrics_export_port}"
        nodes = parse_hostports(self.ray_node_targets, "RAY_NODE_TARGETS")
        return nodes if head in nodes else [head, *nodes]

    def dcgm(self) -> list[str]:
        if self.dcgm_targets:
            return parse_hostports(self.dcgm_targets, "DCGM_TARGETS")
        # default: the DCGM exporter port on every Ray worker node listed (the head VM has no GPU)
        hosts = [hp.rpartition(":")[0] for hp in parse_hostports(self.ray_node_targets, "RAY_NODE_TARGETS")]
        return [f"{h}:{self.dcgm_exporter_port}" for h in hosts if h != self.head_ip]

    def fallbacks(self) -> list[str]:
        if self.prom_fallback_targets:
            return parse_hostports(self.prom_fallback_targets, "PROM_FALLBACK_TARGETS")
        return [f"127.0.0.1:{p}" for p in parse_ports(self.fallback_port, "FALLBACK_PORT")]


def dcgm_discovery(s: PrometheusSettings) -> str:
    """file_sd block for the dcgm job: Ray's node list with the port swapped, the head VM left out."""
    if not s.dcgm_discovery:
        return ""
    head = re.escape(s.head_ip)
    return (f"    file_sd_configs:\n      - files:\n          - {json.dumps(s.ray_sd_file)}\n"
            f"        refresh_interval: 30s\n    relabel_configs:\n"
            f"      - source_labels: [__address__]\n        regex: '{head}:\\d+'\n        action: drop\n"
            f"      - source_labels: [__address__]\n        regex: '(.+):\\d+'\n        target_label: __address__\n"
            f"        replacement: '${{1}}:{s.dcgm_exporter_port}'\n      - target_label: job\n"
            f"        replacement: dcgm\n      - target_label: role\n        replacement: gpu")


def template_values(s: PrometheusSettings) -> dict[str, str]:
    return {
        "PROMETHEUS_SCRAPE_INTERVAL": s.prometheus_scrape_interval,
        "PROMETHEUS_EVAL_INTERVAL": s.prometheus_eval_interval,
        "FALLBACK_TARGETS": json.dumps(s.fallbacks()),
        "APP_TARGETS": json.dumps(parse_hostports(s.prom_app_targets, "PROM_APP_TARGETS")),
        "BATCH_TARGETS": json.dumps(parse_hostports(s.prom_batch_targets, "PROM_BATCH_TARGETS")
                                    or [f"127.0.0.1:{s.batch_port}"]),
        "RAY_NODE_TARGETS": json.dumps(s.ray_nodes()),
        "RAY_SD_FILE": json.dumps(s.ray_sd_file),
        "NGINX_EXPORTER_TARGETS": json.dumps(parse_hostports(s.nginx_exporter_targets, "NGINX_EXPORTER_TARGETS")),
        "DCGM_TARGETS": json.dumps(s.dcgm()),
        "DCGM_DISCOVERY": dcgm_discovery(s),
        "ALERTMANAGER_TARGETS": json.dumps(parse_hostports(s.alertmanager_targets, "ALERTMANAGER_TARGETS")),
        "PROMETHEUS_SELF_TARGETS": json.dumps([f"127.0.0.1:{s.prometheus_port}"]),
    }


def render_prometheus(out_dir: Path, settings: PrometheusSettings | None = None, template: Path = TEMPLATE) -> Path:
    """Write OUT/prometheus.yml and copy the alert rules to OUT/rules/."""
    s = settings or PrometheusSettings()
    text = substitute(template.read_text(), template_values(s), str(template))
    out_dir.mkdir(parents=True, exist_ok=True)
    rules_out = out_dir / "rules"
    rules_out.mkdir(exist_ok=True)
    for rule_file in sorted(RULES.glob("*.yml")):
        shutil.copyfile(rule_file, rules_out / rule_file.name)
    conf = out_dir / "prometheus.yml"
    conf.write_text(text)
    return conf
