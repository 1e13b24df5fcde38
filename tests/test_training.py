"""The training loop on the tiny preset: learning, cancel, exact resume, early stop, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge_server.specs import count_parameters, resolve
from lmforge_worker.model import load_pretrained
from lmforge_worker.tokenization import load_tokenizer
from lmforge_worker.training import Progress, finalize, load_checkpoint, lr_at, train

torch.set_num_threads(1)

CORPUS = Path(__file__).resolve().parents[1] / "server/lmforge_server/data/tinyshakespeare.txt"
TEXT = CORPUS.read_text(encoding="utf-8")[:30000]


class Recorder:
    """Hooks that record what the loop reports and stop it at a chosen step."""

    def __init__(self, stop_at: int | None = None, reason: str = "cancel"):
        self.stop_at, self.reason = stop_at, reason
        self.progress: list[Progress] = []
        self.evals: list[tuple] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.logs: list[str] = []

    def should_stop(self):
        step = self.progress[-1].step if self.progress else 0
        return self.reason if self.stop_at is not None and step >= self.stop_at else None

    def on_progress(self, p: Progress) -> None:
        self.progress.append(p)

    def on_eval(self, step, val_loss, val_bpb, best_val_loss, best_step) -> None:
        self.evals.append((step, val_loss, val_bpb, best_val_loss, best_step))

    def on_checkpoint(self, step: int, path: Path) -> None:
        assert path.exists()
        self.checkpoints.append((step, path))

    def on_log(self, message: str) -> None:
        self.logs.append(message)


def tiny_spec(text: str = TEXT, **training):
    return resolve("tiny", {}, training, num_distinct_chars=len(set(text)))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_loss_falls_and_finalize_writes_a_loadable_model(tmp_path, corpus):
    spec = tiny_spec()
    hooks = Recorder()
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks)
    assert result.status == "completed"
    assert result.steps == spec.training.max_steps == hooks.progress[-1].step
    # Uniform guessing over ~60 characters is ln(60) ~ 4.1 nats.
    assert hooks.progress[0].loss > 3.5
    assert result.final_loss < hooks.progress[0].loss - 0.5
    assert [e[0] for e in hooks.evals] == [20, 40, 60]
    assert result.best_val_loss == min(e[1] for e in hooks.evals) < 3.4
    assert 0 < result.best_val_bpb < result.best_val_loss / 0.693 + 1e-6
    p = hooks.progress[-1]
    assert p.tokens_seen == 60 * 8 * 32 and p.tokens_per_second > 0 and p.eta_seconds == 0
    assert p.lr == pytest.approx(lr_at(59, spec.training))
    assert result.best_path is not None and result.best_path.exists()
    # Interval checkpoints at 20 and 40, then the final one.
    assert [s for s, _ in hooks.checkpoints] == [20, 40, 60]

    out = finalize(result, spec, tmp_path / "work", tmp_path / "model", {"job_id": "j1"})
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metadata.json",
    }
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["job_id"] == "j1"
    assert meta["seed"] == spec.training.seed
    assert meta["parameters"]["total"] == count_parameters(spec.model).total
    assert meta["metrics"]["best_val_loss"] == result.best_val_loss
    model, cfg = load_pretrained(out)
    assert cfg == spec.model
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == cfg.vocab_size
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == cfg.vocab_size - 1
    # The exported weights are the best ones: they reproduce the best val loss's ballpark.
    ids = torch.tensor([tok.encode(TEXT[-2000:-1967]).ids])
    with torch.no_grad():
        logits, _ = model.eval()(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    assert loss < 3.5


def test_cancel_stops_with_a_checkpoint(tmp_path, corpus):
    spec = tiny_spec()
    hooks = Recorder(stop_at=10, reason="cancel")
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks)
    assert result.status == "cancelled"
    assert result.steps == 10
    step, path = hooks.checkpoints[-1]
    assert step == 10 and path.exists()
    assert load_checkpoint(path)["step"] == 10

    shutdown = Recorder(stop_at=5, reason="shutdown")
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt2", shutdown)
    assert result.status == "interrupted" and result.steps == 5


@pytest.mark.slow  # two training runs
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, corpus):
    # Dropout on, so the global RNG state must be restored too; accumulation and clipping on.
    spec = resolve(
        "tiny",
        {"dropout": 0.1},
        {"max_steps": 30, "eval_interval": 10, "checkpoint_interval": 100, "grad_accum_steps": 2},
        num_distinct_chars=len(set(TEXT)),
    )
    straight = train(spec, corpus, tmp_path / "a", tmp_path / "a" / "ckpt", Recorder())

    first = Recorder(stop_at=15, reason="shutdown")
    part = train(spec, corpus, tmp_path / "b", tmp_path / "b" / "ckpt-1", first)
    assert part.status == "interrupted" and part.steps == 15
    _, ckpt = first.checkpoints[-1]
    second = Recorder()
    resumed = train(
        spec, corpus, tmp_path / "b", tmp_path / "b" / "ckpt-2", second, resume_from=ckpt
    )
    assert resumed.status == "completed" and resumed.steps == 30
    assert second.progress[0].step == 20  # logging went on from step 15
    assert resumed.final_loss == straight.final_loss
    assert resumed.best_val_loss == straight.best_val_loss
    assert resumed.best_step == straight.best_step
    assert resumed.tokens_seen == straight.tokens_seen
    assert resumed.best_path.read_bytes() == straight.best_path.read_bytes()
    a = load_checkpoint(sorted((tmp_path / "a" / "ckpt").glob("*.pt"))[-1])["model"]
    b = load_checkpoint(sorted((tmp_path / "b" / "ckpt-2").glob("*.pt"))[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Resuming from the final checkpoint returns at once with the same result.
    again = train(
        spec,
        corpus,
        tmp_path / "b",
        tmp_path / "b" / "ckpt-3",
        Recorder(),
        resume_from=sorted((tmp_path / "b" / "ckpt-2").glob("*.pt"))[-1],
    )
    assert (again.status, again.steps, again.best_val_loss) == (
        "completed",
        30,
        straight.best_val_loss,
    )


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    # Train on "abab…", validate on "aaaa…": once the model learns that a is followed by b,
    # validation only gets worse.
    text = "ab" * 900 + "a" * 200
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    spec = tiny_spec(
        text,
        max_steps=200,
        eval_interval=5,
        early_stopping_patience=2,
        warmup_steps=0,
        val_fraction=0.1,
    )
    hooks = Recorder()
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks)
    assert result.status == "early_stopped"
    assert result.steps == result.best_step + 2 * 5 < 200
    assert [e[0] for e in hooks.evals] == list(range(5, result.steps + 1, 5))
    assert all(e[1] >= result.best_val_loss for e in hooks.evals[-2:])
    assert any("early stop" in m for m in hooks.logs)


def test_corpus_shorter_than_the_context_is_rejected(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("too short")
    with pytest.raises(ValueError, match="context length"):
        train(tiny_spec("too short"), corpus, tmp_path / "w", tmp_path / "c", Recorder())


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    t = tiny_spec().training
    assert lr_at(0, t) < lr_at(t.warmup_steps - 1, t) < t.learning_rate
    assert lr_at(t.warmup_steps, t) == pytest.approx(t.learning_rate)
    assert lr_at(t.max_steps, t) == pytest.approx(t.min_learning_rate)
    mids = [lr_at(s, t) for s in range(t.warmup_steps, t.max_steps)]
    assert mids == sorted(mids, reverse=True)


@pytest.mark.slow  # trains a base model, then fine-tunes it
def test_fine_tuning_starts_from_the_base_model_and_its_tokenizer(tmp_path, corpus):
    spec = tiny_spec(max_steps=40, eval_interval=40)
    base = train(spec, corpus, tmp_path / "w0", tmp_path / "c0", Recorder())
    base_dir = finalize(base, spec, tmp_path / "w0", tmp_path / "base", {})
    _, base_cfg = load_pretrained(base_dir)

    # A new corpus with characters the base never saw: the base tokenizer is kept.
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1] + "~{}", encoding="utf-8")
    ft_spec = resolve(
        "tiny",
        {},
        {"max_steps": 10, "eval_interval": 5, "init_from": str(base_dir)},
        num_distinct_chars=0,
        base_model=base_cfg,
    )
    hooks = Recorder()
    ft = train(ft_spec, other, tmp_path / "w1", tmp_path / "c1", hooks, init_weights_dir=base_dir)
    assert ft.status == "completed"
    assert (tmp_path / "w1/data/tokenizer.json").read_text() == (
        base_dir / "tokenizer.json"
    ).read_text()
    # It starts where the base left off, far below a fresh model's ~4 nats.
    assert hooks.progress[0].loss < base.final_loss + 0.3
