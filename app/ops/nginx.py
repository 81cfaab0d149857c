"""Render `nginx/nginx.conf.template` (and the `proxy.conf` it includes) from the environment / `.env`
into a private nginx prefix.

Upstreams follow the shared contract: primary = Ray Serve (its ingress, or its proxy) at
SERVE_HOST:SERVE_PORT (the address `cluster deploy` binds; default 127.0.0.1),
backup = the standalone fallback server(s) at 127.0.0.1:FALLBACK_PORT; the Batch API (`/v1/files`,
`/v1/batches`) goes to the batch service at 127.0.0.1:BATCH_PORT
(a comma list of ports, or full `host:port` lists in
NGINX_PRIMARY / NGINX_BACKUPS when they live elsewhere). Relative paths (pid,
temp, logs) resolve against nginx's `-p` prefix, so the rendered folder is a
self-contained, non-root nginx home. `down` names the servers the front door's active checker
(`app.ops.front_door`) found failing: they are rendered with nginx's `down` flag.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cluster.node import DEFAULT_SERVE_HOST
from app.ops.render import REPO_ROOT, RenderError, parse_hostports, parse_ports, substitute

TEMPLATE = REPO_ROOT / "nginx" / "nginx.conf.template"
PROXY_TEMPLATE = REPO_ROOT / "nginx" / "proxy.conf.template"
_DURATION = re.compile(r"^\d+(ms|s|m|h)?$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")
_RATE = re.compile(r"^\d+r/[sm]$")


class NginxSettings(BaseSettings):
    """Every knob of the rendered nginx.conf (env names as in `.env.example`)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    serve_host: str = Field(default=DEFAULT_SERVE_HOST, description="Address Ray Serve binds (SERVE_HOST).")
    serve_port: int = Field(default=8000, ge=1, le=65535, description="Ray Serve HTTP port (primary).")
    fallback_port: str = Field(default="8001", description="Fallback server port(s), comma list (backups).")
    nginx_primary: str = Field(default="", description="host:port list overriding 127.0.0.1:SERVE_PORT.")
    nginx_backups: str = Field(default="", description="host:port list overriding 127.0.0.1:FALLBACK_PORT.")
    batch_port: int = Field(default=8005, ge=1, le=65535, description="Batch service port (BATCH_PORT): "
                            "/v1/files and /v1/batches go there.")
    nginx_batch_upstream: str = Field(default="", description="host:port overriding 127.0.0.1:BATCH_PORT.")
    nginx_batch_max_body: str = Field(default="201m", description="Largest upload to /v1/files (a batch input "
                                      "file, LLM_BATCH_MAX_FILE_BYTES, plus the multipart framing).")
    nginx_port: int = Field(default=8080, ge=1, le=65535)
    nginx_bind: str = "127.0.0.1"
    nginx_status_port: int = Field(default=8081, ge=1, le=65535, description="stub_status, 127.0.0.1 only.")
    nginx_worker_processes: str = "auto"
    nginx_worker_connections: int = Field(default=1024, ge=16)
    nginx_connect_timeout: str = Field(default="2s", description="TCP connect to an upstream.")
    nginx_read_timeout: str = Field(default="300s", description="Time to first byte and between two reads.")
    nginx_send_timeout: str = "60s"
    nginx_max_fails: int = Field(default=0, ge=0, description="Passive checks; 0 (off): health is active.")
    nginx_fail_timeout: str = "10s"
    nginx_next_upstream_tries: int = Field(default=0, ge=0, description="0 = every upstream once.")
    nginx_next_upstream_timeout: str = Field(
        default="10s", description="No replay on the backup once a request has run this long (0: no bound).")
    nginx_client_header_timeout: str = "10s"
    nginx_client_body_timeout: str = "30s"
    nginx_client_keepalive_timeout: str = "75s"
    nginx_max_header: str = Field(default="32k", description="Largest request line / header line.")
    # the front door's active health checks (app.ops.front_door)
    nginx_check_path: str = Field(default="/health", description="Polled on every upstream.")
    nginx_check_interval_s: float = Field(default=1.0, gt=0)
    nginx_check_timeout_s: float = Field(default=1.0, gt=0)
    nginx_check_fall: int = Field(default=2, ge=1, description="Consecutive failures that mark a server down.")
    nginx_check_rise: int = Field(default=2, ge=1, description="Consecutive successes that bring it back.")
    nginx_keepalive: int = Field(default=32, ge=1)
    nginx_max_body: str = "4m"
    nginx_rate_limit: str = Field(default="", description="Per-client rate like 10r/s; empty disables.")
    nginx_rate_burst: int = Field(default=20, ge=0)
    nginx_expose_upstream: bool = Field(default=False, description="Add X-Upstream: $upstream_addr.")
    nginx_pid_path: str = "nginx.pid"
    nginx_temp_dir: str = "temp"
    nginx_error_log: str = "logs/error.log"
    nginx_error_log_level: str = "warn"
    nginx_access_log: str = "logs/access.log"

    @field_validator("nginx_connect_timeout", "nginx_read_timeout", "nginx_send_timeout", "nginx_fail_timeout",
                     "nginx_next_upstream_timeout", "nginx_client_header_timeout", "nginx_client_body_timeout",
                     "nginx_client_keepalive_timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        if not _DURATION.match(v):
            raise ValueError(f"{v!r} is not an nginx duration like 30s")
        return v

    @field_validator("nginx_max_body", "nginx_max_header", "nginx_batch_max_body")
    @classmethod
    def _size(cls, v: str) -> str:
        if not _SIZE.match(v):
            raise ValueError(f"{v!r} is not an nginx size like 4m")
        return v

    @field_validator("nginx_rate_limit")
    @classmethod
    def _rate(cls, v: str) -> str:
        if v and not _RATE.match(v):
            raise ValueError(f"{v!r} is not an nginx rate like 10r/s")
        return v

    def primaries(self) -> list[str]:
        if self.nginx_primary:
            return parse_hostports(self.nginx_primary, "NGINX_PRIMARY")
        return [f"{self.serve_host}:{self.serve_port}"]

    def backups(self) -> list[str]:
        if self.nginx_backups:
            return parse_hostports(self.nginx_backups, "NGINX_BACKUPS")
        return [f"127.0.0.1:{p}" for p in parse_ports(self.fallback_port, "FALLBACK_PORT")]

    def batch_server(self) -> str:
        if self.nginx_batch_upstream:
            servers = parse_hostports(self.nginx_batch_upstream, "NGINX_BATCH_UPSTREAM")
            if len(servers) != 1:
                raise RenderError("NGINX_BATCH_UPSTREAM: exactly one host:port (the batch service)")
            return servers[0]
        return f"127.0.0.1:{self.batch_port}"

    def upstreams(self) -> list[str]:
        """Every server of the upstream block, primaries first (what the front door polls)."""
        primaries = self.primaries()
        return primaries + [hp for hp in self.backups() if hp not in primaries]


def template_values(s: NginxSettings, down: frozenset[str] = frozenset()) -> dict[str, str]:
    primaries = s.primaries()
    if not primaries:
        raise RenderError("NGINX_PRIMARY: no primary upstream")
    health = f"max_fails={s.nginx_max_fails} fail_timeout={s.nginx_fail_timeout}"
    servers = [f"        server {hp} {health}{' backup' if hp not in primaries else ''}{' down' if hp in down else ''};"
               for hp in s.upstreams()]
    zone = limit = ""
    if s.nginx_rate_limit:
        zone = (f"    limit_req_zone $binary_remote_addr zone=per_client:10m rate={s.nginx_rate_limit};\n"
                "    limit_req_status 429;\n")
        limit = f"            limit_req zone=per_client burst={s.nginx_rate_burst} nodelay;"
    header = "            add_header X-Upstream $upstream_addr always;" if s.nginx_expose_upstream else ""
    return {
        "NGINX_WORKER_PROCESSES": s.nginx_worker_processes,
        "NGINX_WORKER_CONNECTIONS": str(s.nginx_worker_connections),
        "NGINX_PID_PATH": s.nginx_pid_path,
        "NGINX_ERROR_LOG": s.nginx_error_log,
        "NGINX_ERROR_LOG_LEVEL": s.nginx_error_log_level,
        "NGINX_ACCESS_LOG": s.nginx_access_log,
        "NGINX_TEMP_DIR": s.nginx_temp_dir.rstrip("/") or "/",
        "NGINX_MAX_BODY": s.nginx_max_body,
        "NGINX_RATE_LIMIT_ZONE": zone,
        "NGINX_RATE_LIMIT": limit,
        "NGINX_UPSTREAM_SERVERS": "\n".join(servers),
        "NGINX_KEEPALIVE": str(s.nginx_keepalive),
        "NGINX_BIND": s.nginx_bind,
        "NGINX_PORT": str(s.nginx_port),
        "NGINX_NEXT_UPSTREAM_TRIES": str(s.nginx_next_upstream_tries),
        "NGINX_NEXT_UPSTREAM_TIMEOUT": s.nginx_next_upstream_timeout,
        "NGINX_CLIENT_HEADER_TIMEOUT": s.nginx_client_header_timeout,
        "NGINX_CLIENT_BODY_TIMEOUT": s.nginx_client_body_timeout,
        "NGINX_CLIENT_KEEPALIVE_TIMEOUT": s.nginx_client_keepalive_timeout,
        "NGINX_MAX_HEADER": s.nginx_max_header,
        "NGINX_CONNECT_TIMEOUT": s.nginx_connect_timeout,
        "NGINX_READ_TIMEOUT": s.nginx_read_timeout,
        "NGINX_SEND_TIMEOUT": s.nginx_send_timeout,
        "NGINX_UPSTREAM_HEADER": header,
        "NGINX_STATUS_PORT": str(s.nginx_status_port),
        "NGINX_BATCH_SERVER": s.batch_server(),
        "NGINX_BATCH_MAX_BODY": s.nginx_batch_max_body,
    }


def render_nginx(out_dir: Path, settings: NginxSettings | None = None, template: Path = TEMPLATE,
                 down: frozenset[str] = frozenset()) -> Path:
    """Write OUT/nginx.conf (+ OUT/proxy.conf) and create the relative log/temp folders nginx expects under
    the prefix OUT. Each file is replaced atomically (a reload never reads a half-written one)."""
    s = settings or NginxSettings()
    values = template_values(s, down)
    text = substitute(template.read_text(), values, str(template))
    proxy = substitute(PROXY_TEMPLATE.read_text(), values, str(PROXY_TEMPLATE))
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in (s.nginx_temp_dir, str(Path(s.nginx_error_log).parent), str(Path(s.nginx_access_log).parent),
                str(Path(s.nginx_pid_path).parent)):
        path = Path(rel) if Path(rel).is_absolute() else out_dir / rel
        if not str(path).startswith("/dev"):
            path.mkdir(parents=True, exist_ok=True)
    _replace(out_dir / "proxy.conf", proxy)
    conf = out_dir / "nginx.conf"
    _replace(conf, text)
    return conf


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
