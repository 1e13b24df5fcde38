"""Every /metrics endpoint, scraped after real traffic: the counters moved."""

from __future__ import annotations

import json
import urllib.request

from .conftest import AUTH, scrape


def _get(url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=AUTH), timeout=30) as resp:
        return json.loads(resp.read())


def _sum(samples: dict[str, float], prefix: str, *parts: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix) and all(p in k for p in parts))


def test_metrics_move_with_traffic_on_every_server(gateway_stack, base_url, trained_model):
    s = gateway_stack.settings
    api0, inf0 = scrape(s.api_metrics_addr), scrape(s.inference_metrics_addr)
    http0 = scrape(s.http_addr)

    body = json.dumps({"model": trained_model, "prompt": "ROMEO:\n", "max_tokens": 10,
                       "stream": True, "temperature": 0}).encode()  # fmt: skip
    req = urllib.request.Request(
        f"{base_url}/v1/completions", data=body, method="POST", headers=AUTH
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert b"[DONE]" in resp.read()
    _get(f"{base_url}/api/jobs")
    try:
        _get(f"{base_url}/api/jobs/job_nope")
    except urllib.error.HTTPError as e:
        assert e.code == 404

    api1, inf1, http1 = (
        scrape(s.api_metrics_addr),
        scrape(s.inference_metrics_addr),
        scrape(s.http_addr),
    )
    ok = 'code="OK",method="JobService/ListJobs"'
    assert (
        _sum(api1, "lmforge_grpc_requests_total", ok)
        == _sum(api0, "lmforge_grpc_requests_total", ok) + 1
    )
    nf = 'code="NOT_FOUND",method="JobService/GetJob"'
    assert (
        _sum(api1, "lmforge_grpc_requests_total", nf)
        == _sum(api0, "lmforge_grpc_requests_total", nf) + 1
    )
    lat = 'lmforge_grpc_request_duration_seconds_count{method="JobService/ListJobs"'
    assert _sum(api1, lat) == _sum(api0, lat) + 1
    # Jobs by state and the queue length are there (all zero once the model is trained).
    assert 'lmforge_jobs{state="RUNNING"}' in api1 and "lmforge_training_queue_length" in api1

    stream = 'code="OK",method="InferenceService/GenerateStream"'
    assert (
        _sum(inf1, "lmforge_grpc_requests_total", stream)
        == _sum(inf0, "lmforge_grpc_requests_total", stream) + 1
    )
    assert (
        _sum(inf1, "lmforge_generation_tokens_total")
        == _sum(inf0, "lmforge_generation_tokens_total") + 10
    )
    ttft = "lmforge_time_to_first_token_seconds_count"
    assert _sum(inf1, ttft) == _sum(inf0, ttft) + 1
    itl = "lmforge_inter_token_latency_seconds_count"
    assert _sum(inf1, itl) == _sum(inf0, itl) + 1
    assert inf1["lmforge_loaded_models"] >= 1
    assert any(k.startswith("lmforge_inference_batch_size{") for k in inf1)
    assert _sum(inf1, "lmforge_grpc_open_streams") == 0

    route = 'route="/v1/completions",status="200"'
    assert (
        _sum(http1, "lmforge_http_requests_total", route)
        == _sum(http0, "lmforge_http_requests_total", route) + 1
    )
    nf_http = 'route="/api/jobs/{id}",status="404"'
    assert (
        _sum(http1, "lmforge_http_requests_total", nf_http)
        == _sum(http0, "lmforge_http_requests_total", nf_http) + 1
    )


def test_worker_metrics_show_training_speed_and_lease_renewals(gateway_stack, trained_model):
    # trained_model ran a job on this stack's worker: its heartbeat renewed the lease, and
    # the job's gauges were dropped when it ended.
    w = scrape(gateway_stack.settings.worker_metrics_addr)
    assert w.get('lmforge_lease_renewals_total{result="renewed"}', 0) >= 1
    assert not any(k.startswith("lmforge_training_tokens_per_second{") for k in w)
