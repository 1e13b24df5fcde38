"""Tiny random-weight models, saved in the HF layout and exported to ONNX, for tests.

Exports are cached on disk by a hash of the config and of the model/export sources, so a
change to either rebuilds them and repeated runs skip the (seconds-long) dynamo export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from lmforge_server.specs import ModelConfig

CORPUS = (Path(__file__).parents[1] / "server/lmforge_server/data/tinyshakespeare.txt").read_text()
# Characters outside the corpus, so char and byte tokenizers see multibyte text.
EXTRA_CHARS = "éü€😀→"


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_model=32,
        intermediate_size=64,
        context_length=96,
        vocab_size=0,
        tokenizer="char",
    )
    base.update(overrides)
    return ModelConfig(**base)


def _cache_salt() -> str:
    """What a cached export depends on besides its config: our sources and the versions of
    the libraries that wrote and will read it (an export from another torch is rebuilt)."""
    import onnx
    import onnxruntime
    import tokenizers

    import lmforge_worker.export as export
    import lmforge_worker.graph as graph
    import lmforge_worker.model as model
    import lmforge_worker.tokenization as tokenization

    h = hashlib.sha256()
    for lib in (torch, onnx, onnxruntime, tokenizers):
        h.update(f"{lib.__name__}={lib.__version__};".encode())
    for mod in (export, graph, model, tokenization):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def build_model_dir(
    dest: Path, *, tokenizer: str = "char", seed: int = 0, weight_scale: float = 1.0, **overrides
) -> Path:
    """A model directory (model.onnx, tokenizer.json, config.json) at `dest`.

    `weight_scale` multiplies every matrix: at the default init a random model repeats one
    token; at 50 its greedy text varies with the context, which tests need.
    """
    from lmforge_worker.export import export_onnx
    from lmforge_worker.model import Llama, save_pretrained
    from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

    text = CORPUS[:20000] + EXTRA_CHARS
    tok = build_tokenizer(tokenizer, text)
    cfg = tiny_config(tokenizer=tokenizer, **overrides)
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": tok.get_vocab_size()})
    key = hashlib.sha256(
        json.dumps([cfg.__dict__, seed, weight_scale, _cache_salt()]).encode()
    ).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / "lmforge-test-models" / key
    if not (cache / "model.onnx").is_file():
        tmp = cache.with_name(f"{key}.tmp-{torch.randint(1 << 30, ()).item()}")
        torch.manual_seed(seed)
        model = Llama(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
        save_pretrained(model, tmp)
        save_tokenizer(tok, tmp / "tokenizer.json")
        try:
            # Scaled weights give logits in the hundreds: parity is relative to that.
            facts = export_onnx(tmp, parity_limit=1e-4 * max(1.0, weight_scale**2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "export.json").write_text(json.dumps(facts, default=str))
        try:
            tmp.rename(cache)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cache, dest)
    return dest


def load_torch(model_dir: Path):
    from lmforge_worker.model import load_pretrained

    model, _ = load_pretrained(model_dir)
    return model.eval()


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """Greedy continuation with the PyTorch model (the reference for the server)."""
    from lmforge_worker.model import generate

    out = generate(model, torch.tensor([ids]), n, eos_token_id=eos)[0, len(ids) :].tolist()
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return out


def build_cycle_model_dir(
    dest: Path, cycle: bytes, *, context_length: int = 96, eos_after: int | None = None
) -> Path:
    """A byte-tokenizer model whose greedy output repeats `cycle` (distinct bytes) forever.

    With `eos_after` (a byte of `cycle`), the model emits its end-of-text token after that
    byte instead of the cycle's next one.

    Attention and MLP write nothing (zeroed output projections), so the next token depends
    on the current one only: lm_head row next(b) is the embedding of b. Prompted with the
    first byte of `cycle`, it emits the rest, wrapping around: multibyte characters split
    across tokens, at every possible offset.
    """
    from lmforge_worker.export import export_onnx
    from lmforge_worker.model import Llama, save_pretrained
    from lmforge_worker.tokenization import build_tokenizer, save_tokenizer

    assert len(set(cycle)) == len(cycle), "cycle bytes must be distinct"
    tok = build_tokenizer("byte", "")
    cfg = tiny_config(
        tokenizer="byte",
        vocab_size=tok.get_vocab_size(),
        n_layers=1,
        d_model=64,
        tie_embeddings=False,
        context_length=context_length,
    )
    keyed = [cfg.__dict__, list(cycle), _cache_salt()] + (
        [eos_after] if eos_after is not None else []
    )
    key = hashlib.sha256(json.dumps(keyed).encode())
    cache = Path(tempfile.gettempdir()) / "lmforge-test-models" / f"cycle-{key.hexdigest()[:20]}"
    if not (cache / "model.onnx").is_file():
        torch.manual_seed(0)
        model = Llama(cfg).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            emb = model.model.embed_tokens.weight
            emb.normal_()
            model.lm_head.weight.zero_()
            for i, b in enumerate(cycle):
                model.lm_head.weight[cycle[(i + 1) % len(cycle)]] = emb[b] / 8
            want = list(cycle[1:] + cycle[:1])
            if eos_after is not None:
                eos = tok.get_vocab_size() - 1
                model.lm_head.weight[eos] = emb[eos_after] / 4  # beats the cycle's next byte
                want[cycle.index(eos_after)] = eos
            logits, _ = model(torch.tensor([list(cycle)]))
            assert logits[0].argmax(-1).tolist() == want
        tmp = cache.with_name(f"{cache.name}.tmp-{torch.randint(1 << 30, ()).item()}")
        save_pretrained(model, tmp)
        save_tokenizer(tok, tmp / "tokenizer.json")
        try:
            export_onnx(tmp, parity_limit=1e-3)
            tmp.rename(cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.copytree(cache, dest)
    return dest
