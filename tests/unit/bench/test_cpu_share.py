"""bench/cpu_share.py: process roles from titles and command lines, and the share of a busy process."""

from __future__ import annotations

import os
import time

import pytest

from bench.cpu_share import CPUShare, role

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("cmdline", "expected"), [
    ("ray::ServeReplica:llm:tiny", "ray replica tiny"),
    ("ray::ServeReplica:llm:ingress", "ray replica ingress"),
    ("ray::ProxyActor", "ray proxy"),
    ("ray::ServeController", "ray serve controller"),
    ("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/r", "raylet"),
    ("/x/gcs_server --log_dir=/tmp", "ray gcs"),
    ("ray::IDLE", "ray worker (other)"),
    ("VLLM::EngineCore", "vllm engine core"),
    ("VLLM::Worker", "vllm worker"),
    ("/v/bin/python -m app serve --model /m --port 8000", "standalone server"),
    ("nginx: worker process", "nginx"),
    ("/usr/sbin/sshd -D", "other"),
])
def test_roles(cmdline: str, expected: str) -> None:
    assert role(cmdline, pid=-1) == expected


def test_this_process_is_the_load_generator_and_its_busy_time_is_counted() -> None:
    assert role("python -m bench.compare_layers", os.getpid()) == "load generator"
    with CPUShare() as share:
        end = time.process_time() + 0.3
        while time.process_time() < end:  # burn 0.3 s of CPU in this process
            pass
    got = share.result()
    assert 0.05 <= got["load generator"] <= 1.1, got  # one thread: at most one core (plus sampling slack)
