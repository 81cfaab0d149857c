"""The helpers test suites share, imported one way (`from tests.support.X import ...`) and only by tests:
the skip policy and paths (`env`), real server processes (`servers`), network namespaces (`netns`), the
DeepSpeed two-VM harness (`ds_cluster`), vLLM-CPU helpers (`vllm_cpu`), nginx and Prometheus processes
(`front_door`, `prometheus`), dashboards, MCP sessions, OpenAI error assertions and the unit layer's
fake-engine app (`fakes`)."""
