"""deploy/'s monitoring: the Grafana dashboard asks only for metrics lmforge exports, and the
Prometheus configs scrape the ports the processes are told to serve /metrics on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.registry import REGISTRY

import lmforge_server.http.app  # noqa: F401  (registers the gateway's metrics)
from lmforge_server import metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COLLECTED = {  # families the collectors build at scrape time
    "lmforge_loaded_models",
    "lmforge_inference_queue_depth",
    "lmforge_inference_batch_size",
    "lmforge_jobs",
    "lmforge_training_queue_length",
}


def exported_names() -> set[str]:
    names = set(COLLECTED)
    for family in REGISTRY.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((DEPLOY / "grafana" / "lmforge-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\blmforge_[a-z_]+", e)}
    assert used and used <= exported_names(), used - exported_names()
    # Every kind of metric the issue names has a panel.
    for name in ("lmforge_grpc_requests_total", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_inter_token_latency_seconds_bucket", "lmforge_inference_queue_depth",
                 "lmforge_jobs", "lmforge_training_tokens_per_second", "lmforge_training_mfu",
                 "lmforge_lease_renewals_total", "lmforge_reaper_actions_total"):  # fmt: skip
        assert name in used, name
    assert metrics.MetricsInterceptor  # the module the names come from


def test_compose_prometheus_scrapes_each_process_on_its_metrics_port():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}  # fmt: skip
    # Replicas of one service are found by DNS (every address the name has).
    targets |= {f"{n}:{sd['port']}" for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}  # fmt: skip
    services = compose["services"]
    expected = {
        "api": "LMFORGE_API_METRICS_ADDR",
        "inference": "LMFORGE_INFERENCE_METRICS_ADDR",
        "worker-gpu0": "LMFORGE_WORKER_METRICS_ADDR",
        "worker-gpu1": "LMFORGE_WORKER_METRICS_ADDR",
        "gateway": "LMFORGE_HTTP_ADDR",
    }
    for service, var in expected.items():
        port = services[service]["environment"][var].rpartition(":")[2]
        assert f"{service}:{port}" in targets, service
    prom = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


def test_k8s_pods_are_annotated_with_the_port_their_config_serves_metrics_on():
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lmforge"
    )
    ports = {
        "api": config["data"]["LMFORGE_API_METRICS_ADDR"],
        "inference": config["data"]["LMFORGE_INFERENCE_METRICS_ADDR"],
        "worker": config["data"]["LMFORGE_WORKER_METRICS_ADDR"],
    }
    seen = set()
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        template = d["spec"]["template"]
        (container,) = template["spec"]["containers"]
        role = container["args"][-1]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        if role in ports:
            assert ports[role].endswith(":" + annotations["prometheus.io/port"])
        else:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env["LMFORGE_HTTP_ADDR"].endswith(":" + annotations["prometheus.io/port"])
        seen.add(role)
    assert {"api", "inference", "worker", "http"} <= seen
    prom = next(d for d in docs if d["metadata"]["name"] == "lmforge-prometheus")
    scrape = yaml.safe_load(prom["data"]["prometheus.yml"])
    assert scrape["scrape_configs"][0]["kubernetes_sd_configs"] == [{"role": "pod"}]
