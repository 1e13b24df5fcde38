"""`lmforge up`: one command starts Redis, the API server, the inference server and a worker;
Ctrl-C stops all of them with nothing left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from lmforge.v1 import training_pb2, training_pb2_grpc
from lmforge_server.stack import wait_serving


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.fault
def test_up_prints_addresses_serves_restarts_a_crashed_part_and_stops_on_ctrl_c(tmp_path):
    lmforge = Path(sys.executable).parent / "lmforge"
    env = {**os.environ, "LMFORGE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [str(lmforge), "up", "--data-dir", str(tmp_path), "--api-addr", "127.0.0.1:0",
         "--inference-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "lmforge up exited early:\n" + "".join(lines)
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        api = re.search(r"api\s+(\S+)", out).group(1)
        inference = re.search(r"inference\s+(\S+)", out).group(1)
        assert re.search(r"redis\s+redis://127\.0\.0\.1:\d+", out)
        wait_serving(api, timeout=10)
        wait_serving(inference, timeout=10)
        console = re.search(r"console\s+(http://\S+)", out).group(1)
        with urllib.request.urlopen(console, timeout=10) as resp:
            assert b"<title>lmforge</title>" in resp.read()
        with grpc.insecure_channel(api) as channel:
            stub = training_pb2_grpc.JobServiceStub(channel)
            assert stub.ListJobs(training_pb2.ListJobsRequest()).jobs == []
        children = _descendants(proc.pid)
        assert len(children) >= 4  # redis, api, inference, worker
        aof = [tmp_path / "redis" / "appendonlydir", tmp_path / "redis" / "appendonly.aof"]
        assert any(p.exists() for p in aof)  # AOF on

        # A part that crashes is started again, on the same address.
        crashed = next(c for c in children if "inference" in c.cmdline())
        crashed.kill()
        while "inference exited; restarting it" not in "".join(lines):
            line = proc.stdout.readline()
            assert line, "lmforge up exited:\n" + "".join(lines)
            lines.append(line)
        wait_serving(inference, timeout=60)
        restarted = [c for c in _descendants(proc.pid) if "inference" in c.cmdline()]
        assert len(restarted) == 1 and restarted[0].pid != crashed.pid
        children = _descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
