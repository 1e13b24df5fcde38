"""What `training.init_from` may name: a registered model of the caller, a kept checkpoint
of one of the caller's jobs ("<job id>:<step>"), or a directory under one of the operator's
base-model roots (Settings.base_model_dirs).

Paths never come from clients unchecked: a path is resolved (symlinks, `..`) and must lie
inside an allowed root and outside the artifact store (other tenants' models live there).
Every refusal reads the same, so a client learns nothing about the server's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge_server import checkpoints, errors, specs
from lmforge_server import store as st

FIELD = "spec.training.init_from"
REFUSED = (
    f"{FIELD}: not one of your registered models (name, name@version or id) nor a "
    "directory under the server's base-model roots"
)
MAX_REF = 1024


def _is_path(ref: str) -> bool:
    return ref.startswith(("/", "file:", ".", "~")) or "/" in ref or "\\" in ref


def allowed_dir(ref: str, roots: list[str], private_dirs: list[Path]) -> Path:
    """The resolved directory `ref` names when it lies under an allowed root and under none
    of `private_dirs` (the service's own: artifacts, caches, scratch); else PermissionDenied
    (the same message whatever the reason)."""
    raw = ref.removeprefix("file://") if ref.startswith("file://") else ref
    if not raw.startswith("/") or "\x00" in raw:
        raise errors.PermissionDenied(REFUSED)
    try:
        path = Path(os.path.realpath(raw, strict=True))
        private = [Path(os.path.realpath(d)) for d in private_dirs]
        resolved_roots = [Path(os.path.realpath(r, strict=True)) for r in roots if r]
    except (OSError, ValueError):
        raise errors.PermissionDenied(REFUSED) from None
    inside = any(path == r or path.is_relative_to(r) for r in resolved_roots)
    if not inside or any(path == p or path.is_relative_to(p) for p in private):
        raise errors.PermissionDenied(REFUSED)
    try:
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            raise errors.PermissionDenied(REFUSED)
    except OSError:
        raise errors.PermissionDenied(REFUSED) from None
    return path


def config_of(path: Path) -> specs.ModelConfig:
    """The validated model config of a base directory; INVALID_ARGUMENT naming the field."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except OSError:
        raise errors.PermissionDenied(REFUSED) from None
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument(f"{FIELD}: config.json is not valid JSON") from None
    if not isinstance(raw, dict):
        raise errors.InvalidArgument(f"{FIELD}: config.json must hold a JSON object")
    _check_hf_fields(raw)
    try:
        cfg = specs.model_config_from_hf(raw)
    except KeyError as e:
        raise errors.InvalidArgument(f"{FIELD}: config.json lacks {e.args[0]!r}") from None
    except (ValueError, TypeError, ArithmeticError, AttributeError, OverflowError) as e:
        raise errors.InvalidArgument(f"{FIELD}: config.json: {str(e)[:200]}") from None
    try:
        specs._validate_model(cfg)
    except specs.SpecError as e:
        raise errors.InvalidArgument(f"{FIELD}: config.json {e}") from None
    except (TypeError, ArithmeticError) as e:
        raise errors.InvalidArgument(f"{FIELD}: config.json: {str(e)[:200]}") from None
    return cfg


_REQUIRED_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
)
_OPTIONAL_INTS = ("num_key_value_heads", "max_position_embeddings", "head_dim")
_OPTIONAL_NUMBERS = ("rope_theta", "rms_norm_eps", "attention_dropout")


def _check_hf_fields(raw: dict) -> None:
    """Every field model_config_from_hf reads, by its config.json name, before it reads it."""

    def fail(name: str, what: str) -> None:
        raise errors.InvalidArgument(
            f"{FIELD}: config.json {name} must be {what}, got {errors.shown(raw.get(name))}"
        )

    for name in _REQUIRED_INTS + _OPTIONAL_INTS:
        value = raw.get(name)
        if value is None and name in _OPTIONAL_INTS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 24:
            fail(name, f"an integer between 1 and {1 << 24}")
    for name in _OPTIONAL_NUMBERS:
        value = raw.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            fail(name, "a number")
    for name in ("rope_parameters", "rope_scaling"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            fail(name, "an object")


def resolve(
    store: st.Store, owner: str, ref: str, roots: list[str], private_dirs: list[Path]
) -> tuple[specs.ModelConfig, str]:
    """The model config and weights directory that `init_from` names for `owner`."""
    if len(ref) > MAX_REF:
        raise errors.InvalidArgument(f"{FIELD}: at most {MAX_REF} characters")
    if _is_path(ref):
        path = allowed_dir(ref, roots, private_dirs)
        return config_of(path), str(path)
    if checkpoints.REF_RE.match(ref):
        try:
            job, _ = checkpoints.resolve(store, owner, ref)
        except st.NotFound as e:
            raise errors.NotFound(f"{FIELD}: {e.message}") from None
        return specs.ModelConfig(**job.spec["model"]), ref
    try:
        rec = store.get_model(owner, ref)
    except st.NotFound:
        raise errors.NotFound(f"{FIELD}: model {errors.shown(ref)} not found") from None
    if rec.state != st.MODEL_READY:
        raise errors.FailedPrecondition(
            f"{FIELD}: model {errors.shown(ref)} is {rec.state.lower()}, not ready"
        )
    return specs.ModelConfig(**rec.spec["model"]), rec.path
