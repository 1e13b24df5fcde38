"""Quantised graph variants: exported beside fp32, scored, gated, served by name or default.

One tiny model exported once with its int8 and int4 variants (real onnxruntime
quantisation, real ONNX Runtime sessions, a real gRPC server on loopback). Its weights
carry outliers (one large weight in every block of 32) so 4-bit and int8 quantisation
lose real quality: the gate must catch that from the validation loss alone.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from _scheduler_runs import Collector, alone
from _tiny_models import CORPUS, EXTRA_CHARS, _cache_salt, tiny_config
from test_inference_server import ServerThread, settings

from lmforge.v1 import inference_pb2, inference_pb2_grpc
from lmforge_server.inference.resolver import DirectoryResolver
from lmforge_server.inference.sampling import SamplingParams
from lmforge_server.inference.scheduler import PrefixCache, Scheduler, make_requests
from lmforge_server.inference.session import CPU_EP, OrtModel, choose_variant, read_variants
from lmforge_server.specs import ModelConfig

pytestmark = pytest.mark.slow


def _eval_tokens(tok) -> np.ndarray:
    return np.asarray(tok.encode(CORPUS[20000:24000]).ids)


def _train_briefly(model, tok, steps: int = 150) -> None:
    """A few seconds of training on the corpus: a random model's validation loss cannot
    tell a good quantised graph from a bad one (it may even improve), a trained one's can."""
    data = torch.tensor(tok.encode(CORPUS[:20000]).ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i : i + 64] for i in ix])
        y = torch.stack([data[i + 1 : i + 65] for i in ix])
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _variants_model(tmp_path_factory, kind: str) -> Path:
    """A tiny model dir with fp32, int8 and int4 graphs, the prefill graph and variants.json
    (cached on disk).

    kind "outliers": random weights scaled by 20 (so greedy text varies with the context)
    with an outlier per quantisation block (4-bit weights fail the gate); "trained": briefly
    trained; "activations": the trained model's function with one hidden channel 100x
    larger going into every projection (its weights' rows 100x smaller), as real LLMs'
    outlier channels are: one int8 scale per activation row then leaves the other channels
    a level or two, so the w8a8 prefill graph fails the gate (at this width, 32 = one block,
    the MatMulNBits variants' int8 activations fail it too).
    """
    from lmforge_worker.export import export_onnx
    from lmforge_worker.model import Llama, save_pretrained
    from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

    tok = build_tokenizer("char", CORPUS[:20000] + EXTRA_CHARS)
    cfg = ModelConfig(**{**tiny_config().__dict__, "vocab_size": tok.get_vocab_size()})
    # Keyed by this recipe's source too: a changed recipe rebuilds.
    recipe = inspect.getsource(_variants_model) + inspect.getsource(_train_briefly)
    key = hashlib.sha256(json.dumps([cfg.__dict__, kind, recipe, _cache_salt()]).encode())
    cache = Path(tempfile.gettempdir()) / "lmforge-test-models" / f"var-{key.hexdigest()[:20]}"
    if not (cache / "variants.json").is_file():
        torch.manual_seed(0)
        model = Llama(cfg)
        if kind != "outliers":
            _train_briefly(model, tok)
        model.eval()
        sd = model.state_dict()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2 and kind == "outliers":
                    p.mul_(20.0)
                    p[:, ::32] *= 30  # an outlier per quantisation block
            for i in range(cfg.n_layers if kind == "activations" else 0):
                pre = f"model.layers.{i}."
                for norm, projs in (
                    ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                    ("post_attention_layernorm", ("gate_proj", "up_proj")),
                ):
                    sd[f"{pre}{norm}.weight"][0] *= 100
                    for proj in projs:
                        mod = "self_attn" if proj[0] in "qkv" else "mlp"
                        sd[f"{pre}{mod}.{proj}.weight"][:, 0] /= 100
        tmp = cache.with_name(f"{cache.name}.tmp-{torch.randint(1 << 30, ()).item()}")
        save_pretrained(model, tmp)
        save_tokenizer(tok, tmp / "tokenizer.json")
        export_onnx(tmp, parity_limit=1.0, eval_tokens=_eval_tokens(tok))
        try:
            tmp.rename(cache)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    dest = tmp_path_factory.mktemp("models") / {"outliers": "outliers"}.get(kind, kind)
    shutil.copytree(cache, dest)
    return dest


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    return _variants_model(tmp_path_factory, "outliers")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    return _variants_model(tmp_path_factory, "trained")


