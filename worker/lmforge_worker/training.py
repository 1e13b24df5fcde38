"""The training loop: a pure library (no Celery, Redis or gRPC), driven through `hooks`.

`train` builds the data once in `<work_dir>/data`, trains with AdamW and a warmup + cosine
schedule, evaluates, keeps the best weights in `<work_dir>/best.safetensors`, writes
resumable checkpoints into `checkpoint_dir`, and stops cooperatively when
`hooks.should_stop()` asks. `finalize` turns the result into a Hugging Face-layout model
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from lmforge_server.artifacts import write_file_atomic
from lmforge_server.specs import JobSpec, TrainConfig, count_parameters
from lmforge_worker.data import DataInfo, TokenBins, prepare_data
from lmforge_worker.model import (
    Llama,
    add_lora,
    hf_config,
    hf_state_dict,
    load_pretrained,
    save_weights,
)
from lmforge_worker.ranks import SINGLE, Ranks

CHECKPOINT_VERSION = 1
BEST_WEIGHTS = "best.safetensors"
# Checkpoints kept per checkpoint_dir: the newest may not be promoted yet when we crash.

Status = Literal[
    "completed", "early_stopped", "target_reached", "cancelled", "interrupted", "paused"
]
# What `hooks.should_stop()` may ask for, and the status each ends the run with.
STOP_STATUS: dict[str, Status] = {
    "cancel": "cancelled",
    "shutdown": "interrupted",
    "pause": "paused",
}


@dataclass(frozen=True)
class Progress:
    """A training progress snapshot, sent every `log_interval` steps."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    eta_seconds: float
    # Training time over all attempts of this job (resumes included).
    elapsed_seconds: float
    tokens_seen: int
    # Total gradient norm before clipping (of the logged step).
    grad_norm: float = 0.0
    # Unix time the last step should end, at this run's wall time per step so far
    # (evaluations and checkpoints included, unlike eta_seconds).
    estimated_finish: float = 0.0


