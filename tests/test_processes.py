"""Process hygiene: a redis-server of ours dies with its parent, and ports picked free that
someone takes before we bind them are picked again (Redis, the stack's servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import make_settings

from lmforge_server.redis_server import RedisServer
from lmforge_server.stack import Stack


@pytest.mark.fault
def test_redis_server_dies_when_the_process_that_started_it_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from lmforge_server.redis_server import RedisServer
        server = RedisServer({str(tmp_path / "redis")!r}).start()
        print(server.process.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        redis = psutil.Process(pid)
        assert "redis-server" in redis.name()
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        redis.wait(timeout=30)  # raises TimeoutExpired if it outlives its parent
        assert not psutil.pid_exists(pid) or redis.status() == psutil.STATUS_ZOMBIE
    finally:
        parent.kill()


def _taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_redis_picks_another_port_when_the_one_it_picked_is_taken(tmp_path):
    with _taken_port() as taken:
        server = RedisServer(tmp_path / "redis", appendonly=False)
        server.port = taken.getsockname()[1]  # as if someone took it after we picked it
        with server:
            assert server.port != taken.getsockname()[1]
            import redis

            assert redis.Redis.from_url(server.url).ping()
    with _taken_port() as taken:
        chosen = RedisServer(tmp_path / "redis2", port=taken.getsockname()[1], appendonly=False)
        with pytest.raises(RuntimeError, match="could not bind port"):
            chosen.start()  # a port the caller chose is never swapped behind its back


@pytest.mark.slow  # starts the stack twice
def test_stack_servers_pick_other_ports_when_theirs_are_taken(tmp_path):
    import grpc
    from conftest import Api

    with _taken_port() as api_port, _taken_port() as inf_port:
        taken = {f"127.0.0.1:{s.getsockname()[1]}" for s in (api_port, inf_port)}
        stack = Stack(make_settings(tmp_path), worker=False)
        stack.settings.api_addr, stack.settings.inference_addr = sorted(taken)
        with stack:
            assert stack.api_addr not in taken and stack.inference_addr not in taken
            with grpc.insecure_channel(stack.api_addr) as channel:
                assert Api(channel).upload(b"port test\n").size_bytes == 10


def test_a_spinning_worker_gives_its_cores_back_once_it_is_idle(tmp_path):
    # The worker's own OpenMP environment, in a fresh process (libgomp reads it when torch
    # loads): two threads work, then the process idles and its CPU time is read.
    from lmforge_worker.app import openmp_env

    script = textwrap.dedent(
        """
        import time, torch
        torch.set_num_threads(2)
        x, w = torch.randn(768, 384), torch.randn(384, 384)
        for _ in range(200):
            (x @ w).relu_()
        c0 = time.process_time()
        time.sleep(2.0)
        print(time.process_time() - c0)
        """
    )
    spinning = openmp_env(make_settings(tmp_path, train_spin=True))
    assert spinning["OMP_WAIT_POLICY"] == "ACTIVE"
    assert openmp_env(make_settings(tmp_path, train_spin=False)) == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", script], env={**env, **spinning}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # Unbounded ACTIVE spins one thread through the whole idle window (2.0 s of CPU).
    idle_cpu_s = float(out.stdout.split()[-1])
    assert idle_cpu_s < 1.0, f"{idle_cpu_s:.2f} s of CPU while idle for 2 s"


def test_an_idle_inference_session_gives_its_cores_back(tmp_path):
    # Spinning ORT threads (inference_spin) park when a run returns: measured on the
    # threads the session started, over an idle window after a few runs.
    import numpy as np
    from _tiny_models import build_model_dir

    from lmforge_server.inference.session import CPU_EP, OrtModel

    path = build_model_dir(tmp_path / "m", d_model=128, n_heads=4, n_kv_heads=4, n_layers=4)
    me = psutil.Process()
    before = {t.id for t in me.threads()}
    model = OrtModel(path, providers=[CPU_EP], spin=True, threads=2)
    cache = model.new_cache(4)
    ids = np.ones((4, 32), np.int64)
    for _ in range(3):
        model.prefill(cache, ids, [31] * 4)

    def pool_cpu_s() -> float:
        return sum(t.user_time + t.system_time for t in me.threads() if t.id not in before)

    assert any(t.id not in before for t in me.threads()), "the session started no threads"
    idle_s = 0.0
    for _ in range(5):  # CPU times come in 10 ms ticks: several windows of 0.1 s
        model.prefill(cache, ids, [31] * 4)
        start = pool_cpu_s()
        time.sleep(0.1)
        idle_s += pool_cpu_s() - start
    # Without session.force_spinning_stop each run left ~40 ms of a core spinning.
    assert idle_s < 0.05, f"the session's threads spent {idle_s * 1e3:.0f} ms of CPU while idle"