@pytest.fixture(scope="module")
def activation_outlier_model(tmp_path_factory) -> Path:
    return _variants_model(tmp_path_factory, "activations")


def test_every_variant_is_written_with_parity_loss_and_speed(outlier_model):
    listing = json.loads((outlier_model / "variants.json").read_text())
    by_name = {v["variant"]: v for v in listing["variants"]}
    assert set(by_name) == {"fp32", "int8", "int4"} and listing["quality_gate"] == 0.01
    for v in by_name.values():
        assert (outlier_model / v["file"]).stat().st_size == v["bytes"]
        assert v["val_loss"] > 0 and v["decode_ms_per_token"] > 0
        assert np.isfinite(v["max_abs_logit_diff"])
    assert by_name["fp32"]["max_abs_logit_diff"] <= 1e-4 * 20**2  # scaled weights, scaled logits
    # 4-bit weights are smaller than 8-bit ones, which are smaller than fp32.
    assert by_name["int4"]["bytes"] < by_name["int8"]["bytes"] < by_name["fp32"]["bytes"]


def test_export_times_decode_on_the_slot_cache_the_server_uses(outlier_model, monkeypatch):
    """decode_ms_per_token (what picks the served default) times the graph as the server runs
    it: steps on one slot of the full context, written in place, not a growing cache."""
    from lmforge_server.inference.session import SlotGraph
    from lmforge_worker.export import decode_ms_per_token
    from lmforge_worker.model import load_pretrained

    _, cfg = load_pretrained(outlier_model)
    seen = []
    real_run = SlotGraph.run

    def watched(self, cache, input_ids, seqlens_k, first_slot=0):
        seen.append((cache.slots, cache.context, input_ids.shape, list(seqlens_k)))
        return real_run(self, cache, input_ids, seqlens_k, first_slot)

    monkeypatch.setattr(SlotGraph, "run", watched)
    ms = decode_ms_per_token(outlier_model / "model_int8.onnx", cfg, steps=4, repeats=1)
    assert ms > 0
    assert {(slots, ctx) for slots, ctx, _, _ in seen} == {(1, cfg.context_length)}
    # A prompt, then one token per step at the next position of the same slot.
    prompt = seen[0][2][1]
    assert [shape for _, _, shape, _ in seen[1:]] == [(1, 1)] * 4
    assert [lens[0] for *_, lens in seen] == [prompt - 1 + i for i in range(5)]


def test_quality_gate_fails_variants_more_than_one_percent_worse(outlier_model):
    by_name = {v["variant"]: v for v in read_variants(outlier_model)}
    ref = by_name["fp32"]["val_loss"]
    for name in ("int8", "int4"):
        v = by_name[name]
        assert v["passes_quality_gate"] == (v["val_loss"] <= ref * 1.01)
    # The outliers cost 4-bit weights far more than the gate allows; 8-bit blocks keep up.
    assert not by_name["int4"]["passes_quality_gate"]
    assert by_name["int4"]["val_loss"] > ref * 1.2


