"""Emulated VMs for compose tests: network namespaces, one harness engine (`dockerd`) each, driven over RPC.

`ComposeVMs(work, names)` (a context manager; used by module-scoped fixtures) starts a controller under
`unshare --pid --fork --kill-child --mount-proc --net`: in that private PID and network namespace it builds a
bridge and one namespace per VM (tests/support/netns.py; addresses 10.77.X.N), starts the VM's engine inside it, and
serves requests from the test over a Unix socket: run a command on a VM (with the harness's `docker` first on
PATH, so `./deploy-ray.sh` drives the engine unchanged), crash a service, kill a whole VM, boot it again.
Ending the controller ends everything it started: no process, namespace or link outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(__file__).with_name("bin")
PY = sys.executable
NIC = "ens5"  # every VM's private NIC has this name (one DS_NET_IFNAME / NCCL_SOCKET_IFNAME fits all, as on a cloud)


def env_file(path: Path, **values: str) -> Path:
    """An operator's `.env`: the shipped .env.example with `values` filled in (set lines replaced, others appended)."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in values:
            lines.append(f"{key}={values.pop(key)}")
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def vm_env(state: Path, extra: dict[str, str] | None = None, runtimes: str | None = None) -> dict[str, str]:
    """Environment of a shell on an emulated VM: the harness's `docker` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_", "COMPOSE_VM_"))}
    env.update(PATH=f"{BIN}:{Path(PY).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               COMPOSE_VM_SOCK=str(state / "docker.sock"), COMPOSE_VM_PYTHON=PY, PYTHONPATH=str(ROOT),
               COMPOSE_VM_RUNTIMES=runtimes or '{"runc":{"path":"runc"}}', HOME=str(state / "home"))
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------- controller
class _Controller:
    def __init__(self, work: Path, names: list[str]):
        sys.path.insert(0, str(ROOT / "tests"))
        from tests.support.netns import NetnsVMs

        self.work = work
        self.names = names
        self.vms = NetnsVMs(len(names), prefix="cv", ifname=NIC)
        self.vms.__enter__()
        # state (engine socket, logs, named volumes, service roots) under the test's own folder: kept for diagnosis
        # with pytest's other temp folders, removed with them
        self.states = {n: work / n for n in names}
        self.engines: dict[str, subprocess.Popen[bytes]] = {}
        for n in names:
            (self.states[n] / "home").mkdir(parents=True, exist_ok=True)
            self.boot(n)

    def index(self, vm: str) -> int:
        return self.names.index(vm)

    def boot(self, vm: str) -> None:
        state = self.states[vm]
        sock = state / "docker.sock"
        sock.unlink(missing_ok=True)
        log = open(state / "engine.log", "ab")
        self.engines[vm] = subprocess.Popen(
            ["ip", "netns", "exec", self.vms.names[self.index(vm)], PY, "-m", "tests.composevm", "engine",
             str(state), vm], cwd=ROOT, env={**vm_env(state)}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.engines[vm].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"engine of {vm} did not start: {(state / 'engine.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill_vm(self, vm: str) -> int:
        """Power loss: SIGKILL every process in the VM, its engine included (tmpfs /tmp of services is gone)."""
        n = self.vms.kill_vm(self.index(vm))
        self.engines[vm].wait(30)
        return n

    def run(self, vm: str, argv: list[str], env: dict[str, str] | None, timeout: float,
            cwd: str | None) -> dict[str, Any]:
        state = self.states[vm]
        try:
            res = subprocess.run(["ip", "netns", "exec", self.vms.names[self.index(vm)], *argv],
                                 env=vm_env(state, env), cwd=cwd or ROOT, capture_output=True, text=True,
                                 timeout=timeout)
            return {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}
        except subprocess.TimeoutExpired as exc:
            return {"rc": 124, "stdout": (exc.stdout or b"").decode(errors="replace") if isinstance(
                exc.stdout, bytes) else (exc.stdout or ""), "stderr": f"timed out after {timeout}s"}

    def info(self) -> dict[str, Any]:
        return {"ips": dict(zip(self.names, self.vms.ips, strict=True)),
                "netns": dict(zip(self.names, self.vms.names, strict=True)),
                "states": {n: str(p) for n, p in self.states.items()}}

    def close(self) -> None:
        for n in self.names:
            self.kill_vm(n)
        self.vms.close()


def controller_main(work: str, sock_path: str, names: list[str]) -> None:
    ctl = _Controller(Path(work), names)
    done = threading.Event()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            try:
                op = req.pop("op")
                if op == "run":
                    out = ctl.run(req["vm"], req["argv"], req.get("env"), req.get("timeout", 600), req.get("cwd"))
                elif op == "kill_vm":
                    out = {"killed": ctl.kill_vm(req["vm"])}
                elif op == "boot":
                    ctl.boot(req["vm"])
                    out = {}
                elif op == "info":
                    out = ctl.info()
                elif op == "close":
                    done.set()
                    out = {}
                else:
                    raise ValueError(f"unknown op {op}")
                self.wfile.write((json.dumps({"ok": True, **out}) + "\n").encode())
            except Exception as exc:
                self.wfile.write((json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())

    server = socketserver.ThreadingUnixStreamServer(sock_path, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("controller ready", flush=True)
    try:
        done.wait()
    finally:
        ctl.close()


# ---------------------------------------------------------------------------------------------- test side
class ComposeVMs:
    """Client of the controller; `with ComposeVMs(tmp, ["head", "w1"]) as vms: vms.deploy("head", "all")`."""

    def __init__(self, work: Path, names: list[str]):
        self.work = work
        self.names = names
        self.sock = str(work / "controller.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ips: dict[str, str] = {}
        self.netns: dict[str, str] = {}
        self.states: dict[str, Path] = {}

    def __enter__(self) -> ComposeVMs:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "controller.log", "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", PY, "-m", "tests.composevm",
             "controller", str(self.work), self.sock, *self.names],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while not Path(self.sock).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"controller failed: {(self.work / 'controller.log').read_text()[-4000:]}")
            time.sleep(0.1)
        info = self._call({"op": "info"})
        self.ips, self.netns = info["ips"], info["netns"]
        self.states = {k: Path(v) for k, v in info["states"].items()}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._call({"op": "close"}, timeout=120)
                self.proc.wait(60)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def _call(self, msg: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall((json.dumps(msg) + "\n").encode())
            with s.makefile() as f:
                resp = json.loads(f.readline())
        if not resp.pop("ok"):
            raise RuntimeError(resp["error"])
        return resp

    def run(self, vm: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        out = self._call({"op": "run", "vm": vm, "argv": list(argv), "env": env, "timeout": timeout, "cwd": cwd},
                         timeout=timeout + 60)
        return subprocess.CompletedProcess(list(argv), out["rc"], out["stdout"], out["stderr"])

    def deploy(self, vm: str, *args: str, env_file: Path, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`./deploy-ray.sh --env-file VM.env ARGS` on the VM, exactly as an operator runs it."""
        return self.run(vm, str(ROOT / "deploy-ray.sh"), "--env-file", str(env_file), *args, timeout=timeout,
                        env=env)

    def engine(self, vm: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One request to the VM's engine (ps, crash, ...), sent from inside the VM."""
        code = ("import json,sys; from tests.composevm.dockercli import request; "
                "print(json.dumps(request(json.loads(sys.argv[1]), on_say=lambda t: None)))")
        res = self.run(vm, PY, "-c", code, json.dumps(msg), timeout=600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout)

    def ps(self, vm: str) -> dict[str, dict[str, Any]]:
        return {r["Service"]: r for r in self.engine(vm, {"op": "ps"})["ps"]}

    def crash(self, vm: str, service: str) -> int:
        return int(self.engine(vm, {"op": "crash", "service": service})["pid"])

    def kill_vm(self, vm: str) -> int:
        return int(self._call({"op": "kill_vm", "vm": vm})["killed"])

    def boot(self, vm: str) -> None:
        self._call({"op": "boot", "vm": vm})

    def log(self, vm: str, service: str) -> str:
        path = self.states[vm] / "logs" / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_health(self, vm: str, service: str, want: str = "healthy", timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.ps(vm).get(service, {})
            if last.get("Health") == want or (want == "running" and last.get("State") == "running"):
                return
            time.sleep(1)
        raise TimeoutError(f"{vm}/{service} not {want} within {timeout}s: {last}\n{self.log(vm, service)[-3000:]}")

    def python(self, vm: str, code: str, *args: str, timeout: float = 300) -> Any:
        """Run Python code on the VM (from this checkout's venv); its last stdout line is parsed as JSON."""
        res = self.run(vm, PY, "-c", code, *args, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"python on {vm} failed ({res.returncode}): {res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])
