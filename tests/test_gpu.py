"""CUDA: the training loop and the exported model on a GPU. Marked `gpu`: skipped where there
is none (CI), run on a machine with one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge_server.specs import resolve
from lmforge_worker.training import finalize, resolve_precision, train

pytestmark = pytest.mark.gpu

CORPUS = Path(__file__).resolve().parents[1] / "server/lmforge_server/data/tinyshakespeare.txt"
TEXT = CORPUS.read_text(encoding="utf-8")[:30000]


class Hooks:
    def __init__(self):
        self.progress, self.evals = [], []

    def should_stop(self):
        return None

    def on_progress(self, p) -> None:
        self.progress.append(p)

    def on_eval(self, step, val_loss, val_bpb, best_val_loss, best_step) -> None:
        self.evals.append((step, val_loss))

    def on_checkpoint(self, step, path) -> None:
        pass


def test_training_on_cuda_learns_in_bf16_and_exports_a_model_onnx_runtime_matches(tmp_path):
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == (
        "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = resolve("tiny", {}, {"max_steps": 60}, num_distinct_chars=len(set(TEXT)))
    hooks = Hooks()
    result = train(spec, corpus, tmp_path / "work", tmp_path / "ckpt", hooks, device="cuda")
    assert result.status == "completed" and result.steps == 60
    assert hooks.progress[-1].loss < hooks.progress[0].loss - 0.5
    assert result.best_val_loss == min(loss for _, loss in hooks.evals)

    from lmforge_worker.export import export_onnx

    out = finalize(result, spec, tmp_path / "work", tmp_path / "model", {"job_id": "gpu"})
    facts = export_onnx(out, parity_limit=1e-3)
    assert facts["max_abs_diff"] <= 1e-3
    assert json.loads((out / "metadata.json").read_text())["metrics"]["steps"] == 60
