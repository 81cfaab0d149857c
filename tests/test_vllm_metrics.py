"""What Prometheus stores for vLLM's `vllm:*` metrics served on our `/metrics`.

A real API process (the one router, `/metrics`) runs with `vllm:*` families registered in prometheus_client's
default REGISTRY exactly where vLLM's PrometheusStatLogger puts them (vLLM itself cannot be installed on
CPU CI); a real Prometheus scrapes it, and the test reads back the stored series names. prometheus_client
>= 0.23 rewrites ':' on its OpenMetrics path (client_python #1177); our `/metrics` serves the classic text
format, so the colon names are stored unchanged.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, need_binary, stop_process, wait_until

SERVER = textwrap.dedent(
    """
    import sys

    import prometheus_client as pc
    import uvicorn

    from app.api.app import create_app
    from app.api.backend import LocalBackend

    # registered the way vLLM 0.33's PrometheusStatLogger does: default REGISTRY, ':' in the name
    pc.Histogram("vllm:time_to_first_token_seconds", "TTFT", ["model_name", "engine"], buckets=(0.1, 1.0)) \\
        .labels("tiny", "0").observe(0.2)
    pc.Gauge("vllm:num_requests_running", "running", ["model_name", "engine"]).labels("tiny", "0").set(2)
    pc.Counter("vllm:prompt_tokens", "prompt tokens", ["model_name", "engine"]).labels("tiny", "0").inc(5)
    uvicorn.run(create_app(LocalBackend({})), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


def test_prometheus_stores_vllm_colon_names(tmp_path: Path) -> None:
    need_binary("prometheus")
    app_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 1s, scrape_timeout: 1s}}
        scrape_configs:
          - job_name: app
            static_configs: [{{targets: ["127.0.0.1:{app_port}"]}}]
        """))
    app = subprocess.Popen([sys.executable, "-c", SERVER, str(app_port)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{app_port}/metrics", timeout=2).status_code == 200,
                   60, 0.2, "the API process")
        served = httpx.get(f"http://127.0.0.1:{app_port}/metrics", timeout=5).text
        assert "vllm:num_requests_running{" in served

        def stored() -> set[str] | None:
            r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/label/__name__/values", timeout=2)
            names = {n for n in r.json()["data"] if n.startswith("vllm")}
            return names if "vllm:prompt_tokens_total" in names else None

        names = wait_until(stored, 60, 0.5, "Prometheus to store the vllm series")
        assert {"vllm:num_requests_running", "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count"} <= names
        assert not any(n.startswith("vllm_") for n in names), names  # no rewritten duplicates
        q = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                      params={"query": 'vllm:num_requests_running{model_name="tiny"}'}, timeout=5).json()
        assert [float(s["value"][1]) for s in q["data"]["result"]] == [2.0]
    finally:
        for proc in (prom, app):
            stop_process(proc, timeout=15)