def test_default_is_the_fastest_variant_that_passes_the_gate():
    variants = [
        {"variant": "fp32", "passes_quality_gate": True, "decode_ms_per_token": 1.6},
        {"variant": "int8", "passes_quality_gate": True, "decode_ms_per_token": 1.1},
        {"variant": "int4", "passes_quality_gate": False, "decode_ms_per_token": 0.7},
        {"variant": "fp16", "passes_quality_gate": True, "decode_ms_per_token": 0.1},
    ]
    assert choose_variant(variants, cuda=False)["variant"] == "int8"
    assert choose_variant(variants, "int4", cuda=False)["variant"] == "int4"
    assert choose_variant(variants, cuda=True)["variant"] == "fp16"
    variants[1]["passes_quality_gate"] = False
    assert choose_variant(variants, cuda=False)["variant"] == "fp32"


def test_a_bad_quantised_graph_is_not_served_by_default_but_can_be_named(outlier_model):
    # Figures as a machine where 4-bit is fastest would measure them: the gate still wins.
    path = outlier_model / "variants.json"
    listing = json.loads(path.read_text())
    for v in listing["variants"]:
        v["decode_ms_per_token"] = {"fp32": 2.0, "int8": 1.0, "int4": 0.5}[v["variant"]]
    path.write_text(json.dumps(listing))
    root = outlier_model.parent
    s = ServerThread(settings(), DirectoryResolver(root))
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model="outliers"))
            passing = [v["variant"] for v in listing["variants"] if v["passes_quality_gate"]]
            assert info.variant == ("int8" if "int8" in passing else "fp32")
            reported = {v.variant: v for v in info.variants}
            assert set(reported) == {"fp32", "int8", "int4"}
            for v in listing["variants"]:
                r = reported[v["variant"]]
                assert (r.passes_quality_gate, r.bytes) == (v["passes_quality_gate"], v["bytes"])
                assert r.val_loss == pytest.approx(v["val_loss"], rel=1e-6)
                assert r.decode_ms_per_token == pytest.approx(v["decode_ms_per_token"])
                assert r.max_abs_logit_diff == pytest.approx(v["max_abs_logit_diff"], rel=1e-6)
            named = stub.GetModelInfo(
                inference_pb2.GetModelInfoRequest(model="outliers", variant="int4")
            )
            assert named.variant == "int4"
            # A request naming the variant gets that graph's tokens.
            req = inference_pb2.GenerateRequest(
                model="outliers",
                prompt="ROMEO:",
                variant="int4",
                sampling=inference_pb2.SamplingParams(temperature=0, max_new_tokens=12),
            )
            got = list(stub.Generate(req, timeout=60).token_ids)
        assert got == alone(OrtModel(outlier_model, providers=[CPU_EP], variant="int4"), "ROMEO:")
    finally:
        s.stop()


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_each_variant_batched_with_joins_and_leaves_matches_itself_alone(outlier_model, variant):
    """Left-padded batches and slots reused after a request leaves change nothing."""
    model = OrtModel(outlier_model, providers=[CPU_EP], variant=variant)
    prompts = ["ROMEO:", "JULIET: O", "A", "What, ho!", "First Citizen:"]
    lengths = [12, 4, 9, 12, 6]
    want = [alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    sched = Scheduler(model, max_batch_size=3, prefix_cache=PrefixCache(max_bytes=0))
    try:
        outs = []
        for p, n in zip(prompts, lengths, strict=True):
            out = Collector()
            ids = model.encode(p)
            params = SamplingParams(temperature=0)
            sched.submit(make_requests(model, ids, params, out, model_id="m", max_new=n))
            outs.append(out)
        got = [o.final() and o.tokens() for o in outs]
    finally:
        sched.close(wait=True)
    assert got == want


# --- the w8a8 prefill graph --------------------------------------------------------------------


def _torch_last_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), last_only=True)
    return logits[0, -1].numpy()


