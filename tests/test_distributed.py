"""Multi-device training under torchrun (gloo on CPU): the same curve as one process with the
same global batch, cancel reaching every rank, exact resume, and two "nodes" on loopback."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from test_training import TEXT, Recorder, tiny_spec

from lmforge_worker.distributed import EVENTS, launch, torchrun_command, write_args
from lmforge_worker.training import train

torch.set_num_threads(1)

# Every test here starts torchrun and two rank processes that each import torch: 6-13 CPU
# seconds a test (over half of the fast subset's time on its own). CI runs them.
pytestmark = pytest.mark.slow

# Logged every step; two micro-batches a step so DDP's no_sync path is in the curve too.
SHORT = dict(max_steps=12, log_interval=1, eval_interval=6, checkpoint_interval=6, batch_size=8)
SHORT["grad_accum_steps"] = 2
TOL = 1e-4  # fp32, at every logged step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Recorder:
    """The reference: the job on one process, with the same global batch."""
    tmp = tmp_path_factory.mktemp("one")
    hooks = Recorder()
    result = train(tiny_spec(**SHORT), corpus, tmp / "work", tmp / "ckpt", hooks)
    assert result.status == "completed"
    return hooks


def _assert_same_curve(ref: list, got: list) -> None:
    assert [p.step for p in got] == [p.step for p in ref]
    for a, b in zip(ref, got, strict=True):
        assert abs(a.loss - b.loss) <= TOL, (a.step, a.loss, b.loss)


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """The same job on 2 ranks under torchrun: (hooks, result, work dir, checkpoint dir)."""
    tmp = tmp_path_factory.mktemp("two")
    hooks = Recorder()
    spec = tiny_spec(devices=2, **SHORT)
    result = launch(spec, corpus, tmp / "w", tmp / "c", hooks)
    return hooks, result, tmp / "w", tmp / "c"


def test_two_ranks_give_the_loss_curve_of_one_process_with_the_same_global_batch(
    one_process, two_ranks
):
    hooks, result, work, ckpt = two_ranks
    assert result.status == "completed" and result.steps == 12
    _assert_same_curve(one_process.progress, hooks.progress)
    for a, b in zip(one_process.evals, hooks.evals, strict=True):
        assert a[0] == b[0] and abs(a[1] - b[1]) <= TOL and abs(a[2] - b[2]) <= TOL
    # Rank 0 alone wrote the checkpoints and the best weights, and said it ran 2 ranks.
    assert [s for s, _ in hooks.checkpoints] == [6, 12]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000006.pt", "step-00000012.pt"]
    assert result.best_path == work / "best.safetensors" and result.best_path.exists()
    assert any("2 ranks" in line for line in hooks.logs), hooks.logs


def test_a_two_rank_run_resumed_from_its_checkpoint_continues_the_same_curve(
    tmp_path, corpus, one_process, two_ranks
):
    hooks, _, _, ckpt = two_ranks
    rest = Recorder()
    spec = tiny_spec(devices=2, **SHORT)
    resumed = launch(
        spec, corpus, tmp_path / "w", tmp_path / "c", rest, resume_from=ckpt / "step-00000006.pt"
    )
    assert resumed.status == "completed" and [p.step for p in rest.progress][0] == 7
    _assert_same_curve(one_process.progress, hooks.progress[:6] + rest.progress)


@pytest.mark.parametrize("reason, status", [("cancel", "cancelled"), ("pause", "paused")])
def test_a_cancel_or_pause_stops_every_rank_at_one_step_with_a_checkpoint(
    tmp_path, corpus, reason, status
):
    spec = tiny_spec(devices=2, **{**SHORT, "max_steps": 300, "checkpoint_interval": 300})
    hooks = Recorder(stop_at=3, reason=reason)
    result = launch(spec, corpus, tmp_path / "w", tmp_path / "c", hooks)
    # torchrun exited 0: every rank left the loop; rank 0 checkpointed the step they stopped at.
    assert result.status == status and 3 <= result.steps < 300
    assert hooks.checkpoints == [(result.steps, tmp_path / "c" / f"step-{result.steps:08d}.pt")]


@pytest.mark.slow  # two torchrun runs
def test_with_dropout_each_rank_keeps_its_own_random_stream_across_a_resume(tmp_path, corpus):
    # Dropout masks differ from one process's (each rank draws its own), so the reference
    # here is the uninterrupted 2-rank run: a resume must restore every rank's RNG state.
    spec = tiny_spec(devices=2, **SHORT)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, dropout=0.2))
    whole = Recorder()
    launch(spec, corpus, tmp_path / "w1", tmp_path / "c1", whole)
    rest = Recorder()
    launch(
        spec,
        corpus,
        tmp_path / "w2",
        tmp_path / "c2",
        rest,
        resume_from=tmp_path / "c1" / "step-00000006.pt",
    )
    assert [p.step for p in rest.progress] == list(range(7, 13))
    for a, b in zip(whole.progress[6:], rest.progress, strict=True):
        assert a.loss == b.loss, (a.step, a.loss, b.loss)


def test_a_rank_error_fails_the_run_with_that_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:40], encoding="utf-8")
    with pytest.raises(RuntimeError, match="ValueError: the (train|val) split has"):
        launch(
            tiny_spec(TEXT[:40], devices=2, **SHORT),
            short,
            tmp_path / "w",
            tmp_path / "c",
            Recorder(),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_loopback_train_the_one_process_curve(tmp_path, corpus, one_process):
    spec = tiny_spec(devices=1, nodes=2, **SHORT)
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in range(2):
        control = tmp_path / f"node{node}"
        write_args(
            control,
            spec,
            corpus,
            tmp_path / "work",
            tmp_path / "ckpt",
            device="cpu",
            resume_from=None,
            init_weights_dir=None,
            torch_threads=1,
        )
        cmd = torchrun_command(
            control, 1, nodes=2, rdzv_endpoint=endpoint, rdzv_id="t", is_host=node == 0
        )
        log = open(control / "torchrun.log", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), control))
    for proc, control in procs:
        assert proc.wait(timeout=300) == 0, (control / "torchrun.log").read_text()[-3000:]
    # Exactly one process (global rank 0, on either node) reported.
    events = [
        json.loads(line)
        for _, control in procs
        if (control / EVENTS).exists()
        for line in (control / EVENTS).read_text().splitlines()
    ]
    progress = [e["progress"] for e in events if e["kind"] == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 13))
    for a, b in zip(one_process.progress, progress, strict=True):
        assert abs(a.loss - b["loss"]) <= TOL, (a.step, a.loss, b["loss"])
    assert any(e["kind"] == "result" for e in events)
