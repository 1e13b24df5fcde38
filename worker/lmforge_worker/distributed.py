"""Multi-device jobs: the training loop under torchrun (torch.distributed.run) with DDP.

The Celery task stays what it is for one device: the lease holder, the heartbeat and the
only writer of the job record. `launch` starts `torchrun` as its child in a control
directory and relays between the two sides:

- rank 0 appends what its hooks hear (progress, evaluations, checkpoints, notes, and at the
  end the result) to `events.jsonl`; `launch` replays each line into the task's hooks;
- the task's stop answer ("cancel", "shutdown": a cancel, a lost lease, a worker shutdown)
  is written to the file `stop`; rank 0 reads it before every step and broadcasts it, so
  every rank checkpoints and stops at the same step.

torchrun runs in its own session (a Ctrl-C or SIGTERM to the worker's process group does
not kill the ranks mid-checkpoint: the stop file does that cooperatively) with
PR_SET_PDEATHSIG, and every rank sets it too: a worker killed with SIGKILL takes torchrun
and the ranks with it, and the job resumes from its last checkpoint like a one-device job.

`python -m lmforge_worker.distributed <control dir>` is the rank entrypoint.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge_server.specs import JobSpec

ARGS = "args.json"
EVENTS = "events.jsonl"
STOP = "stop"
LOG = "torchrun.log"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the call: nobody would signal us
        os._exit(1)


def torchrun_command(
    control_dir: Path,
    devices: int,
    *,
    nodes: int = 1,
    rdzv_endpoint: str = "",
    rdzv_id: str = "lmforge",
    is_host: bool = True,
) -> list[str]:
    """The torchrun command line: `--standalone` on one node; on several, a c10d rendezvous
    at `rdzv_endpoint` (host:port), hosted by the node started with `is_host`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices)]
    if nodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [
            "--nnodes", str(nodes),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", rdzv_endpoint,
            "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"is_host={int(is_host)}",
        ]  # fmt: skip
    return [*cmd, "--module", "lmforge_worker.distributed", str(control_dir)]