def test_prefill_graph_is_written_gated_and_matches_pytorch(trained_model):
    """The prefill graph (int8 weights, int8 activations per row) is listed with its parity
    and validation loss, passes the 1% gate here, and its prompt logits (right-padded batch,
    several lengths) stay close to PyTorch's with the same greedy token."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from lmforge_server.inference.session import SlotGraph, read_prefill
    from lmforge_worker.model import load_pretrained

    listing = json.loads((trained_model / "variants.json").read_text())
    pre, ref = read_prefill(trained_model), listing["variants"][0]
    assert pre == listing["prefill"] and ref["variant"] == "fp32"
    assert pre["file"] == "model_prefill.onnx" and pre["kind"] == "w8a8"
    assert pre["prefill_for"] == ["int8", "int4"]
    assert (trained_model / pre["file"]).stat().st_size == pre["bytes"]
    assert pre["prefill_ms"] > 0
    # Export's parity (prompt and decode steps): within twice the int8 weight-only graph's.
    int8 = next(v for v in listing["variants"] if v["variant"] == "int8")
    assert pre["max_abs_logit_diff"] <= 2 * int8["max_abs_logit_diff"]
    assert pre["passes_quality_gate"] == (pre["val_loss"] <= ref["val_loss"] * 1.01)
    assert pre["passes_quality_gate"]

    torch_model, _ = load_pretrained(trained_model)
    torch_model.eval()
    graph = SlotGraph(ort.InferenceSession(str(trained_model / pre["file"]), providers=[CPU_EP]))
    tok = Tokenizer.from_file(str(trained_model / "tokenizer.json"))
    seqs = [tok.encode(CORPUS[i : i + n]).ids for i, n in ((30000, 5), (31000, 23), (32000, 60))]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
    logits = graph.run(graph.new_cache(len(seqs), 96), ids, [len(s) - 1 for s in seqs])
    for r, s in enumerate(seqs):
        want = _torch_last_logits(torch_model, s)
        # Measured: 0.7-1.5% of the largest logit (the int8 weight-only graph 0.5-1.1%).
        assert np.abs(logits[r] - want).max() <= 0.03 * np.abs(want).max(), r
        assert logits[r].argmax() == want.argmax(), r


def test_a_prefill_graph_that_fails_the_gate_is_never_used(trained_model, activation_outlier_model):
    """The gate refuses a bad prefill graph: prompts then run through the variant's own graph
    (same tokens as with the prefill graph switched off), and ModelInfo names no prefill
    graph; where it passed, ModelInfo reports it with its size."""
    pre = json.loads((activation_outlier_model / "variants.json").read_text())["prefill"]
    ref = read_variants(activation_outlier_model)[0]["val_loss"]
    assert not pre["passes_quality_gate"] and pre["val_loss"] > ref * 1.01

    model = OrtModel(activation_outlier_model, providers=[CPU_EP], variant="int8")
    assert model.prefill_info is None and model.prefill_graph is model.graph
    assert model.prefill_bytes == 0
    off = OrtModel(
        activation_outlier_model, providers=[CPU_EP], variant="int8", prefill_graph=False
    )
    assert alone(model, "ROMEO: wherefore") == alone(off, "ROMEO: wherefore")

    root = trained_model.parent
    shutil.copytree(activation_outlier_model, root / "activations")
    s = ServerThread(settings(), DirectoryResolver(root))
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            bad = stub.GetModelInfo(
                inference_pb2.GetModelInfoRequest(model="activations", variant="int8")
            )
            assert bad.variant == "int8" and not bad.HasField("prefill")
            good = stub.GetModelInfo(
                inference_pb2.GetModelInfoRequest(model="trained", variant="int8")
            )
            assert good.HasField("prefill") and good.prefill.variant == "prefill"
            assert good.prefill.passes_quality_gate
            assert good.prefill.bytes == (trained_model / "model_prefill.onnx").stat().st_size
            fp32 = stub.GetModelInfo(
                inference_pb2.GetModelInfoRequest(model="trained", variant="fp32")
            )
            assert not fp32.HasField("prefill")  # fp32 prompts run through fp32
    finally:
        s.stop()
