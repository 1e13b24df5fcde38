"""metrics.Endpoint: servers in one process share the registry without duplicated series,
stopping one takes its series away, and a taken port is a warning, never a crash."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest

from lmforge_server import metrics
from lmforge_server.redis_server import free_port


def _engine(*rows):
    return metrics.EngineCollector(lambda: list(rows))


def test_two_servers_in_one_process_report_each_model_once_and_leave_nothing_behind():
    a = metrics.serve_metrics("", _engine(("m1", 1, 2)))
    b = metrics.serve_metrics("", _engine(("m1", 9, 9), ("m2", 0, 3)))
    try:
        text = generate_latest().decode()
        assert text.count('lmforge_inference_batch_size{model="m1"}') == 1
        assert 'lmforge_inference_batch_size{model="m1"} 2.0' in text
        assert 'lmforge_inference_batch_size{model="m2"} 3.0' in text
    finally:
        a.close()
    assert 'lmforge_inference_batch_size{model="m1"} 9.0' in generate_latest().decode()
    b.close()
    assert "lmforge_inference_batch_size" not in generate_latest().decode()


def test_endpoint_serves_metrics_over_http_and_a_taken_port_only_warns(caplog):
    addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    first = metrics.serve_metrics(addr, _engine(("m3", 4, 1)))
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            assert 'lmforge_inference_queue_depth{model="m3"} 4.0' in resp.read().decode()
        second = metrics.serve_metrics(addr)
        assert second.port is None and "metrics not served on" in caplog.text
        second.close()
    finally:
        first.close()
