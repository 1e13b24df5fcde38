"""The one source of configuration: flags and LMFORGE_* environment variables.

Every process builds a Settings once (Settings.from_env, then flag overrides) and passes it
down; no other module reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path


def _parse_api_keys(raw: str) -> dict[str, str]:
    """ "key1:tenant1,key2:tenant2" -> {key: tenant}."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, _, tenant = item.partition(":")
        keys[key] = tenant or "default"
    return keys


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(".lmforge").resolve())
    # Empty: the embedded stack starts its own Redis in data_dir.
    redis_url: str = ""
    # A directory (defaults to <data_dir>/artifacts) or an fsspec URL (s3://bucket/prefix).
    artifacts: str = ""
    # S3-compatible stores (AWS, MinIO, Ceph, R2); empty: botocore's defaults.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    # Multipart part size and ranged-read size (S3's minimum part is 5 MiB).
    s3_block_size: int = 8 << 20
    # Local cache of artifacts read from the store; defaults to <data_dir>/cache.
    artifact_cache: str = ""
    artifact_cache_max_bytes: int = 20 << 30
    # Unpublished objects (killed writers) older than this are swept; above the longest upload.
    artifact_tmp_max_age_s: float = 24 * 3600.0
    api_addr: str = "127.0.0.1:50051"
    inference_addr: str = "127.0.0.1:50052"
    # {api key: "tenant[:scope+scope]"}. With no keys here nor in api_keys_file,
    # authentication is off and every caller is tenant "default" with every scope.
    api_keys: dict[str, str] = field(default_factory=dict)
    # A file of keys, one `key:tenant[:scopes]` per line (a mounted secret).
    api_keys_file: str = ""
    # Serve without API keys on a non-loopback address (refused unless set).
    allow_unauthenticated: bool = False
    # TLS: the server's certificate chain and key (PEM); with a client CA, clients must
    # present a certificate it signed (mTLS). Empty: plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # The HTTP gateway is a client of the API and inference servers: the CA it trusts for
    # them when they serve TLS, and the certificate and key it presents under mTLS (the
    # same LMFORGE_TLS_* names the SDK reads). Empty CA: it reaches them in plaintext.
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    # Directories `training.init_from` may name (besides the caller's own models).
    base_model_dirs: list[str] = field(default_factory=list)
    # A job whose worker is lost this many times ends FAILED (a poison job).
    max_attempts: int = 3
    # A QUEUED job with no task this long (never enqueued, or its worker died on pick-up)
    # is enqueued again.
    requeue_stalled_after_s: float = 60.0
    # Open WatchJob streams per owner, per API server.
    max_watches_per_owner: int = 100
    # RPCs in flight per server; more are answered RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1000
    # Generate/GenerateStream calls in flight per owner, per inference server.
    max_generations_per_owner: int = 64
    # Datasets and their bytes stored per owner.
    max_datasets_per_owner: int = 1000
    max_stored_bytes_per_owner: int = 100 << 30
    # Finished jobs (records and events) are kept this long (0: forever).
    job_retention_s: float = 30 * 24 * 3600.0
    max_upload_bytes: int = 1 << 30
    max_queued_jobs_per_owner: int = 100
    # A worker's lease on a job lasts this long without a heartbeat.
    lease_ttl_s: float = 30.0
    # How often the API server looks for running jobs whose worker died.
    reaper_interval_s: float = 5.0
    # Celery redelivers an unacked task after this long: above the longest job.
    visibility_timeout_s: int = 7 * 24 * 3600
    # Training device: "auto", "cpu" or "cuda[:N]".
    device: str = "auto"
    # Torch threads for training on CPU (0: torch's default).
    torch_threads: int = 0
    # Let torch's OpenMP threads spin-wait between kernels (OMP_WAIT_POLICY=ACTIVE, for at
    # most ~0.3 s once work stops): on 2 cores of its own a CPU step of the char recipe took
    # 31 ms against 62 waiting passively; beside one busy process, 104 against 71 (README,
    # "Training on a CPU"). Off for workers on cores shared with other work.
    train_spin: bool = True
    # Checkpoints kept per job: the newest this many, and the best by validation loss.
    keep_checkpoints: int = 3
    # ONNX exporter: "auto" or "gqa", the graph builder (worker/lmforge_worker/graph.py):
    # GroupQueryAttention over a KV cache the server writes in place, built from the
    # weights in about a second for 10.7M parameters. torch.onnx's exporters ("dynamo",
    # 40 s for 0.86M parameters here, and "legacy") wrote the concatenating-cache graph
    # the server no longer serves, so they are no longer offered.
    onnx_exporter: str = "auto"
    # Export fails (and the job with it) when fp32 ONNX logits differ from PyTorch's by more.
    parity_limit: float = 1e-4
    # Inference server. Rows decoded together; also the KV-cache slots each loaded model
    # preallocates (of its full context; CPU pages are committed only when written).
    max_batch_size: int = 16
    max_new_tokens_limit: int = 4096
    max_prompt_chars: int = 1 << 20
    max_loaded_models: int = 4
    # "auto" (CUDA when a GPU is present, else CPU), "cpu" or "cuda".
    inference_device: str = "auto"
    # Let ONNX Runtime's CPU threads spin-wait between a run's kernels (they park when the
    # run returns): README, "Inference", for what it buys. Off for cores shared with other work.
    inference_spin: bool = True
    # Prefill prompts of a quantised variant through the model's w8a8 prefill graph where it
    # was exported and passed the quality gate (off: through the variant's own graph).
    inference_prefill_graph: bool = True
    # ONNX Runtime intra-op threads per model (0: one per physical core, ORT's default).
    # Measured on 2 cores (README, "Inference"): 2 threads without spinning was best or near
    # it at batch 1 and at 16 streams; 1 thread lost at 16 streams.
    inference_threads: int = 0
    # The device class, which names the training queues: a job on one device goes to
    # queue `<train_queue>` ("gpu", "cpu"), a job on N devices to `<train_queue>-xN`
    # ("gpu-x4"). A worker consumes the one queue that matches its class and worker_devices.
    train_queue: str = "gpu"
    # Devices (GPUs, or gloo processes on a CPU worker) this worker gives each job.
    worker_devices: int = 1
    # The most devices a job may ask for (the largest worker of the fleet): a larger job is
    # refused at CreateJob instead of waiting forever in a queue no worker reads.
    max_devices_per_job: int = 8
    # The HTTP gateway (web console, OpenAI-compatible API, its own /metrics).
    http_addr: str = "127.0.0.1:50080"
    # Prometheus /metrics of each process; empty turns it off.
    api_metrics_addr: str = "127.0.0.1:50091"
    inference_metrics_addr: str = "127.0.0.1:50092"
    worker_metrics_addr: str = "127.0.0.1:50093"
    # Peak FLOP/s of the training device, for the MFU metric (0: unknown, no MFU).
    training_peak_flops: float = 0.0
    # Training FLOP/s that validate_only's time estimate assumes for "cpu" until a worker
    # has measured its own (2e10: about what the 2-core CI machine sustains on tiny models).
    fallback_training_flops: float = 2e10
    # Workers also write TensorBoard event files under <data_dir>/scratch/jobs/<id>/tensorboard/
    # on the worker's own disk (needs the `tensorboard` package: lmforge[tensorboard]).
    tensorboard: bool = False
    # Keep an attempt's local work directory on the worker (tokenised data, best weights,
    # checkpoints before upload, export staging) after the attempt ends. Off: it is removed,
    # since everything that outlives an attempt is in the artifact store; on: for debugging.
    keep_scratch: bool = False

    @property
    def artifacts_dir(self) -> Path:
        if "://" in self.artifacts:
            # Until every caller goes through objectstore.open_object_store, a URL here would
            # otherwise become a local directory named "s3:".
            raise ValueError(
                f"artifacts={self.artifacts!r} is a URL; this process reads a local directory"
            )
        return Path(self.artifacts) if self.artifacts else self.data_dir / "artifacts"

    @property
    def http_url(self) -> str:
        """The gateway's base URL: https when the servers serve TLS."""
        return f"{'https' if self.tls_cert_file else 'http'}://{self.http_addr}"

    @property
    def artifact_cache_dir(self) -> Path:
        return Path(self.artifact_cache) if self.artifact_cache else self.data_dir / "cache"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then LMFORGE_<FIELD> variables, then the given overrides (flags)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"LMFORGE_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "api_keys":
                values[f.name] = _parse_api_keys(raw)
            elif f.name == "base_model_dirs":
                values[f.name] = [p.strip() for p in raw.replace(os.pathsep, ",").split(",")]
                values[f.name] = [p for p in values[f.name] if p]
            elif f.name == "data_dir":
                values[f.name] = Path(raw).expanduser().resolve()
            elif f.type == "bool":
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif f.type in ("int",):
                values[f.name] = int(raw)
            elif f.type in ("float",):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data_dir"), str):
            values["data_dir"] = Path(values["data_dir"]).expanduser().resolve()
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """LMFORGE_* variables that rebuild these settings in a child process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_keys":
                value = ",".join(f"{k}:{t}" for k, t in value.items())
            elif f.name == "base_model_dirs":
                value = ",".join(value)
            env[f"LMFORGE_{f.name.upper()}"] = str(value)
        return env
