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
    # A directory; defaults to <data_dir>/artifacts.
    artifacts: str = ""
    api_addr: str = "127.0.0.1:50051"
    inference_addr: str = "127.0.0.1:50052"
    # {api key: tenant}. Empty: authentication is off and every caller is tenant "default".
    api_keys: dict[str, str] = field(default_factory=dict)
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
    # Export fails (and the job with it) when fp32 ONNX logits differ from PyTorch's by more.
    parity_limit: float = 1e-4
    # Inference server.
    max_batch_size: int = 16
    max_new_tokens_limit: int = 4096
    max_prompt_chars: int = 1 << 20
    max_loaded_models: int = 4
    # "auto" (CUDA when a GPU is present, else CPU), "cpu" or "cuda".
    inference_device: str = "auto"
    # Let ONNX Runtime's CPU threads spin-wait: faster on cores of its own, much slower on
    # cores shared with other work.
    inference_spin: bool = False
    # ONNX Runtime intra-op threads per model (0: one per physical core, ORT's default).
    inference_threads: int = 0
    # Celery queue that training tasks go to.
    train_queue: str = "gpu"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.artifacts) if self.artifacts else self.data_dir / "artifacts"

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
            env[f"LMFORGE_{f.name.upper()}"] = str(value)
        return env
