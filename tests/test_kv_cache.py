"""The static KV cache: slots of the full context that ONNX Runtime writes in place.

Every graph variant runs on one `KVCache` through `OrtModel.run` as the scheduler drives it
(right-padded prefill of adjacent slots, batched decode of rows at different lengths, a
slot reused after its request left, a prompt prefilled in chunks) and must give the
logits of each sequence run alone: PyTorch's for fp32 (<= 1e-4 of the logits' scale), the
same graph's own (concatenating its cache, no batch) for int8 and int4.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _scheduler_runs import Collector, alone
from test_variants import outlier_model, trained_model  # noqa: F401  (the fixtures)

from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import PrefixCache, Scheduler, make_requests
from lmforge_server.inference.session import CPU_EP, OrtModel
from lmforge_worker.export import input_names
from lmforge_worker.model import load_pretrained

pytestmark = pytest.mark.slow


class Alone:
    """Last-token logits of a whole sequence run by itself: PyTorch (fp32) or the graph."""

    def __init__(self, path, model: OrtModel):
        self.model = model
        if model.variant == "fp32":
            self.torch_model, _ = load_pretrained(path)
            self.torch_model.eval()
        else:
            self.torch_model = None
            self.sess = ort.InferenceSession(
                str(path / f"model_{model.variant}.onnx"), providers=[CPU_EP]
            )

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> np.ndarray:
        if self.torch_model is not None:
            logits, _ = self.torch_model(torch.tensor([ids]), last_only=True)
            return logits[0, -1].numpy()
        m = self.model.graph
        empty = np.zeros((1, m.n_kv_heads, 0, m.head_dim), np.float32)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "seqlens_k": np.array([len(ids) - 1], np.int32),
            "total_sequence_length": np.array(len(ids), np.int32),
        }
        n_layers = len(m.past_names) // 2
        feeds.update({name: empty for name in input_names(n_layers)[3:]})
        return self.sess.run(None, feeds)[0][0, -1]


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_every_variant_on_the_slot_cache_matches_each_sequence_alone(outlier_model, variant):  # noqa: F811
    model = OrtModel(outlier_model, providers=[CPU_EP], variant=variant)
    assert model.variant == variant
    alone = Alone(outlier_model, model)
    cache = model.new_cache(3)
    seqs = [model.encode("ROMEO: wh"), model.encode("JULIET: O Romeo")]
    lens = [len(s) for s in seqs]

    # Right-padded prefill of slots 0 and 1 in one call.
    ids = np.zeros((2, max(lens)), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
    logits = model.run(cache, ids, [n - 1 for n in lens], 0)
    for r, s in enumerate(seqs):
        assert close(logits[r], alone(s)), (variant, "prefill", r)
    # Written in place: the prompt's keys are in the slot, the rest untouched.
    assert np.abs(cache.buffers[0][0, :, : lens[0]]).max() > 0
    assert np.abs(cache.buffers[0][0, :, lens[0] + 16 :]).max() == 0

    def decode(steps):
        for _ in range(steps):
            nxt = [int(alone(s).argmax()) for s in seqs]
            out = model.run(cache, np.array([[t] for t in nxt]), [len(s) for s in seqs], 0)
            for s, t in zip(seqs, nxt, strict=True):
                s.append(t)
            for r, s in enumerate(seqs):
                assert close(out[r], alone(s)), (variant, "decode", r, len(s))

    decode(4)
    # Slot 0's request leaves; a shorter one takes the slot over its stale keys.
    seqs[0] = model.encode("A")
    logits = model.run(cache, np.array([seqs[0]]), [len(seqs[0]) - 1], 0)
    assert close(logits[0], alone(seqs[0])), (variant, "reused slot")
    decode(4)

    # A long prompt prefilled in slot 2 in two chunks.
    long = model.encode("First Citizen: Before we proceed")
    model.run(cache, np.array([long[:12]]), [11], 2)
    logits = model.run(cache, np.array([long[12:]]), [len(long) - 1], 2)
    assert close(logits[0], alone(long)), (variant, "chunked")


def test_decode_steps_of_changing_batch_sizes_each_match_the_sequence_alone(outlier_model):  # noqa: F811
    """Decode steps reuse an IO binding per batch size (its inputs and logits rewritten in
    place): steps of 3, 1 and 2 rows interleaved on one cache must each see their own
    tokens and lengths, never those a binding of another size last held (they share one set of arrays per cache)."""
    model = OrtModel(outlier_model, providers=[CPU_EP])
    alone = Alone(outlier_model, model)
    cache = model.new_cache(3)
    seqs = [model.encode(p) for p in ("ROMEO: wh", "JULIET: O Romeo", "First Citizen:")]
    lens = [len(s) for s in seqs]
    ids = np.zeros((3, max(lens)), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
    model.run(cache, ids, [n - 1 for n in lens], 0)
    for B in (3, 1, 2, 3, 1, 1, 2):
        nxt = [int(alone(s).argmax()) for s in seqs[:B]]
        out = model.run(cache, np.array([[t] for t in nxt]), [len(s) for s in seqs[:B]], 0)
        got = out.copy()
        for s, t in zip(seqs, nxt, strict=False):
            s.append(t)
        for r in range(B):
            assert close(got[r], alone(seqs[r])), (B, r, len(seqs[r]))


def test_rows_past_the_cache_slots_are_refused_before_ort_writes_there(outlier_model):  # noqa: F811
    model = OrtModel(outlier_model, providers=[CPU_EP])
    cache = model.new_cache(2)
    ids = model.encode("ROMEO:")
    with pytest.raises(ValueError, match="outside 2 slots"):
        model.run(cache, np.array([ids, ids]), [len(ids) - 1] * 2, 1)
    with pytest.raises(ValueError, match="outside 2 slots"):
        model.run(cache, np.array([[1], [2], [3]]), [0, 0, 0], 0)
    assert np.abs(cache.buffers[0]).max() == 0


def test_a_prompt_between_chunks_below_a_running_row_keeps_its_cache(outlier_model):  # noqa: F811
    """Slot 0 holds a long prompt prefilled a chunk per turn while slot 1 decodes: the decode
    steps run slot 0 as a throwaway row, which must not spoil the chunks already written."""
    model = OrtModel(outlier_model, providers=[CPU_EP])
    long_prompt, short_prompt = "First Citizen: Before we proceed any further", "ROMEO:"
    want = [alone(model, long_prompt, 10), alone(model, short_prompt, 30)]
    sched = Scheduler(
        model, max_batch_size=2, prefix_cache=PrefixCache(max_bytes=0), prefill_chunk=8
    )
    try:
        outs = [Collector(), Collector()]
        with sched._cv:  # admitted in one turn: the long prompt takes slot 0
            for out, prompt, n in zip(outs, (long_prompt, short_prompt), (10, 30), strict=True):
                ids = model.encode(prompt)
                sched.submit(
                    make_requests(
                        model, ids, SamplingParams(temperature=0), out, model_id="m", max_new=n
                    )
                )
        got = [o.final() and o.tokens() for o in outs]
    finally:
        sched.close(wait=True)
    assert sched.prefill_calls >= 5  # the long prompt went in chunks
    assert got == want


def test_a_graph_from_before_the_static_cache_is_refused_naming_the_fix(outlier_model, tmp_path):  # noqa: F811
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from lmforge_server.inference.errors import ModelNotReady

    old = tmp_path / "old"
    shutil.copytree(outlier_model, old)
    (old / "variants.json").unlink()
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])], "old", [ids, mask], [out]
    )
    opset = [helper.make_opsetid("", 18)]
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=opset), str(old / "model.onnx"))
    with pytest.raises(ModelNotReady, match="export it again"):
        OrtModel(old, providers=[CPU_EP])


def test_prompts_through_the_prefill_graph_give_the_same_tokens_whole_chunked_or_reused(
    trained_model,  # noqa: F811
):
    """int4 on the CPU: prompt tokens run through the w8a8 prefill graph, generated ones through
    the int4 graph, on one KV cache. A prompt whole, in chunks (one-token chunks too), or on
    top of a reused prefix gives the same greedy tokens: activations are quantised per row,
    so no row's numbers depend on what else was in the call."""
    model = OrtModel(trained_model, providers=[CPU_EP], variant="int4")
    assert model.prefill_info is not None and model.prefill_graph is not model.graph
    prompt = model.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    n = 24

    def greedy(chunks: list[int], slot: int) -> tuple[np.ndarray, list[int]]:
        cache = model.new_cache(3)
        done = 0
        for c in [*chunks, len(prompt) - sum(chunks)]:
            ids = np.array([prompt[done : done + c]])
            logits = model.prefill(cache, ids, [done + c - 1], slot)
            done += c
        first = logits[0].copy()
        out = [int(first.argmax())]
        for _ in range(n - 1):
            step = model.run(cache, np.array([[out[-1]]]), [len(prompt) + len(out) - 1], slot)
            out.append(int(step[0].argmax()))
        return first, out

    whole_logits, whole = greedy([], 0)
    for chunks, slot in (([8, 8, 8], 2), ([1, 1, 1, 20], 0), ([13, 1], 1)):
        logits, tokens = greedy(chunks, slot)
        assert tokens == whole, chunks
        assert np.abs(logits - whole_logits).max() <= 1e-3 * np.abs(whole_logits).max(), chunks

    # Prefix reuse on the scheduler: the second prompt reuses the first one's prefix cache.
    prefix = "First Citizen:\nBefore we proceed any further, hear me"
    first, second = prefix + " speak.\n", prefix + " now, all.\n"
    want = alone(model, second, n)
    sched = Scheduler(model, max_batch_size=2)
    try:
        outs = []
        for text in (first, second):
            out = Collector()
            ids = model.encode(text)
            params = SamplingParams(temperature=0)
            sched.submit(make_requests(model, ids, params, out, model_id="m", max_new=n))
            outs.append(out)
            out.final()
    finally:
        sched.close(wait=True)
    assert outs[0].tokens() == whole
    assert outs[1].final().cached_prompt_tokens >= 16
    assert outs[1].tokens() == want
