"""The per-VM "Docker engine" of the harness: runs compose services as processes, as Docker would.

One `Engine` per emulated VM runs inside that VM's network namespace (so `network_mode: host` means exactly that
namespace). For each service of a rendered compose model it starts `unshare --mount --pid --fork --mount-proc
python launch.py SPEC` (see launch.py), logs its output, runs `healthcheck.test` the way Docker does (probes every
`start_interval` (5 s) during `start_period`, then every `interval`; `retries` failures after the start period
make it unhealthy; `timeout` per probe), applies `restart` policies with Docker's back-off (100 ms doubling to
1 min, reset after 10 s of running) and, on `up`, honours `depends_on` conditions. State (the models of started
containers, which ones an operator stopped) and named volumes live under the VM's state folder, so a restarted
engine (a rebooted VM) starts again what Docker would: containers with restart `always`/`unless-stopped` that
were not stopped by hand. Services whose image has no stand-in are recorded as not executed, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.composevm.images import ImageSpec, image_spec, interpreter_mounts, passwd_lines

LAUNCH = str(Path(__file__).with_name("launch.py"))
_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value: Any, default: float) -> float:
    """Compose durations ('1m30s', '15s', '500ms') to seconds."""
    if value in (None, ""):
        return default
    if isinstance(value, int | float):
        return float(value) / 1e9 if value > 1e6 else float(value)  # the JSON model may give nanoseconds
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ns|us|ms|s|m|h)", str(value)):
        total += float(num) * _UNITS[unit]
    return total


def size_bytes(value: Any) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)\s*([kmgb]?)b?", str(value).lower())
    if not m:
        raise ValueError(f"bad size {value!r}")
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def unescape(value: Any) -> Any:
    """`config` output keeps compose's `$$` escapes (it is itself a compose file); containers get `$`."""
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [unescape(v) for v in value]
    if isinstance(value, dict):
        return {k: unescape(v) for k, v in value.items()}
    return value


