"""The Llama model: parity with transformers, KV cache, padding, the HF directory layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from lmforge_server.specs import ModelConfig, count_parameters
from lmforge_worker.model import (
    Llama,
    config_from_hf,
    generate,
    hf_config,
    hf_state_dict,
    load_pretrained,
    save_pretrained,
)

BASE = ModelConfig(
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_model=32,
    intermediate_size=64,
    context_length=64,
    vocab_size=61,
    tokenizer="char",
)
CONFIGS = {
    "mha-untied": dataclasses.replace(BASE, tie_embeddings=False),
    "gqa-tied": dataclasses.replace(BASE, n_kv_heads=2, rope_theta=500.0),
    "mqa-tied": dataclasses.replace(BASE, n_layers=3, n_kv_heads=1, rms_norm_eps=1e-6),
    "odd-sizes": dataclasses.replace(
        BASE, n_heads=3, n_kv_heads=3, d_model=48, intermediate_size=40, vocab_size=17
    ),
}


def make_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    # Norm weights start at 1; perturb them so a misplaced norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(model: Llama):
    hf_cfg = {k: v for k, v in hf_config(model.config).items() if k != "lmforge_tokenizer"}
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    missing, unexpected = ref.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: it is the embedding
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_llama(name):
    model = make_model(CONFIGS[name])
    ref = hf_model(model)
    ids = torch.randint(
        0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_spec_count(name):
    cfg = CONFIGS[name]
    model = Llama(cfg)
    assert model.num_parameters() == count_parameters(cfg).total
    hf_params = sum(p.numel() for p in hf_model(model).parameters())
    assert hf_params == count_parameters(cfg).total


@pytest.mark.parametrize("name", ["gqa-tied", "mha-untied"])
def test_kv_cache_decode_equals_full_forward(name):
    model = make_model(CONFIGS[name])
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        full, _ = model(ids)
        # Prefill 7 tokens, then one token at a time, then a chunk of 4.
        logits, past = model(ids[:, :7])
        pieces = [logits]
        for t in range(7, 12):
            logits, past = model(ids[:, t : t + 1], past_key_values=past)
            pieces.append(logits)
        logits, past = model(ids[:, 12:], past_key_values=past)
        pieces.append(logits)
    cfg = model.config
    assert len(past) == cfg.n_layers
    assert past[0][0].shape == (2, cfg.n_kv_heads, 16, cfg.head_dim)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_last_only_gives_the_last_position():
    model = make_model(CONFIGS["gqa-tied"])
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        full, _ = model(ids)
        last, _ = model(ids, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_left_padded_batch_equals_unpadded_rows():
    model = make_model(CONFIGS["gqa-tied"])
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, model.config.vocab_size, (1, 10), generator=g)
    short = torch.randint(0, model.config.vocab_size, (1, 6), generator=g)
    pad = 4
    batch = torch.cat((long, torch.cat((torch.zeros(1, pad, dtype=torch.long), short), 1)))
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    with torch.no_grad():
        logits, past = model(batch, attention_mask=mask)
        mask2 = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        step, _ = model(nxt, attention_mask=mask2, past_key_values=past)
        ref_long, _ = model(torch.cat((long, nxt[:1]), 1))
        ref_short, _ = model(torch.cat((short, nxt[1:]), 1))
    assert (logits[0] - ref_long[0, :10]).abs().max().item() <= 1e-5
    assert (logits[1, pad:] - ref_short[0, :6]).abs().max().item() <= 1e-5
    assert torch.isfinite(logits).all()
    assert (step[0, 0] - ref_long[0, -1]).abs().max().item() <= 1e-5
    assert (step[1, 0] - ref_short[0, -1]).abs().max().item() <= 1e-5


def test_saved_model_opens_in_transformers_with_same_logits(tmp_path):
    for name in ("gqa-tied", "mha-untied"):
        model = make_model(CONFIGS[name])
        out = save_pretrained(model, tmp_path / name)
        cfg_json = json.loads((out / "config.json").read_text())
        assert cfg_json["architectures"] == ["LlamaForCausalLM"]
        assert cfg_json["torch_dtype"] == "float32"
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        with torch.no_grad():
            ours, _ = model(ids)
            theirs = ref(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4

        # Tied weights are stored once, as transformers does.
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            has_head = "lm_head.weight" in f.keys()
        assert has_head == (not model.config.tie_embeddings)

        loaded, cfg = load_pretrained(out)
        assert cfg == model.config
        with torch.no_grad():
            again, _ = loaded.eval()(ids)
        assert torch.equal(again, ours)


def test_loads_a_checkpoint_saved_by_transformers(tmp_path):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_theta": 1234.0, "rope_type": "default"},
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    model, cfg = load_pretrained(tmp_path)
    assert cfg.tokenizer == "pretrained"
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (2, 1234.0, False)
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        assert (model.eval()(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-4


def test_config_from_hf_rejects_what_the_model_cannot_run():
    good = hf_config(BASE)
    assert config_from_hf(good) == BASE
    with pytest.raises(ValueError, match="bias"):
        config_from_hf({**good, "attention_bias": True})
    with pytest.raises(ValueError, match="rope"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


def test_generate_greedy_matches_argmax_of_full_forward():
    model = make_model(CONFIGS["gqa-tied"])
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    out = generate(model, prompt, 8)
    assert out.shape == (2, 13)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)
    # Sampling with a seeded generator is reproducible.
    a = generate(
        model, prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0)
    )
    b = generate(
        model, prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(a, b)


def test_generate_on_a_left_padded_batch_matches_each_prompt_alone():
    model = make_model(CONFIGS["mqa-tied"])
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, model.config.vocab_size, (1, 7), generator=g)
    b = torch.randint(0, model.config.vocab_size, (1, 4), generator=g)
    batch = torch.cat((a, torch.cat((torch.zeros(1, 3, dtype=torch.long), b), 1)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = generate(model, batch, 6, attention_mask=mask)
    assert torch.equal(out[0], generate(model, a, 6)[0])
    assert torch.equal(out[1, 3:], generate(model, b, 6)[0])
