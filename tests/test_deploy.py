"""deploy/: what can be checked without a Docker engine or a cluster.

The files parse; every command they run is a real CLI entry point (lmforge's own parser
accepts it, or it is Redis's); every LMFORGE_* variable is a Settings field; the ports
published, probed and listened on agree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lmforge.cli import build_parser
from lmforge_server.settings import Settings
from lmforge_server.taskqueue import queue_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTINGS_VARS = {f"LMFORGE_{f.name.upper()}" for f in dataclasses.fields(Settings)}
LMFORGE_ROLES = {"api", "inference", "worker", "http"}


def lmforge_command_is_real(argv: list[str]) -> None:
    """Fails unless `lmforge ARGV` parses with the CLI's own parser."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`lmforge {shlex.join(argv)}` is not a valid command (exit {e.code})")


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def check_env_names(names: list[str], where: str) -> None:
    unknown = [n for n in names if n.startswith("LMFORGE_") and n not in SETTINGS_VARS]
    assert not unknown, f"{where}: {unknown} are not Settings fields"


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines
    ]


def test_dockerfile_runs_lmforge_and_copies_files_that_exist():
    instructions = dockerfile()
    entrypoint = json.loads(next(arg for op, arg in instructions if op == "ENTRYPOINT"))
    cmd = json.loads(next(arg for op, arg in reversed(instructions) if op == "CMD"))
    assert entrypoint == ["lmforge"]
    lmforge_command_is_real(cmd)
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    env = dict(
        re.findall(r"(LMFORGE_\w+)=(\S+)", " ".join(a for op, a in instructions if op == "ENV"))
    )
    check_env_names(list(env), "Dockerfile ENV")
    exposed = {int(p) for op, a in instructions if op == "EXPOSE" for p in a.split()}
    assert {port_of(env["LMFORGE_API_ADDR"]), port_of(env["LMFORGE_INFERENCE_ADDR"])} == exposed
    assert "[all]" in " ".join(a for op, a in instructions if op == "RUN"), (
        "servers need the extras"
    )


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def lmforge_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "lmforge:latest"}