class TrainHooks(Protocol):
    """How the loop talks to its caller. Hooks run on the training thread: keep them quick.

    An optional `on_log(message: str)` is called with one-line notes when present.
    """

    def should_stop(self) -> str | None:
        """None to go on; "cancel" (the user cancelled), "pause" (the user paused) or
        "shutdown" (the worker stops)."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_eval(
        self, step: int, val_loss: float, val_bpb: float, best_val_loss: float, best_step: int
    ) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None:
        """`path` is durably written; pass it back as `resume_from` to continue from it."""


@dataclass(frozen=True)
class TrainResult:
    status: Status
    steps: int
    best_val_loss: float
    best_val_bpb: float
    best_step: int
    final_loss: float
    tokens_per_second: float
    wall_seconds: float
    # <work_dir>/best.safetensors (HF names), or None when no evaluation ran yet.
    best_path: Path | None
    tokens_seen: int = 0
    # Seconds spent per phase of this call: data, steps, eval, checkpoints.
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine to the min."""
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / (t.warmup_steps + 1)
    if t.max_steps <= t.warmup_steps:
        return t.learning_rate
    ratio = min(1.0, (step - t.warmup_steps) / (t.max_steps - t.warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return t.min_learning_rate + coeff * (t.learning_rate - t.min_learning_rate)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU; on CUDA "auto" is bf16 where supported, else fp32."""
    if device.type != "cuda":
        return "fp32"
    if precision in ("auto", "bf16"):
        # Native bf16 only (Ampere and later): emulated bf16 is slower than fp32.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return precision


def use_compile(mode: str, device: torch.device) -> bool:
    """Whether to torch.compile: "on", "off", or "auto" (CUDA with a usable Triton only:
    inductor needs it there, and compile failures surface late, at the first step)."""
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton  # private; checks the GPU is sm_70+ too
    except ImportError:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return has_triton()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _configure_optimizer(model: Llama, t: TrainConfig, device: torch.device):
    # Decay matrices (embeddings included, as nanoGPT does), not norm gains. Frozen weights
    # (LoRA's base) have no optimizer state at all.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # Fused on CPU too: one kernel over all parameters instead of a Python loop per tensor.
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=True)


def _trainable(model: Llama, t: TrainConfig) -> str:
    if not t.lora_rank:
        return ""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"LoRA r={t.lora_rank} on {t.lora_targets}: {n:,} of "


def _threads_note() -> str:
    n = torch.get_num_threads()
    return f", {n} thread{'s' if n > 1 else ''}"


def _lm_loss(run_model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    logits, _ = run_model(x)
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction
    )


@torch.no_grad()
def _evaluate(
    model, run_model, batches, byte_counts, device, precision, ranks: Ranks = SINGLE
) -> tuple[float, float]:
    """Mean val loss per token and bits per byte over the fixed eval batches (each rank
    scores its share of them; the sums are all-reduced)."""
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    for x, y in batches[ranks.rank :: ranks.world]:
        with _autocast(device, precision):
            nats += _lm_loss(run_model, x, y, reduction="sum").double()
        n_tokens += y.numel()
    model.train()
    n_bytes = sum(byte_counts[ranks.rank :: ranks.world])
    sums = torch.stack([nats, nats.new_tensor(n_tokens), nats.new_tensor(n_bytes)])
    total, n_tokens, n_bytes = ranks.sum(sums).tolist()
    return total / n_tokens, total / math.log(2) / max(1, n_bytes)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_checkpoint(state: dict[str, Any], checkpoint_dir: Path, step: int) -> Path:
    """torch.save to a temp name, fsync, rename. Old ones are the caller's to drop (only it
    knows which one is the job's promoted resume point)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"step-{step:08d}.pt"
    tmp = checkpoint_dir / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(checkpoint_dir)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint written by `train` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class _SilentHooks:
    """The hooks of ranks other than 0: they report nothing and never decide to stop."""

    def should_stop(self) -> None:
        return None

    def on_progress(self, progress) -> None:
        pass

    def on_eval(self, *args) -> None:
        pass

    def on_checkpoint(self, step, path) -> None:
        pass


def _call(hooks, name: str, *args) -> None:
    fn = getattr(hooks, name, None)
    if fn is not None:
        fn(*args)


def train(
    spec: JobSpec,
    corpus_path: Path,
    work_dir: Path,
    checkpoint_dir: Path,
    hooks: TrainHooks,
    *,
    device: str = "cpu",
    resume_from: Path | None = None,
    init_weights_dir: Path | None = None,
    torch_threads: int = 0,
    val_corpus_path: Path | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Trains the model of `spec` on the corpus; returns how it ended.

    - Data: tokenizer and token bins in `<work_dir>/data`, built on the first call (from
      `init_weights_dir`'s tokenizer.json when given) and reused by later ones.
    - Evaluates every `eval_interval` steps and at the last step; the best weights by val
      loss are kept atomically in `<work_dir>/best.safetensors`.
    - Checkpoints (model, optimizer, step, RNG and data-sampler state, best-so-far) go to
      `checkpoint_dir` every `checkpoint_interval` steps, when stopped, and at the end;
      `hooks.on_checkpoint` hears of each once it is durable. `resume_from` continues from
      one exactly: on CPU a resumed run ends with the same weights as an uninterrupted one.
    - `hooks.should_stop()` is asked before every step: on "cancel" or "shutdown" it
      checkpoints and returns status "cancelled" or "interrupted"; on "pause", "paused".
    - Ends "target_reached" at the first evaluation whose val loss is at or below
      `target_val_loss` (0: never).
    - Stops early ("early_stopped") after `early_stopping_patience` evaluations in a row
      without a new best (0: never).
    - `ranks` (torchrun, see lmforge_worker.distributed): every rank trains on its shard of
      each global batch under DDP; only rank 0 writes files and calls the progress hooks,
      and rank 0's `should_stop` answer is every rank's.
    Raises ValueError when the corpus is too short for the context length, the tokenizer
    does not fit the model's vocabulary, or a checkpoint belongs to another model.
    """
    t0 = time.monotonic()
    timings = dict.fromkeys(("data", "steps", "eval", "checkpoints"), 0.0)
    m, t = spec.model, spec.training
    if not ranks.is_main:
        hooks = _SilentHooks()
    dev = torch.device(device)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    work_dir, checkpoint_dir = Path(work_dir), Path(checkpoint_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    ckpt = load_checkpoint(Path(resume_from)) if resume_from is not None else None
    if ckpt is not None and ckpt["spec"]["model"] != dataclasses.asdict(m):
        raise ValueError(f"checkpoint {resume_from} is for another model: {ckpt['spec']['model']}")

    pretrained_tok = None
    init_dir = init_weights_dir
    if init_dir is None and t.init_from and Path(t.init_from).is_dir():
        # A resumed fine-tune is not given init_weights_dir; its data dir still needs the
        # base model's tokenizer if it was never built.
        init_dir = Path(t.init_from)
    if init_dir is not None:
        pretrained_tok = Path(init_dir) / "tokenizer.json"

    def prepare():
        return prepare_data(
            corpus_path,
            work_dir / "data",
            tokenizer=m.tokenizer,
            vocab_size=m.vocab_size,
            val_fraction=t.val_fraction,
            pretrained_tokenizer=pretrained_tok,
            val_corpus_path=val_corpus_path,
        )

    # One process per node builds the data; the others then read it.
    info = prepare() if ranks.local_rank == 0 else None
    ranks.barrier()
    info = info or prepare()
    if info.vocab_size > m.vocab_size:
        raise ValueError(
            f"the tokenizer has {info.vocab_size} ids but the model only {m.vocab_size}"
        )
    bins = TokenBins(info)
    bins.check_context(m.context_length)
    timings["data"] = time.monotonic() - t0

    precision = resolve_precision(t.precision, dev)
    if dev.type == "cuda":
        # TF32 matmuls where we stay in fp32; bf16 autocast does not care.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(t.seed)
    model = Llama(m)
    if init_weights_dir is not None and ckpt is None:
        base, _ = load_pretrained(init_weights_dir)
        # Our config (dropout included) with the base weights; shapes must agree.
        model.load_state_dict(base.state_dict())
        del base
    if t.lora_rank:  # before a resume's load: its state holds the adapters too
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_target_list)
    model.to(dev)
    model.train()
    ranks.seed_apart(t.seed)
    optimizer = _configure_optimizer(model, t, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    data_gen = torch.Generator().manual_seed(t.seed)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    best_loss, best_bpb, best_step, evals_since_best = math.inf, math.inf, 0, 0
    final_loss = math.nan
    best_path = work_dir / BEST_WEIGHTS
    have_best = False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():
            # Empty when saved with the scaler off (fp32/bf16, e.g. a CPU attempt).
            scaler.load_state_dict(ckpt["scaler"])
        step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        elapsed_before, final_loss = ckpt["elapsed_seconds"], ckpt["final_loss"]
        b = ckpt["best"]
        best_loss, best_bpb, best_step = b["val_loss"], b["val_bpb"], b["step"]
        evals_since_best = b["evals_since_best"]
        # Restore the best weights as of the checkpoint: the file in work_dir may be newer.
        if b["weights"] is not None:
            if ranks.is_main:
                save_weights(b["weights"], best_path)
            have_best = True
        elif b["step"] == step and math.isfinite(best_loss):
            if ranks.is_main:
                save_weights(hf_state_dict(model), best_path)
            have_best = True
        per_rank = ckpt["rng"].get("torch_ranks")
        if per_rank is not None and len(per_rank) == ranks.world:
            torch.set_rng_state(per_rank[ranks.rank])
        else:
            torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        data_gen.set_state(ckpt["rng"]["data"])
        if ckpt.get("finished"):
            return TrainResult(
                status=ckpt["finished"],
                steps=step,
                best_val_loss=best_loss,
                best_val_bpb=best_bpb,
                best_step=best_step,
                final_loss=final_loss,
                tokens_per_second=0.0,
                wall_seconds=time.monotonic() - t0,
                best_path=best_path if have_best else None,
                tokens_seen=tokens_seen,
                timings=timings,
            )
        del ckpt

    compiled = use_compile(t.compile, dev)
    run_model = ranks.wrap(model, dev)
    run_model = torch.compile(run_model) if compiled else run_model
    # DDP's forward is for training steps; evaluation runs the plain module.
    eval_model = model if ranks.world > 1 else run_model

    def to_dev(xy):
        if dev.type == "cuda":
            return tuple(a.pin_memory().to(dev, non_blocking=True) for a in xy)
        return xy

    eval_batches = bins.fixed_batches(
        "val", t.eval_batches, t.batch_size, m.context_length, seed=t.seed
    )
    eval_bytes = [bins.utf8_bytes(y) for _, y in eval_batches]
    eval_batches = [to_dev(b) for b in eval_batches]
    tokens_per_step = t.batch_size * t.grad_accum_steps * m.context_length

    def checkpoint(finished: str | None = None) -> Path | None:
        rng_ranks = ranks.gather_rng()  # a collective: every rank comes here
        if not ranks.is_main:
            return None
        tc = time.monotonic()
        if best_step == step or not have_best:
            best_weights = None  # the model's own weights (or none yet)
        else:
            from safetensors.torch import load_file

            best_weights = load_file(str(best_path))
        state = {
            "version": CHECKPOINT_VERSION,
            "spec": spec.to_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed_seconds": elapsed_before + time.monotonic() - t0,
            "final_loss": final_loss,
            "finished": finished,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "data": data_gen.get_state(),
                "torch_ranks": rng_ranks,
            },
            "best": {
                "val_loss": best_loss,
                "val_bpb": best_bpb,
                "step": best_step,
                "evals_since_best": evals_since_best,
                "weights": best_weights,
            },
        }
        path = _save_checkpoint(state, checkpoint_dir, step)
        hooks.on_checkpoint(step, path)
        timings["checkpoints"] += time.monotonic() - tc
        return path

    def result(status: Status) -> TrainResult:
        return TrainResult(
            status=status,
            steps=step,
            best_val_loss=best_loss,
            best_val_bpb=best_bpb,
            best_step=best_step,
            final_loss=final_loss,
            tokens_per_second=steps_this_run * tokens_per_step / max(train_time, 1e-9),
            wall_seconds=time.monotonic() - t0,
            best_path=best_path if have_best else None,
            tokens_seen=tokens_seen,
            timings={**timings, "steps": train_time},
        )

    _call(
        hooks,
        "on_log",
        f"training {_trainable(model, t)}{count_parameters(m).total:,} parameters on {dev} ({precision}"
        f"{_threads_note() if dev.type == 'cpu' else ''}"
        f"{', compiled' if compiled else ''}"
        f"{f', {ranks.world} ranks' if ranks.world > 1 else ''}), {info.train_tokens:,} train / "
        f"{info.val_tokens:,} val tokens, from step {step}",
    )
    train_time, steps_this_run = 0.0, 0
    window_time, window_steps = 0.0, 0
    loop_start = time.monotonic()
    last_ckpt_step = step if resume_from is not None else -1
    status: Status = "completed"
    while step < t.max_steps:
        stop = ranks.agree_stop(hooks)
        if stop:
            if last_ckpt_step != step:
                checkpoint()
            return result(STOP_STATUS[stop])

        ts = time.monotonic()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        rows = ranks.rows(t.batch_size)
        for micro in range(t.grad_accum_steps):
            x, y = to_dev(bins.batch("train", t.batch_size, m.context_length, data_gen, rows))
            with ranks.no_sync(run_model, micro == t.grad_accum_steps - 1):
                with _autocast(dev, precision):
                    loss = _lm_loss(run_model, x, y)
                scaler.scale(loss / t.grad_accum_steps).backward()
            loss_sum += loss.detach()
        log_step = (step + 1) % t.log_interval == 0 or step + 1 == t.max_steps
        grad_norm = None
        if t.grad_clip > 0 or log_step:
            scaler.unscale_(optimizer)
            # inf as the limit measures the norm without clipping.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf
            )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_run += 1
        tokens_seen += tokens_per_step
        last = step == t.max_steps

        if log_step:
            # .item() syncs the GPU, so only on logging steps; time includes that sync.
            final_loss = ranks.mean(loss_sum).item() / t.grad_accum_steps
            dt = time.monotonic() - ts
            train_time += dt
            window_time += dt
            window_steps += 1
            per_step = window_time / window_steps
            hooks.on_progress(
                Progress(
                    step=step,
                    total_steps=t.max_steps,
                    loss=final_loss,
                    lr=lr,
                    tokens_per_second=tokens_per_step / per_step,
                    eta_seconds=per_step * (t.max_steps - step),
                    elapsed_seconds=elapsed_before + time.monotonic() - t0,
                    tokens_seen=tokens_seen,
                    grad_norm=grad_norm.item(),
                    estimated_finish=time.time()
                    + (time.monotonic() - loop_start) / steps_this_run * (t.max_steps - step),
                )
            )
            window_time, window_steps = 0.0, 0
        else:
            dt = time.monotonic() - ts
            train_time += dt
            window_time += dt
            window_steps += 1

        if step % t.eval_interval == 0 or last:
            if not log_step:
                final_loss = ranks.mean(loss_sum).item() / t.grad_accum_steps
            te = time.monotonic()
            val_loss, val_bpb = _evaluate(
                model, eval_model, eval_batches, eval_bytes, dev, precision, ranks
            )
            if val_loss < best_loss:
                best_loss, best_bpb, best_step, evals_since_best = val_loss, val_bpb, step, 0
                if ranks.is_main:
                    save_weights(hf_state_dict(model), best_path)
                have_best = True
            else:
                evals_since_best += 1
            hooks.on_eval(step, val_loss, val_bpb, best_loss, best_step)
            timings["eval"] += time.monotonic() - te
            if val_loss <= t.target_val_loss:
                _call(
                    hooks,
                    "on_log",
                    f"target reached at step {step}: val loss {val_loss:.4f} "
                    f"<= target_val_loss {t.target_val_loss:g}",
                )
                status = "target_reached"
                break
            if 0 < t.early_stopping_patience <= evals_since_best:
                _call(
                    hooks,
                    "on_log",
                    f"early stop at step {step}: no better val loss in "
                    f"{evals_since_best} evaluations (best {best_loss:.4f} at {best_step})",
                )
                status = "early_stopped"
                break

        if step % t.checkpoint_interval == 0 and not last:
            checkpoint()
            last_ckpt_step = step

    if math.isnan(final_loss) and steps_this_run:
        final_loss = ranks.mean(loss_sum).item() / t.grad_accum_steps
    # The final checkpoint lets a redelivered job skip straight to export.
    checkpoint(finished=status)
    return result(status)


def checkpoint_model_dir(
    ckpt_path: Path,
    out_dir: Path,
    metadata: dict[str, Any] | None = None,
    data_dir: Path | None = None,
) -> Path:
    """A Hugging Face-layout directory (weights, config, tokenizer) of a checkpoint's model,
    for `init_from`; the tokenizer is its attempt's: `data_dir`, or else
    `<job dir>/attempt-N/data` for a checkpoint in `<job dir>/checkpoints/attempt-N/`."""
    ckpt = load_checkpoint(Path(ckpt_path))
    spec = JobSpec.from_dict(ckpt["spec"])
    model = Llama(spec.model)
    t = spec.training
    if t.lora_rank:
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_target_list)
    model.load_state_dict(ckpt["model"])  # hf_state_dict below merges the adapters
    ckpt_path = Path(ckpt_path)
    if data_dir is None:
        data_dir = ckpt_path.parents[2] / ckpt_path.parent.name / "data"
    info = json.loads((data_dir / "meta.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(hf_state_dict(model), out / "model.safetensors")
    cfg = hf_config(spec.model, eos_token_id=info["eos_token_id"])
    write_file_atomic(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    if metadata is not None:  # an exported checkpoint: metadata.json as finalize writes it
        data = {
            "preset": spec.preset,
            "spec": spec.to_dict(),
            "seed": spec.training.seed,
            "parameters": dataclasses.asdict(count_parameters(spec.model)),
            "tokenizer": {
                "kind": spec.model.tokenizer,
                "vocab_size": info["vocab_size"],
                "eos_token_id": info["eos_token_id"],
            },
            **metadata,
        }
        write_file_atomic(out / "metadata.json", (json.dumps(data, indent=2) + "\n").encode())
    return out


def finalize(
    result: TrainResult,
    spec: JobSpec,
    work_dir: Path,
    out_dir: Path,
    metadata: dict[str, Any],
) -> Path:
    """Writes the trained model into `out_dir` in the Hugging Face layout.

    Files: model.safetensors (the best weights), config.json (LlamaForCausalLM),
    tokenizer.json, and metadata.json (`metadata` over the spec, parameter counts, metrics,
    seed and tokenizer facts). Raises ValueError when the run has no best weights (it never
    evaluated). Returns `out_dir`.
    """
    if result.best_path is None or not Path(result.best_path).exists():
        raise ValueError("the run has no evaluated weights to export")
    work_dir, out = Path(work_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = work_dir / "data"
    info = json.loads((data_dir / "meta.json").read_text())
    write_file_atomic(out / "model.safetensors", Path(result.best_path).read_bytes())
    cfg = hf_config(spec.model, eos_token_id=info["eos_token_id"])
    write_file_atomic(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    data: dict[str, Any] = {
        "preset": spec.preset,
        "spec": spec.to_dict(),
        "seed": spec.training.seed,
        "parameters": dataclasses.asdict(count_parameters(spec.model)),
        "tokenizer": {
            "kind": spec.model.tokenizer,
            "vocab_size": info["vocab_size"],
            "eos_token_id": info["eos_token_id"],
        },
        "data": {
            "train_tokens": info["train_tokens"],
            "val_tokens": info["val_tokens"],
            "corpus_bytes": info.get("corpus_bytes"),
        },
        "metrics": {
            "status": result.status,
            "steps": result.steps,
            "best_val_loss": result.best_val_loss,
            "best_val_bits_per_byte": result.best_val_bpb,
            "best_step": result.best_step,
            "final_train_loss": result.final_loss,
            "tokens_seen": result.tokens_seen,
            "tokens_per_second": result.tokens_per_second,
            "wall_seconds": result.wall_seconds,
        },
    }
    data.update(metadata)
    write_file_atomic(out / "metadata.json", (json.dumps(data, indent=2) + "\n").encode())
    return out


__all__ = [
    "DataInfo",
    "Progress",
    "TrainHooks",
    "TrainResult",
    "finalize",
    "load_checkpoint",
    "lr_at",
    "resolve_precision",
    "train",
    "use_compile",
]