def config_hash(service: dict) -> str:
    return hashlib.sha256(json.dumps(service, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Container:
    name: str
    config: dict
    project: str
    image: ImageSpec
    hash: str
    proc: subprocess.Popen[bytes] | None = None
    state: str = "created"  # created | running | exited | not-executed
    health: str = ""  # "" (no healthcheck) | starting | healthy | unhealthy
    exit_code: int | None = None
    manually_stopped: bool = False
    started_at: float = 0.0
    restarts: int = 0
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def container_name(self) -> str:
        return f"{self.project}-{self.name}-1"

    def init_pid(self, timeout: float = 10.0) -> int | None:
        """Host PID of the service's PID 1 (the child of `unshare --fork`)."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                return None
            if kids:
                return int(kids[0])
            time.sleep(0.02)
        return None

    def status_text(self) -> str:
        if self.state == "not-executed":
            return f"not executed: {self.image.reason}"
        if self.state == "running":
            up = f"Up {time.monotonic() - self.started_at:.0f} seconds"
            return f"{up} ({self.health})" if self.health else up
        if self.state == "exited":
            return f"Exited ({self.exit_code})"
        return self.state


class UpError(RuntimeError):
    pass


class Engine:
    def __init__(self, state_dir: Path, vm_name: str):
        self.dir = state_dir
        self.vm = vm_name
        self.logs = state_dir / "logs"
        self.volumes = state_dir / "volumes"
        self.roots = state_dir / "roots"
        for d in (self.logs, self.volumes, self.roots):
            d.mkdir(parents=True, exist_ok=True)
        self.containers: dict[str, Container] = {}
        self.lock = threading.RLock()
        self.stopping = False

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        data = {name: {"config": c.config, "project": c.project, "manually_stopped": c.manually_stopped,
                       "state": c.state} for name, c in self.containers.items()}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / "state.json")

    def boot(self) -> list[str]:
        """Engine start (VM boot): restart what Docker restarts; returns the services started."""
        path = self.dir / "state.json"
        if not path.exists():
            return []
        started = []
        for name, rec in json.loads(path.read_text()).items():
            c = self._container(name, rec["config"], rec["project"])
            c.manually_stopped = rec["manually_stopped"]
            c.state = "not-executed" if rec["state"] == "not-executed" else "exited"
            self.containers[name] = c
            policy = str(rec["config"].get("restart", "no"))
            if c.state == "exited" and not c.manually_stopped and policy in ("always", "unless-stopped"):
                self._start(c)
                started.append(name)
        self._save()
        return started

    # ------------------------------------------------------------------ containers
    def _container(self, name: str, config: dict, project: str) -> Container:
        return Container(name=name, config=config, project=project, image=image_spec(config),
                         hash=config_hash(config))

    def _volume_dir(self, project: str, source: str, image: ImageSpec, target: str) -> str:
        path = self.volumes / f"{project}_{source}"
        if not path.exists():
            path.mkdir(parents=True)
            owner = image.path_owners.get(target)
            if owner is not None:  # Docker copies the image folder (and its owner) into a new volume
                os.chown(path, owner, owner)
        return str(path)

    def _spec(self, c: Container) -> dict:
        cfg, img = c.config, c.image
        uid, gid, home, _ = img.resolve_user(cfg.get("user"))
        argv = list(cfg.get("entrypoint") or []) + list(cfg.get("command") or [])
        if not argv:
            raise UpError(f"{c.name}: no command (the harness does not know the image's default)")
        argv[0] = img.binaries.get(argv[0], argv[0])
        env = {**img.env, "HOME": home, **{k: "" if v is None else str(v)
                                           for k, v in (cfg.get("environment") or {}).items()}}
        mounts, dirs = [], {}
        for v in cfg.get("volumes") or []:
            if v["type"] == "bind":
                src = v["source"]
                if not os.path.exists(src):  # Docker creates a missing bind source as root-owned folder
                    os.makedirs(src, exist_ok=True)
                mounts.append({"source": src, "target": v["target"], "read_only": bool(v.get("read_only"))})
            elif v["type"] == "volume":
                src = self._volume_dir(c.project, v["source"], img, v["target"])
                mounts.append({"source": src, "target": v["target"], "read_only": bool(v.get("read_only"))})
            else:
                raise UpError(f"{c.name}: volume type {v['type']!r} is not emulated")
        if img.repo_at:
            mounts.insert(0, {"source": str(Path(cfg["build"]["context"])), "target": img.repo_at,
                              "read_only": False})
            mounts += interpreter_mounts()
        if home not in ("/", "/root"):
            dirs[home] = uid
        # root's home is the image's own (empty), not this machine's: what a service writes there (ssh's
        # known_hosts, caches) stays in the container, as in Docker
        private = {"/root": 0o700} if home == "/root" and img.repo_at else {}
        files = {}
        if img.users:
            files["/etc/passwd"], files["/etc/group"] = passwd_lines(img)
        tmpfs = ["/tmp", *[t.split(":")[0] for t in (cfg.get("tmpfs") or [])]]
        shm = None if cfg.get("ipc") == "host" else size_bytes(cfg.get("shm_size") or "64m")
        return {"root": str(self.roots / c.name), "argv": argv, "env": env, "uid": uid, "gid": gid, "home": home,
                "workdir": cfg.get("working_dir") or img.workdir, "mounts": mounts, "dirs": dirs, "files": files,
                "tmpfs": tmpfs, "private": private, "shm_bytes": shm}

    def _start(self, c: Container) -> None:
        if not c.image.runs:
            c.state = "not-executed"
            return
        spec = self._spec(c)
        spec_path = self.dir / f"{c.name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(self.logs / f"{c.name}.log", "ab")
        c.generation += 1
        c.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, LAUNCH,
             str(spec_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        c.state, c.exit_code, c.started_at = "running", None, time.monotonic()
        c.health = "starting" if self._healthcheck(c) else ""
        gen = c.generation
        threading.Thread(target=self._watch, args=(c, gen), daemon=True).start()
        if c.health:
            threading.Thread(target=self._health_loop, args=(c, gen), daemon=True).start()

    def _healthcheck(self, c: Container) -> dict | None:
        hc = c.config.get("healthcheck")
        if not hc or hc.get("disable") or (hc.get("test") or ["NONE"])[0] == "NONE":
            return None
        return hc

    def _watch(self, c: Container, gen: int) -> None:
        assert c.proc is not None
        rc = c.proc.wait()
        with self.lock:
            if c.generation != gen:
                return
            c.state, c.exit_code = "exited", rc
            ran = time.monotonic() - c.started_at
            self._save()
            policy = str(c.config.get("restart", "no"))
            again = (not c.manually_stopped and not self.stopping and
                     (policy in ("always", "unless-stopped") or (policy.startswith("on-failure") and rc != 0)))
            if not again:
                return
            c.restarts = 0 if ran >= 10 else c.restarts + 1
            delay = min(0.1 * 2 ** c.restarts, 60.0)
        time.sleep(delay)
        with self.lock:
            if c.generation == gen and not c.manually_stopped and not self.stopping and c.state == "exited":
                self._start(c)

    def probe(self, c: Container, argv: list[str], timeout: float) -> int:
        pid = c.init_pid()
        if pid is None:
            return 1
        spec = self._spec(c)
        cmd = ["nsenter", "-t", str(pid), "-m", "-p", "-r", "-w", "-S", str(spec["uid"]), "-G", str(spec["gid"]),
               *argv]
        try:
            return subprocess.run(cmd, env=spec["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=timeout, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            return 124

    def _health_loop(self, c: Container, gen: int) -> None:
        hc = self._healthcheck(c) or {}
        test = list(hc["test"])
        argv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", " ".join(test[1:])]
        interval = duration(hc.get("interval"), 30)
        timeout = duration(hc.get("timeout"), 30)
        start_period = duration(hc.get("start_period"), 0)
        start_interval = duration(hc.get("start_interval"), 5)
        retries = int(hc.get("retries") or 3)
        failures = 0
        while True:
            in_start = time.monotonic() - c.started_at < start_period
            time.sleep(start_interval if in_start else interval)
            if c.generation != gen or c.state != "running":
                return
            in_start = time.monotonic() - c.started_at < start_period
            ok = self.probe(c, argv, timeout) == 0
            if c.generation != gen:
                return
            if ok:
                c.health, failures = "healthy", 0
            elif not in_start:
                failures += 1
                if failures >= retries:
                    c.health = "unhealthy"

    def _stop(self, c: Container, manual: bool = True) -> None:
        with self.lock:
            c.manually_stopped = manual or c.manually_stopped
            proc = c.proc
            c.generation += 1  # the watcher of this run must not restart it
        if proc is None or proc.poll() is not None:
            if c.state == "running":
                c.state = "exited"
            return
        grace = duration(c.config.get("stop_grace_period"), 10)
        sig = getattr(signal, str(c.config.get("stop_signal") or "SIGTERM"))
        pid = c.init_pid(timeout=1)
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(30)
        c.state, c.exit_code = "exited", proc.returncode

    def crash(self, name: str) -> int:
        """SIGKILL the service's processes from outside (a crash, not `docker stop`): the restart policy applies."""
        c = self.containers[name]
        pid = c.init_pid(timeout=1)
        if pid is None:
            raise UpError(f"{name} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    # ------------------------------------------------------------------ compose operations
    def up(self, model: dict, targets: list[str], say: Callable[[str], None], force: bool = False) -> None:
        project = model["name"]
        services = unescape(model["services"])
        wanted = list(targets or services)
        order: list[str] = []

        def visit(name: str, trail: tuple[str, ...] = ()) -> None:
            if name in order:
                return
            if name not in services:
                raise UpError(f"no such service: {name}")
            if name in trail:
                raise UpError(f"dependency cycle through {name}")
            for dep, cond in (services[name].get("depends_on") or {}).items():
                if dep in services or cond.get("required", True):
                    visit(dep, (*trail, name))
            order.append(name)

        for name in wanted:
            visit(name)
        for name in order:
            cfg = services[name]
            for dep, cond in (cfg.get("depends_on") or {}).items():
                if dep in services or cond.get("required", True):
                    self._wait_condition(dep, cond.get("condition", "service_started"), name)
            with self.lock:
                old = self.containers.get(name)
                h = config_hash(cfg)
                if old is not None and old.hash == h and old.state == "running" and not force:
                    say(f" Container {old.container_name}  Running")
                    continue
                if old is not None:
                    if old.state == "running":
                        self._stop(old)
                        say(f" Container {old.container_name}  Recreate" if old.hash != h else
                            f" Container {old.container_name}  Restart")
                c = old if old is not None and old.hash == h else self._container(name, cfg, project)
                c.manually_stopped = False
                self.containers[name] = c
                self._start(c)
                self._save()
            if c.state == "not-executed":
                say(f" Container {c.container_name}  NOT EXECUTED: {c.image.reason}")
            else:
                say(f" Container {c.container_name}  Started")

    def _wait_condition(self, dep: str, condition: str, for_service: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.containers.get(dep)
            if c is not None:
                if c.state == "not-executed":
                    raise UpError(f"{for_service} depends on {dep}, which the harness does not execute")
                if condition == "service_started" and c.state in ("running", "exited"):
                    return
                if condition == "service_healthy":
                    if c.health == "healthy":
                        return
                    if c.health == "unhealthy" or c.state == "exited":
                        raise UpError(f"dependency failed to start: container {c.container_name} is "
                                      f"{'unhealthy' if c.health == 'unhealthy' else 'exited'}")
                if condition == "service_completed_successfully" and c.state == "exited":
                    if c.exit_code == 0:
                        return
                    raise UpError(f"service {dep!r} didn't complete successfully: exit {c.exit_code}")
            time.sleep(0.2)
        raise UpError(f"timed out waiting for {dep} ({condition})")

    def down(self, say: Callable[[str], None]) -> None:
        with self.lock:
            names = list(self.containers)
        for name in reversed(names):
            c = self.containers[name]
            self._stop(c)
            say(f" Container {c.container_name}  Removed")
            with self.lock:
                self.containers.pop(name, None)
                self._save()

    def stop(self, names: list[str], say: Callable[[str], None]) -> None:
        for name in names or list(self.containers):
            c = self.containers[name]
            self._stop(c)
            self._save()
            say(f" Container {c.container_name}  Stopped")

    def restart(self, names: list[str], say: Callable[[str], None]) -> None:
        for name in names or list(self.containers):
            c = self.containers[name]
            self._stop(c)
            c.manually_stopped = False
            self._start(c)
            self._save()
            say(f" Container {c.container_name}  Started")

    def ps(self) -> list[dict[str, Any]]:
        return [{"Name": c.container_name, "Service": n, "State": c.state, "Health": c.health,
                 "ExitCode": c.exit_code, "Status": c.status_text(), "Image": c.config.get("image", ""),
                 "Pid": c.init_pid(timeout=0.5) if c.state == "running" else None}
                for n, c in sorted(self.containers.items())]

    def exec_spec(self, name: str) -> dict[str, Any]:
        c = self.containers.get(name)
        if c is None or c.state != "running":
            raise UpError(f"service {name!r} is not running")
        spec = self._spec(c)
        return {"pid": c.init_pid(), "uid": spec["uid"], "gid": spec["gid"], "env": spec["env"]}

    def shutdown(self) -> None:
        self.stopping = True
        for c in list(self.containers.values()):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
