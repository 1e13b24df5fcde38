"""The real `openai` package as a client of the gateway: files, fine-tuning jobs, models,
completions (streamed and not) and errors, against the real stack."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from conftest import SMALL_CORPUS

from .conftest import ALICE, BOB, scrape

if TYPE_CHECKING:
    import openai

# `openai` is imported where it is used: every test here trains a model (slow), and the
# import alone was a second of every fast run's collection.


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    import openai

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=ALICE, max_retries=0) as c:
        yield c


@pytest.mark.slow
def test_fine_tuning_through_the_openai_sdk_trains_a_model_that_completes(client, tmp_path):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(SMALL_CORPUS[:40_000])
    f = client.files.create(file=corpus.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == 40_000 and f.filename == "shakespeare.txt"
    assert client.files.retrieve(f.id).bytes == 40_000
    assert f.id in [x.id for x in client.files.list()]

    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        suffix="oai",
        hyperparameters={"batch_size": 8, "max_steps": 20, "eval_interval": 10},
        metadata={"model.n_layers": "1"},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.training_file == f.id and job.hyperparameters.batch_size == 8
    assert job.model_extra["lmforge"]["total_steps"] in (0, 20)
    deadline = time.monotonic() + 240
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.trained_tokens > 0
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert "oai@1" in events[0].message and "ready" in events[0].message  # newest first
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["total_steps"] == 20 for e in metrics)
    assert any("valid_loss" in e.data for e in metrics)

    # The fine-tuned model generates: by the id the job names, and by name@version.
    models = [m.id for m in client.models.list()]
    assert "oai@1" in models
    done = client.completions.create(
        model=job.fine_tuned_model, prompt="ROMEO:", max_tokens=8, temperature=0, seed=1
    )
    again = client.completions.create(
        model="oai@1", prompt="ROMEO:", max_tokens=8, temperature=0, seed=1
    )
    assert done.choices[0].text == again.choices[0].text
    assert done.usage.completion_tokens == 8


def test_completions_non_streamed_carry_the_openai_fields(client, trained_model):
    r = client.completions.create(
        model=trained_model, prompt="ROMEO:\n", max_tokens=12, temperature=0.8, top_p=0.9,
        seed=3, logprobs=1,
    )  # fmt: skip
    assert r.object == "text_completion" and r.model == trained_model
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 7
    assert r.usage.total_tokens == 19
    lps = choice.logprobs.token_logprobs
    assert len(lps) == 12 and all(lp <= 0 for lp in lps)
    same = client.completions.create(
        model=trained_model, prompt="ROMEO:\n", max_tokens=12, temperature=0.8, top_p=0.9, seed=3
    )
    assert same.choices[0].text == choice.text


def test_streamed_completion_joins_to_the_same_text_and_ends_with_usage(client, trained_model):
    kwargs = dict(model=trained_model, prompt="ROMEO:\n", max_tokens=16, temperature=0, seed=1)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 16


def test_stop_sequence_ends_the_completion_with_reason_stop(client, trained_model):
    text = (
        client.completions.create(
            model=trained_model, prompt="ROMEO:\n", max_tokens=20, temperature=0, seed=1
        )
        .choices[0]
        .text
    )
    stop = text[3:5]
    r = client.completions.create(
        model=trained_model, prompt="ROMEO:\n", max_tokens=20, temperature=0, seed=1, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_errors_have_openai_shape_and_status(client, trained_model):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and "no-such-model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=trained_model, prompt="x", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature" and "between 0 and 2" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=trained_model, prompt="x", max_tokens=100_000)
    assert "max_new_tokens" in e.value.message and "4096" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=trained_model, prompt="x", max_tokens=2.5)
    assert e.value.body["param"] == "max_tokens" and "integer" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=trained_model, prompt=["a", "b"], max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=trained_model, prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=trained_model, messages=[{"role": "user", "content": "hi"}]
        )
    assert "no chat template" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("job_nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            model="tiny", training_file="file-" + "0" * 64, hyperparameters={"n_epochs": 3}
        )
    assert "n_epochs" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            model="tiny", training_file="file-" + "0" * 64, hyperparameters={"max_stepz": 3}
        )
    assert "max_stepz" in e.value.message and "max_steps" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("a.jsonl", b"{}"), purpose="batch")
    assert e.value.body["param"] == "purpose"


@pytest.mark.slow  # a training run on the worker
def test_cancelling_a_running_fine_tuning_job(client, gateway_api, gateway_stack):
    ds = gateway_api.upload(SMALL_CORPUS[:20_000].encode(), name="cancel-me")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=f"file-{ds.id}", hyperparameters={"max_steps": 100_000}
    )
    gateway_api.wait_for(job.id, lambda j: j.progress.step >= 10)
    # While it trains, the worker's /metrics shows its speed.
    worker = scrape(gateway_stack.settings.worker_metrics_addr)
    assert worker[f'lmforge_training_tokens_per_second{{job="{job.id}"}}'] > 0
    assert worker[f'lmforge_training_step_seconds{{job="{job.id}"}}'] > 0
    assert worker[f'lmforge_training_flops_per_second{{job="{job.id}"}}'] > 0
    job = client.fine_tuning.jobs.cancel(job.id)
    deadline = time.monotonic() + 60
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status != "cancelled":
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job.fine_tuned_model is None


def test_each_caller_sees_only_its_own_tenant_through_the_gateway(
    client, base_url, trained_model, gateway_api
):
    import openai

    ds = gateway_api.upload(b"alice's private corpus\n" * 100, name="alice-only")
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=BOB, max_retries=0) as bob:
        assert f"file-{ds.id}" not in [f.id for f in bob.files.list()]
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(f"file-{ds.id}")
        assert trained_model not in [m.id for m in bob.models.list()]
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model=trained_model, prompt="x", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.fine_tuning.jobs.create(model="tiny", training_file=f"file-{ds.id}")
    assert f"file-{ds.id}" in [f.id for f in client.files.list()]

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as e:
            stranger.models.list()
    assert e.value.status_code == 401 and "unknown API key" in e.value.message
    # No Authorization header at all: 401 in OpenAI's error shape.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base_url}/v1/models", timeout=10)
    assert e.value.code == 401
    error = json.loads(e.value.read())["error"]
    assert error["type"] == "authentication_error" and "authorization" in error["message"]