def write_args(
    control_dir: Path,
    spec: JobSpec,
    corpus_path: Path,
    work_dir: Path,
    checkpoint_dir: Path,
    *,
    device: str,
    resume_from: Path | None,
    init_weights_dir: Path | None,
    torch_threads: int,
    val_corpus_path: Path | None = None,
) -> None:
    """Writes what every rank needs to call `training.train` into the control directory."""
    control_dir.mkdir(parents=True, exist_ok=True)
    for name in (EVENTS, STOP):
        (control_dir / name).unlink(missing_ok=True)
    for old in control_dir.glob("error-*.txt"):
        old.unlink()
    args = {
        "spec": spec.to_dict(),
        "corpus_path": str(corpus_path),
        "work_dir": str(work_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "device": device,
        "resume_from": str(resume_from) if resume_from else None,
        "init_weights_dir": str(init_weights_dir) if init_weights_dir else None,
        "torch_threads": torch_threads,
        "val_corpus_path": str(val_corpus_path) if val_corpus_path else None,
    }
    (control_dir / ARGS).write_text(json.dumps(args))


def launch(
    spec: JobSpec,
    corpus_path: Path,
    work_dir: Path,
    checkpoint_dir: Path,
    hooks,
    *,
    device: str = "cpu",
    resume_from: Path | None = None,
    init_weights_dir: Path | None = None,
    torch_threads: int = 0,
    val_corpus_path: Path | None = None,
    poll_s: float = 0.1,
):
    """`training.train` on `spec.training.devices` ranks of this node under torchrun.

    Same arguments and result as `training.train`; `hooks` run on the calling thread.
    Raises RuntimeError (with the tail of torchrun's log) when the ranks fail.
    """
    control_dir = Path(work_dir) / "ranks"
    write_args(
        control_dir,
        spec,
        corpus_path,
        work_dir,
        checkpoint_dir,
        device=device,
        resume_from=resume_from,
        init_weights_dir=init_weights_dir,
        torch_threads=torch_threads,
        val_corpus_path=val_corpus_path,
    )
    cmd = torchrun_command(control_dir, spec.training.devices)
    # PDEATHSIG follows the thread that forks: call this from the thread that lives as long
    # as the job (the Celery solo pool's main thread).
    with open(control_dir / LOG, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        return _relay(proc, control_dir, hooks, poll_s)
    finally:
        if proc.poll() is None:  # an exception here (e.g. Redis gone): no orphaned ranks
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _relay(proc: subprocess.Popen, control_dir: Path, hooks, poll_s: float):
    events = _EventReader(control_dir / EVENTS)
    stop_sent = None
    result = None
    while True:
        done = proc.poll() is not None
        for event in events.read():
            result = _replay(event, hooks) or result
        if done:
            break
        stop = hooks.should_stop()
        if stop and stop != stop_sent:
            _write_atomic(control_dir / STOP, stop)
            stop_sent = stop
        time.sleep(poll_s)
    if proc.returncode != 0 or result is None:
        # The first rank's own error says more than torchrun's summary of it.
        errors = sorted(control_dir.glob("error-*.txt"))
        if errors:
            raise RuntimeError(errors[0].read_text()[:1000])
        tail = (control_dir / LOG).read_text(errors="replace")[-1000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {tail}")
    return result


def _replay(event: dict, hooks):
    """Calls the hook an event stands for; returns a TrainResult for the final event."""
    from lmforge_worker import training

    kind = event["kind"]
    if kind == "progress":
        hooks.on_progress(training.Progress(**event["progress"]))
    elif kind == "eval":
        hooks.on_eval(*event["args"])
    elif kind == "checkpoint":
        hooks.on_checkpoint(event["step"], Path(event["path"]))
    elif kind == "log":
        fn = getattr(hooks, "on_log", None)
        if fn is not None:
            fn(event["message"])
    elif kind == "result":
        r = dict(event["result"])
        r["best_path"] = Path(r["best_path"]) if r["best_path"] else None
        return training.TrainResult(**r)
    return None


class _EventReader:
    """Reads the complete lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RankHooks:
    """Rank 0's hooks: each event becomes a line of `events.jsonl`; stop comes from `stop`."""

    def __init__(self, control_dir: Path):
        self.control_dir = control_dir
        self._out = open(control_dir / EVENTS, "a", buffering=1)  # noqa: SIM115 (process-long)

    def _emit(self, event: dict) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def should_stop(self) -> str | None:
        try:
            return (self.control_dir / STOP).read_text().strip() or None
        except FileNotFoundError:
            return None

    def on_progress(self, p) -> None:
        self._emit({"kind": "progress", "progress": dataclasses.asdict(p)})

    def on_eval(self, step, val_loss, val_bpb, best_val_loss, best_step) -> None:
        args = [step, val_loss, val_bpb, best_val_loss, best_step]
        self._emit({"kind": "eval", "args": args})

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._emit({"kind": "checkpoint", "step": step, "path": str(path)})

    def on_log(self, message: str) -> None:
        self._emit({"kind": "log", "message": message})

    def on_result(self, result) -> None:
        r = dataclasses.asdict(result)
        r["best_path"] = str(r["best_path"]) if r["best_path"] else None
        self._emit({"kind": "result", "result": r})


def rank_main(control_dir: Path) -> None:
    """One rank: joins the group torchrun set up and trains its shard (see `launch`)."""
    _die_with_parent()
    from lmforge_worker import training
    from lmforge_worker.ranks import Ranks

    args = json.loads((control_dir / ARGS).read_text())
    ranks, device = Ranks.from_env(args["device"])
    hooks = RankHooks(control_dir) if ranks.is_main else None
    try:
        result = training.train(
            JobSpec.from_dict(args["spec"]),
            Path(args["corpus_path"]),
            Path(args["work_dir"]),
            Path(args["checkpoint_dir"]),
            hooks,
            device=device,
            resume_from=Path(args["resume_from"]) if args["resume_from"] else None,
            init_weights_dir=Path(args["init_weights_dir"]) if args["init_weights_dir"] else None,
            torch_threads=args["torch_threads"],
            val_corpus_path=Path(args["val_corpus_path"]) if args["val_corpus_path"] else None,
            ranks=ranks,
        )
        if hooks is not None:
            hooks.on_result(result)
    except Exception as e:
        _write_atomic(control_dir / f"error-{ranks.rank}.txt", f"{type(e).__name__}: {e}")
        raise
    finally:
        ranks.close()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
    # Everything this rank reports is written and flushed by now. Skip the interpreter's
    # teardown: a C++ thread of the process group still joinable there aborts a rank that
    # trained to the end ("terminate called without an active exception", SIGABRT; seen
    # once in CI), and torchrun then fails the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
