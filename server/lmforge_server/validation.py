"""CreateJob(validate_only): what a job would do, and what is wrong with it, before it runs.

Arithmetic over the resolved spec and the dataset record, plus the training throughput
workers measured per device class (FLOP/s, a moving average kept in Redis by
`record_throughput`; before any is measured, the operator's `fallback_training_flops` for
"cpu"). With `init_from`, the base tokenizer encodes every distinct character of the corpus
once: those it drops are reported as lost.
Token counts are exact for the `char` and `byte` tokenizers and estimated for the others
(about 4 bytes per token for a trained BPE on English text).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge_server import specs
from lmforge_server import store as st

THROUGHPUT_KEY = f"{st.P}throughput"
BYTES_PER_BPE_TOKEN = 4.0
# Training FLOP/s assumed for "cpu" until a worker has measured one (Settings default).
FALLBACK_FLOPS = 2e10
# Weight of a new measurement in the moving average of a device class's throughput.
THROUGHPUT_WEIGHT = 0.3
# Per layer, B x heads x T x T values kept for backward: the scores and their softmax.
ATTENTION_SCORE_COPIES = 2
# Lost characters shown by name in the problem message.
SHOWN_LOST = 10


@dataclass
class Report:
    corpus_tokens: int
    tokens_exact: bool
    vocab_size: int
    train_tokens: int
    val_tokens: int
    training_flops: int
    weights_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    # Device class ("cpu", a CUDA device name) -> seconds, from measured throughput.
    estimated_seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    characters_lost: int = 0
    estimate_measured: bool = False
    trainable_parameters: int = 0


def corpus_tokens(tokenizer: str, num_chars: int, size_bytes: int) -> tuple[int, bool]:
    """Tokens of the corpus after tokenisation and whether the count is exact."""
    if tokenizer == "char":
        return num_chars, True
    if tokenizer == "byte":
        return size_bytes, True
    return int(size_bytes / BYTES_PER_BPE_TOKEN), False


def report(
    spec: specs.JobSpec,
    dataset: st.DatasetRecord,
    throughput: dict[str, float],
    val_set: st.DatasetRecord | None = None,
    fallback_flops: float = FALLBACK_FLOPS,
) -> Report:
    m, t = spec.model, spec.training
    tokens, exact = corpus_tokens(m.tokenizer, dataset.num_chars, dataset.size_bytes)
    if val_set is None:
        n_val = int(round(tokens * t.val_fraction))
        n_train = tokens - n_val
    else:  # all of the dataset trains; the validation set is encoded by the same tokenizer
        n_val, val_exact = corpus_tokens(m.tokenizer, val_set.num_chars, val_set.size_bytes)
        n_train, exact = tokens, exact and val_exact
        tokens += n_val
    params = specs.count_parameters(m)
    # Gradients and AdamW's two moments exist only for what trains (LoRA: the adapters).
    trainable = specs.trainable_parameters(spec)
    tokens_per_step = t.batch_size * t.grad_accum_steps * m.context_length
    # LoRA's frozen weights need no weight gradients: fewer FLOPs than 6N per token.
    flops = specs.training_flops_per_token(spec) * tokens_per_step * t.max_steps
    # fp32 weights, AdamW's two moments plus the gradients; activations: about 34 values
    # per token, layer and width (attention and SwiGLU MLP saved for backward) plus logits,
    # and per layer the attention scores and their softmax (B x heads x T x T each) that an
    # attention materialising them keeps for backward (fused kernels keep less: an upper
    # bound, and the term that grows with the square of the context).
    micro_tokens = t.batch_size * m.context_length
    activations = 4 * (
        micro_tokens * (34 * m.n_layers * m.d_model + 2 * m.vocab_size)
        + m.n_layers * ATTENTION_SCORE_COPIES * t.batch_size * m.n_heads * m.context_length**2
    )
    problems = []
    for name, n in (("train", n_train), ("validation", n_val)):
        if n < m.context_length + 1:
            problems.append(
                f"the {name} split would hold {n} tokens; context length {m.context_length} "
                f"needs at least {m.context_length + 1} (a longer corpus, a shorter context "
                "or another val_fraction)"
            )
    if 0 < n_train < t.batch_size * m.context_length:
        problems.append(
            f"one batch ({t.batch_size} x {m.context_length} tokens) is larger than the "
            f"train split ({n_train} tokens): every step sees the same text many times"
        )
    epochs = tokens_per_step * t.max_steps / max(1, n_train)
    if epochs > 100:
        problems.append(
            f"{t.max_steps} steps read the train split {epochs:.0f} times over: expect "
            "overfitting (fewer steps, or early_stopping_patience / target_val_loss)"
        )
    measured = bool(throughput)
    if not measured:
        throughput = {"cpu": fallback_flops}
    return Report(
        corpus_tokens=tokens,
        tokens_exact=exact,
        vocab_size=m.vocab_size,
        train_tokens=n_train,
        val_tokens=n_val,
        training_flops=flops,
        weights_bytes=4 * params.total,
        optimizer_bytes=12 * trainable,
        activations_bytes=activations,
        estimated_seconds={k: flops / v for k, v in throughput.items() if v > 0},
        problems=problems,
        estimate_measured=measured,
        trainable_parameters=trainable,
    )


def throughputs(store: st.Store) -> dict[str, float]:
    return {k: float(v) for k, v in store.r.hgetall(THROUGHPUT_KEY).items()}


def record_throughput(store: st.Store, device_class: str, flops_per_second: float) -> None:
    """Folds a worker's measured training FLOP/s into its device class's moving average
    (the first measurement is taken as it is)."""
    if flops_per_second <= 0:
        return
    old = store.r.hget(THROUGHPUT_KEY, device_class)
    new = flops_per_second
    if old:  # two workers finishing at once may each miss the other's sample: harmless
        new = (1 - THROUGHPUT_WEIGHT) * float(old) + THROUGHPUT_WEIGHT * flops_per_second
    store.r.hset(THROUGHPUT_KEY, device_class, f"{new:.6g}")


def lost_characters(tokenizer_json: Path, corpora: list[Path]) -> tuple[int, list[str]]:
    """How many characters of `corpora` the tokenizer cannot encode (encode then decode
    does not give them back), and which ones, most frequent first."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    counts: Counter[str] = Counter()
    for path in corpora:  # one pass each, in C (str.count per distinct char is quadratic)
        counts.update(path.read_text(encoding="utf-8", errors="replace"))
    lost = [c for c in counts if tok.decode(tok.encode(c).ids) != c]
    lost.sort(key=lambda c: (-counts[c], c))
    return sum(counts[c] for c in lost), lost


def add_lost_characters(report: Report, tokenizer_json: Path, corpora: list[Path]) -> None:
    """Counts what init_from's tokenizer drops of the corpus into `report`."""
    n, lost = lost_characters(tokenizer_json, corpora)
    report.characters_lost = n
    if n:
        shown = ", ".join(repr(c) for c in lost[:SHOWN_LOST])
        more = f" and {len(lost) - SHOWN_LOST} more" if len(lost) > SHOWN_LOST else ""
        report.problems.append(
            f"init_from's tokenizer cannot encode {len(lost)} distinct characters of the "
            f"corpus ({n} occurrences: {shown}{more}); training never sees them"
        )
