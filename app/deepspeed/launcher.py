"""`python -m app deepspeed launch`: start the tensor-parallel group with `deepspeed --launcher pdsh`.

Runs on the first VM of DS_HOSTS (rank 0's VM). Steps:
1. write the hostfile (`ip slots=N` per VM) and `.deepspeed_env` (the launcher forwards
   only a few variables to remote ranks: the NIC for gloo/NCCL, PATH, HF_HUB_OFFLINE,
   TORCH_EXTENSIONS_DIR and every DS_* setting go through that file);
2. check passwordless ssh to every VM (clear error naming the host and the fix);
3. run `deepspeed --hostfile F --launcher pdsh --master_addr HOST0 --master_port P
   --module app deepspeed serve` in its own process group;
4. supervise it: rank 0 must be ready within DS_LAUNCH_DEADLINE_S; once the group dies
   (rank 0 stops answering) the rest gets DS_EXIT_GRACE_S to exit, then the launcher
   kills it. The launcher always exits non-zero when the group died, so a supervisor
   (compose restart policy) starts a fresh group; a single rank cannot rejoin.

Every VM needs the same venv/image path (`sys.executable`), working directory and
model path: pdsh runs `cd <cwd>; <python> -u -m deepspeed.launcher.launch ...` there.
With containers, each VM runs `python -m app deepspeed sshd` in the rank image so that
pdsh's ssh lands inside that image (ranks inherit the ssh session's environment, not
the container's: settings reach them through `.deepspeed_env` and `.env` in the cwd).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.deepspeed.config import DSSettings, Host

log = logging.getLogger(__name__)

# settings that never travel on the pdsh command line (visible in `ps` on every VM)
_SECRET_FIELDS = {"api_keys"}


class LaunchError(Exception):
    """A preflight problem, with the fix in the message."""


@dataclass
class LaunchFiles:
    hostfile: Path
    env_file: Path
    command: list[str]
    env: dict[str, str]


def hostfile_text(hosts: list[Host]) -> str:
    return "".join(f"{h.addr} slots={h.slots}\n" for h in hosts)


def remote_env(settings: DSSettings, environ: dict[str, str]) -> dict[str, str]:
    """What `.deepspeed_env` exports on every VM before each rank starts."""
    env: dict[str, str] = {}
    if settings.net_ifname:
        # gloo binds 127.0.0.1 (and peers hang) unless told which NIC carries the private network
        env["GLOO_SOCKET_IFNAME"] = settings.net_ifname
        env["NCCL_SOCKET_IFNAME"] = settings.net_ifname
    env["HF_HUB_OFFLINE"] = environ.get("HF_HUB_OFFLINE", "1")
    env["TRANSFORMERS_OFFLINE"] = environ.get("TRANSFORMERS_OFFLINE", env["HF_HUB_OFFLINE"])
    # the same PATH (and ninja) and extension dir everywhere, or DeepSpeed recompiles its ops per host
    env["PATH"] = environ.get("PATH", os.defpath)
    ext = settings.torch_extensions_dir or environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions")
    env["TORCH_EXTENSIONS_DIR"] = ext
    for key in ("HF_HOME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS"):
        if environ.get(key):
            env[key] = environ[key]
    for name, value in settings.model_dump().items():
        if name in _SECRET_FIELDS or name == "run_dir" or value is None or value == "":
            continue
        env[f"DS_{name.upper()}"] = str(value)
    for key, value in env.items():
        if "\n" in value or '"' in value:
            raise LaunchError(f"{key} contains a newline or a double quote, which .deepspeed_env cannot carry")
    return env


def env_file_text(env: dict[str, str]) -> str:
    # DeepSpeed reads KEY=VALUE lines and quotes values itself when they need it
    return "".join(f"{k}={v}\n" for k, v in env.items())


def ssh_options(settings: DSSettings) -> list[str]:
    """ssh options shared by the pre-check and pdsh (the port goes to DeepSpeed's --ssh_port)."""
    # accept-new: a VM's first host key is trusted (private network), a changed one is still refused
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new"]
    if settings.ssh_key:
        opts += ["-i", settings.ssh_key]
    return opts


def ssh_base(settings: DSSettings) -> list[str]:
    port = ["-p", str(settings.ssh_port)] if settings.ssh_port else []
    return ["ssh", *ssh_options(settings), *port]


def check_ssh(settings: DSSettings, timeout_s: float = 20.0) -> None:
    """Passwordless ssh to every VM (pdsh needs it, including to the launcher's own VM)."""
    if shutil.which("ssh") is None:
        raise LaunchError("`ssh` is not installed (apt-get install openssh-client)")
    if shutil.which("pdsh") is None:
        raise LaunchError("`pdsh` is not installed on the launcher VM (apt-get install pdsh)")
    failures: list[str] = []
    for host in settings.host_list:
        cmd = [*ssh_base(settings), host.addr, "true"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            failures.append(f"{host.addr}: no answer within {timeout_s:.0f}s (VM down or firewalled?)")
            continue
        if res.returncode != 0:
            detail = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            failures.append(f"{host.addr}: {detail}")
    if failures:
        raise LaunchError(
            "passwordless ssh failed for " + "; ".join(failures)
            + ". Every VM in DS_HOSTS (this one too) must accept `ssh <ip> true` from this VM without a "
            "password: install the public key of DS_SSH_KEY in ~/.ssh/authorized_keys there and add the "
            "host keys to known_hosts."
        )


def deepspeed_command(settings: DSSettings, hostfile: Path) -> list[str]:
    """The DeepSpeed launcher in its module form (`--module app deepspeed serve`)."""
    exe = Path(sys.executable).parent / "deepspeed"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [
        *base,
        "--hostfile", str(hostfile),
        "--launcher", "pdsh",
        "--master_addr", settings.host_list[0].addr,
        "--master_port", str(settings.master_port),
        "--no_ssh_check",  # our own check above names the host and the fix
        "--no_local_rank",  # ranks read LOCAL_RANK from the environment; `--local_rank=N` would break the CLI
    ]
    if settings.ssh_port:
        cmd += ["--ssh_port", str(settings.ssh_port)]
    return [*cmd, "--module", "app", "deepspeed", "serve"]


def prepare(settings: DSSettings, run_dir: Path, environ: dict[str, str] | None = None) -> LaunchFiles:
    """Write the hostfile and `.deepspeed_env`; return the command and its environment."""
    environ = dict(os.environ if environ is None else environ)
    hosts = settings.host_list
    if not settings.model:
        raise LaunchError("DS_MODEL is empty: set it to the model folder (the same path on every VM)")
    if len(hosts) > 1 and not settings.net_ifname:
        raise LaunchError("DS_NET_IFNAME is empty: name the private NIC (e.g. ens5), or gloo binds 127.0.0.1 "
                          "and the ranks on other VMs hang")
    run_dir.mkdir(parents=True, exist_ok=True)
    hostfile = run_dir / "hostfile"
    hostfile.write_text(hostfile_text(hosts))
    env_file = run_dir / ".deepspeed_env"
    env_file.write_text(env_file_text(remote_env(settings, environ)))
    env_file.chmod(0o600)
    env = dict(environ)
    env["DS_ENV_FILE"] = str(env_file.resolve())  # read by DeepSpeed's runner instead of ./.deepspeed_env
    ssh_args = " ".join(shlex.quote(a) for a in ssh_options(settings))
    env["PDSH_SSH_ARGS_APPEND"] = (environ.get("PDSH_SSH_ARGS_APPEND", "") + " " + ssh_args).strip()
    return LaunchFiles(hostfile, env_file, deepspeed_command(settings, hostfile.resolve()), env)


def run_dir(settings: DSSettings) -> Path:
    return Path(settings.run_dir) if settings.run_dir else Path(tempfile.gettempdir()) / "llmkit-deepspeed"


def _probe_url(settings: DSSettings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.port}/readyz"


def _ready(url: str) -> bool | None:
    """True ready, False answering but not ready, None unreachable."""
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return None


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the DeepSpeed runner (it pkills its ranks on every VM via pdsh), then SIGKILL what is left here."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("DeepSpeed runner did not stop in %.0fs: killing its process group", grace_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner's session: pdsh, local ssh, local ranks
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


def supervise(settings: DSSettings, files: LaunchFiles, poll_s: float = 0.5) -> int:
    """Run the group; return its exit code (non-zero whenever it died or missed the deadline)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one probe per poll_s: keep the log readable
    log.info("launching: %s", " ".join(shlex.quote(c) for c in files.command))
    proc = subprocess.Popen(files.command, env=files.env, start_new_session=True)
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    url = _probe_url(settings)
    start = time.monotonic()
    ready_at: float | None = None
    dying_since: float | None = None
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                if dying_since is not None or ready_at is None:
                    rc = rc or 1  # the group died: never report success
                log.info("DeepSpeed launcher exited with %s", rc)
                return rc
            if stop_requested:
                log.info("signal %s: stopping the group", stop_requested[0])
                _stop_group(proc, grace_s=settings.exit_grace_s)
                return 128 + stop_requested[0]
            now = time.monotonic()
            state = _ready(url)
            if ready_at is None:
                if state:
                    ready_at = now
                    log.info("rank 0 ready after %.1fs: curl %s", now - start, url.replace("/readyz", "/v1/models"))
                elif now - start > settings.launch_deadline_s:
                    log.error("rank 0 not ready within DS_LAUNCH_DEADLINE_S=%.0fs: stopping the group",
                              settings.launch_deadline_s)
                    _stop_group(proc)
                    return 3
            elif not state and dying_since is None:
                dying_since = now
                log.error("rank 0 stopped being ready: the group is going down")
            elif state and dying_since is not None:
                dying_since = None  # a missed probe, not a death
            if dying_since is not None and now - dying_since > settings.exit_grace_s + settings.dead_linger_s:
                log.error("group did not exit within %.0fs of rank 0's failure (hung VM?): killing it",
                          settings.exit_grace_s + settings.dead_linger_s)
                _stop_group(proc, grace_s=5.0)
                return 1
            time.sleep(poll_s)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def sshd_config_text(listen: str, port: int, host_key: Path, authorized_keys: Path, pid_file: Path) -> str:
    """A private sshd config for the rank containers: key-only root login on the private address."""
    return (
        f"ListenAddress {listen}\nPort {port}\nHostKey {host_key}\nPidFile {pid_file}\n"
        f"AuthorizedKeysFile {authorized_keys}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\nX11Forwarding no\n"
        "AllowTcpForwarding no\nMaxStartups 50\n"
    )


def prepare_sshd(listen: str, port: int, authorized_keys: Path, state_dir: Path,
                 host_key: Path | None = None) -> list[str]:
    """Write the sshd config (generating a host key if none is given); return the sshd command."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None:
        raise LaunchError("sshd is not installed (apt-get install openssh-server)")
    if not authorized_keys.is_file():
        raise LaunchError(f"authorized keys file {authorized_keys} does not exist: mount the launcher's public key")
    state_dir.mkdir(parents=True, exist_ok=True)
    if host_key is None:
        host_key = state_dir / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True,
                           capture_output=True, timeout=60)
    cfg = state_dir / "sshd_config"
    cfg.write_text(sshd_config_text(listen, port, host_key.resolve(), authorized_keys.resolve(),
                                    (state_dir / "sshd.pid").resolve()))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise LaunchError(f"sshd rejects {cfg}: {check.stderr.strip()}")
    return [sshd, "-D", "-e", "-f", str(cfg)]
