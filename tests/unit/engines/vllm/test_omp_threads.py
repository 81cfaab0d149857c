"""vLLM-CPU's OpenMP threading choice (`app.engines.vllm.omp_threads.choose`): order of the sources, and the cores."""

from __future__ import annotations

import os

import pytest

from app.engines.vllm import omp_threads
from app.engines.vllm.args import vllm_engine_args

pytestmark = pytest.mark.unit


def test_cores_minus_one_for_the_api_process_when_nothing_is_set() -> None:
    two = omp_threads.OMPThreads(1, "nobind", "2 usable core(s), 1 left for the API process")
    assert omp_threads.choose(None, {}, None, 2) == two
    assert omp_threads.choose(None, {}, None, 16).threads == 15
    assert omp_threads.choose(None, {}, None, 1).threads == 1


def test_explicit_settings_win_in_order() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    assert omp_threads.choose(6, env, 4.0, 16).threads == 6  # engine_kwargs.cpu_threads first
    auto = omp_threads.choose(None, {**env, omp_threads.BIND_ENV: "auto"}, None, 16)
    assert auto.threads is None and auto.bind == "auto" and "vLLM binds" in auto.describe() + auto.source
    assert omp_threads.choose(None, env, None, 16) == omp_threads.OMPThreads(3, "nobind", "OMP_NUM_THREADS")


def test_in_a_ray_replica_its_cpus_decide_unless_its_runtime_env_does() -> None:
    ray_set = {"OMP_NUM_THREADS": "1"}  # what Ray itself exports to a worker of num_cpus 1
    assert omp_threads.choose(None, ray_set, 6.0, 16).threads == 6
    assert omp_threads.choose(None, ray_set, 0.5, 16).threads == 1
    assert omp_threads.choose(None, ray_set, 6.0, 16, {"OMP_NUM_THREADS": "4"}).threads == 4


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        omp_threads.choose(None, {"OMP_NUM_THREADS": value}, None, 4)
    with pytest.raises(ValueError, match="cpu_threads"):
        vllm_engine_args({"cpu_threads": 0})
    assert "cpu_threads" not in vllm_engine_args({"cpu_threads": 2, "max_num_seqs": 4})


def test_usable_cores_are_the_affinity_at_most() -> None:
    assert 1 <= omp_threads.usable_cores() <= len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_the_cores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    own = open("/proc/self/cgroup").read().strip().splitlines()[0].split(":", 2)[2].lstrip("/")
    (tmp_path / own).mkdir(parents=True, exist_ok=True)
    (tmp_path / own / "cpu.max").write_text("150000 100000\n")
    assert omp_threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / own / "cpu.max").write_text("max 100000\n")
    assert omp_threads.cgroup_cpu_limit(tmp_path) is None