def test_compose_runs_redis_api_inference_and_gpu_workers_from_one_image(compose):
    services = lmforge_services(compose)
    roles = {" ".join(s["command"][:2]) for s in services.values()}
    assert roles == {"serve api", "serve inference", "worker", "serve http"}
    assert all(s["build"]["dockerfile"] == "deploy/Dockerfile" for s in services.values())
    assert (
        DEPLOY / compose["services"]["api"]["build"]["context"] / "deploy" / "Dockerfile"
    ).exists()
    for name, service in services.items():
        lmforge_command_is_real(service["command"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        check_env_names(list(service["environment"]), f"compose {name}")
        assert service["environment"]["LMFORGE_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_processes_share_nothing_but_redis_and_the_minio_store(compose):
    """Artifacts go through MinIO: no lmforge container mounts a volume another one does,
    and each waits for the bucket to exist."""
    services = lmforge_services(compose)
    for name, service in services.items():
        env = service["environment"]
        assert not service.get("volumes"), name
        assert env["LMFORGE_ARTIFACTS"].startswith("s3://"), name
        bucket = env["LMFORGE_ARTIFACTS"].removeprefix("s3://").split("/")[0]
        host, _, port = env["LMFORGE_S3_ENDPOINT_URL"].removeprefix("http://").partition(":")
        assert env["LMFORGE_S3_ACCESS_KEY_ID"] and env["LMFORGE_S3_SECRET_ACCESS_KEY"]
        assert service["depends_on"]["minio-bucket"]["condition"] == (
            "service_completed_successfully"
        )
    minio = compose["services"][host]
    assert minio["command"][:2] == ["server", "/data"] and int(port) == 9000
    assert any(v.split(":")[0] in compose["volumes"] for v in minio["volumes"])
    assert f"store/{bucket}" in " ".join(compose["services"]["minio-bucket"]["command"])


def test_compose_runs_several_workers_and_two_inference_replicas_behind_one_address(compose):
    services = lmforge_services(compose)
    workers = [s for s in services.values() if s["command"] == ["worker"]]
    gpus = [
        d["device_ids"][0]
        for w in workers
        for d in w["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(workers) >= 2 and len(set(gpus)) == len(gpus), gpus  # one GPU each, distinct
    inference = compose["services"]["inference"]
    assert inference["deploy"]["replicas"] == 2
    (published,) = inference["ports"]
    host_ports, _, container = published.partition(":")
    first, _, last = host_ports.partition("-")
    assert int(last) - int(first) + 1 == 2 and int(container) == 50052
    # The gateway reaches every replica by one name, balanced per call by gRPC.
    from lmforge._connection import channel_target

    target, options = channel_target(services["gateway"]["environment"]["LMFORGE_INFERENCE_ADDR"])
    assert target == "dns:///inference:50052" and ("grpc.lb_policy_name", "round_robin") in options


def test_compose_redis_keeps_an_append_only_file_on_a_volume(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server" and command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    assert any(
        v.split(":")[1] == data_dir and v.split(":")[0] in compose["volumes"]
        for v in redis["volumes"]
    )
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # never claims 6379 on the host


def test_compose_health_checks_ask_the_grpc_health_service_on_the_listening_port(compose):
    for name, var in (("api", "LMFORGE_API_ADDR"), ("inference", "LMFORGE_INFERENCE_ADDR")):
        service = compose["services"][name]
        port = port_of(service["environment"][var])
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "lmforge", "health"], name
        lmforge_command_is_real(test[2:])
        assert port_of(test[3]) == port
        published = [p.partition(":") for p in service["ports"]]
        assert any(int(c) == port and h.split("-")[0] == str(port) for h, _, c in published)


def test_compose_worker_reserves_one_nvidia_gpu(compose):
    workers = [s for s in lmforge_services(compose).values() if s["command"] == ["worker"]]
    assert workers
    for worker in workers:
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert len(device.get("device_ids", [])) == 1 or device.get("count") == 1
        assert worker["environment"]["LMFORGE_DEVICE"].startswith("cuda")


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def workloads(manifests: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d for d in manifests if d["kind"] in ("Deployment", "StatefulSet")
    }


def test_k8s_manifests_are_well_formed(manifests):
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in manifests)
    for workload in workloads(manifests).values():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
    services = [d for d in manifests if d["kind"] == "Service"]
    pods = [w["spec"]["template"] for w in workloads(manifests).values()]
    for service in services:
        (pod,) = [
            p
            for p in pods
            if service["spec"]["selector"].items() <= p["metadata"]["labels"].items()
        ]
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_k8s_runs_the_same_four_parts_with_real_commands(manifests):
    config = next(d for d in manifests if d["kind"] == "ConfigMap")
    check_env_names(list(config["data"]), "ConfigMap")
    roles = set()
    for name, workload in workloads(manifests).items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            check_env_names([e["name"] for e in container.get("env", [])], name)
            if container["image"] == "lmforge:latest":
                lmforge_command_is_real(container["args"])
                roles.add(container["args"][-1])
                assert {"configMapRef": {"name": config["metadata"]["name"]}} in container[
                    "envFrom"
                ]
            else:
                assert container["command"][0] == "redis-server"
                assert "--appendonly" in container["command"]
                roles.add("redis")
    assert roles == LMFORGE_ROLES | {"redis"}


def test_k8s_probes_use_grpc_health_on_the_listening_port(manifests):
    config = next(d for d in manifests if d["kind"] == "ConfigMap")["data"]
    expected = {
        "api": port_of(config["LMFORGE_API_ADDR"]),
        "inference": port_of(config["LMFORGE_INFERENCE_ADDR"]),
    }
    for workload in workloads(manifests).values():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            role = c.get("args", [""])[-1]
            if role in expected:
                assert c["readinessProbe"]["grpc"]["port"] == expected[role]
                assert c["livenessProbe"]["grpc"]["port"] == expected[role]
                assert [p["containerPort"] for p in c["ports"]] == [expected[role]]
            if role == "worker":
                # One Deployment per GPU class: it reads the queue of its class and device
                # count ("gpu", "gpu-x4") and has exactly that many GPUs.
                queue, devices = _worker_queue(c)
                assert c["resources"]["limits"]["nvidia.com/gpu"] == devices, queue


# ---------------------------------------------------------------- keys (issue 8)


def test_deployed_servers_on_public_addresses_read_keys_from_a_mounted_secret(compose, manifests):
    """The servers refuse 0.0.0.0 without keys: every deploy mounts the key file."""
    for name in ("api", "inference"):
        service = compose["services"][name]
        path = service["environment"]["LMFORGE_API_KEYS_FILE"]
        (secret,) = service["secrets"]
        assert path == f"/run/secrets/{secret}"
        assert compose["secrets"][secret]["file"]  # a file the operator must provide
        assert "allow-unauthenticated" not in " ".join(service["command"])
    for workload in workloads(manifests).values():
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c.get("args", [""])[-1] not in ("api", "inference"):
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            path = env["LMFORGE_API_KEYS_FILE"]
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert volume["secret"]["secretName"] and not volume["secret"].get("optional")


def _worker_queue(container: dict) -> tuple[str, int]:
    """The Celery queue a worker container reads, and its device count, from its env."""
    env = {e["name"]: e["value"] for e in container["env"]}
    devices = int(env.get("LMFORGE_WORKER_DEVICES", 1))
    return queue_for(env["LMFORGE_TRAIN_QUEUE"], devices), devices


def test_k8s_uses_the_s3_store_and_no_shared_volume(manifests):
    config = next(d for d in manifests if d["kind"] == "ConfigMap")["data"]
    assert config["LMFORGE_ARTIFACTS"].startswith("s3://") and config["LMFORGE_S3_REGION"]
    assert not [d for d in manifests if d["kind"] == "PersistentVolumeClaim"]
    for name, workload in workloads(manifests).items():
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["image"] != "lmforge:latest" or c["args"] == ["serve", "http"]:
                continue  # the gateway is a client of the servers: no artifacts
            assert {"secretRef": {"name": "lmforge-s3"}} in c["envFrom"], name
            data = next(m for m in c.get("volumeMounts", []) if m["mountPath"] == "/data")
            volume = next(v for v in spec["volumes"] if v["name"] == data["name"])
            assert "emptyDir" in volume, name
    workers = {n: w for n, w in workloads(manifests).items() if n.startswith("lmforge-worker-")}
    queues = {
        _worker_queue(c)[0]
        for w in workers.values()
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert queues == {"gpu", "gpu-x4"} and set(workers) == {f"lmforge-worker-{q}" for q in queues}
