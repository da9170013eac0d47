"""Job manager (app/jobs.py) against real tiny `python -m model.train` subprocesses: queue order, progress in
metrics, a restart of the app (a second manager) seeing the same jobs, cancel ending the process group with a
loadable checkpoint, resume, a killed trainer shown as failed, reused pids, delete."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from app import jobs
from app.jobs import JobError, JobManager
from tests.conftest import SHARED_DATA

SHARED = SHARED_DATA

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 16, "num_experts": 2, "experts_per_token": 1, "intermediate_size": 32,
              "sliding_window": 16}


def tiny_corpus(directory: Path, n_train: int = 120, n_valid: int = 20) -> Path:
    """A train/valid folder of real TinyStories stories, small enough to tokenize in a blink."""
    docs = [d.strip() for d in (SHARED / "valid.txt").read_text(encoding="utf-8").split("<|endoftext|>")
            if d.strip()]
    directory.mkdir(parents=True, exist_ok=True)
    sep = "\n<|endoftext|>\n"
    (directory / "train.txt").write_text(sep.join(docs[:n_train]) + sep)
    (directory / "valid.txt").write_text(sep.join(docs[n_train:n_train + n_valid]) + sep)
    return directory


def tiny_args(max_iters: int, **kw) -> list[str]:
    return jobs.job_args(preset="debug", max_iters=max_iters, batch_size=2, block_size=32, vocab_size=400,
                         eval_interval=kw.pop("eval_interval", 4), log_interval=1, sample_interval=0,
                         model_overrides=TINY_MODEL, **kw)


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("jobdata")
    return {"STORYFORGE_DATA_DIR": str(tiny_corpus(root / "data")), "STORYFORGE_CACHE_DIR": str(root / "cache"),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def manager(tmp_path, train_env) -> JobManager:
    return JobManager(tmp_path / "runs", max_running=1, env=train_env, grace_s=20)


def wait_for(predicate, timeout: float = 90, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_queue_progress_restart_cancel_and_resume(manager, tmp_path, train_env):
    long_job = manager.submit(tiny_args(5000), name="long")
    short_job = manager.submit(tiny_args(3), name="short")
    assert (long_job.state, short_job.state) == ("queued", "queued")
    by_name = {j.name: j for j in manager.tick()}
    assert by_name["long"].state == "running" and by_name["short"].state == "queued"  # one at a time, in order
    assert manager.tick() and manager.get("short").state == "queued"  # a tick never starts a job twice
    pid = manager.get("long").pid

    # Progress appears in metrics.jsonl while it trains.
    wait_for(lambda: any(m.get("step", 0) >= 3 and "loss" in m for m in manager.metrics("long")),
             what="training metrics")
    job = manager.get("long")
    assert 0 < job.progress < 1 and job.tokens_per_s and job.tokens_per_s > 0

    # An app restart: a fresh manager over the same directory sees the same jobs in the same states.
    again = JobManager(manager.root, max_running=1, env=train_env)
    assert {(j.name, j.state, j.pid) for j in again.list()} == {("long", "running", pid),
                                                                  ("short", "queued", None)}

    # Cancel: the process group ends, the trainer recorded "stopped", and a loadable checkpoint is left.
    stopped = again.cancel("long", wait=True, timeout=90)
    assert stopped.state == "stopped" and stopped.resumable and stopped.has_final
    assert not group_alive(pid)
    from model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(stopped.dir / "final")[:2]
    assert model.config.num_hidden_layers == 1 and tok.vocab_size == 400
    card = json.loads((stopped.dir / "final" / "card.json").read_text())
    assert card["steps"] == stopped.step > 0

    # The queue moves on: the short job now runs (and finishes).
    assert {j.name: j.state for j in manager.tick()}["short"] == "running"
    wait_for(lambda: manager.get("short").state == "finished", what="the short job to finish")

    # Resume continues from the checkpoint (here for 3 more steps), not from scratch.
    at = stopped.step
    assert manager.resume("long", max_iters=at + 3).state == "queued"
    manager.tick()
    done = wait_for(lambda: (j := manager.get("long")).state in ("finished", "failed") and j,
                    what="the resumed job")
    assert done.state == "finished", done.log_tail
    assert done.step == at + 3
    assert f"resumed from {done.dir / 'ckpt'} at step {at}" in manager.log_tail("long", 200)
    steps = [m["step"] for m in manager.metrics("long")]
    assert steps == sorted(steps) and steps[-1] == at + 3 and steps.count(at + 1) == 1


def test_a_killed_trainer_is_failed_with_its_log_and_can_then_be_deleted(manager):
    manager.submit(tiny_args(5000, eval_interval=1000), name="victim")
    job = manager.tick()[0]
    assert job.state == "running"
    wait_for(lambda: manager.metrics("victim"), what="the first metrics")
    with pytest.raises(JobError, match="cancel it"):
        manager.delete("victim")
    os.killpg(job.pid, signal.SIGKILL)  # as if the OOM killer took it: no chance to record anything
    failed = wait_for(lambda: (j := manager.get("victim")).state != "running" and j, what="failure")
    assert failed.state == "failed"
    assert "ended without recording why" in failed.message
    last_line = (failed.dir / "train.log").read_text().strip().splitlines()[-1]
    assert "loss" in last_line and last_line in failed.log_tail  # the tail of its log comes with it
    manager.delete("victim")
    assert not failed.dir.exists() and manager.list() == []


def test_a_reused_pid_is_not_mistaken_for_the_job(manager):
    job = manager.submit(tiny_args(3), name="ghost")
    info = json.loads((job.dir / "job.json").read_text())
    # The recorded pid now belongs to another live process (this one), which started at another time.
    info.update(state="running", pid=os.getpid(), start_time=jobs.process_start_time(os.getpid()) - 50)
    (job.dir / "job.json").write_text(json.dumps(info))
    assert manager.get("ghost").state == "failed"
    # With its real start time the same pid would count as alive: the start time is what tells them apart.
    info["start_time"] = jobs.process_start_time(os.getpid())
    (job.dir / "job.json").write_text(json.dumps(info))
    assert manager.get("ghost").state == "running"


def test_cancelling_a_queued_job_takes_it_out_of_the_queue(manager):
    manager.submit(tiny_args(3), name="first")
    assert manager.cancel("first").state == "cancelled"
    assert manager.tick()[0].state == "cancelled"  # not started later
    assert not manager.has_active()
    with pytest.raises(JobError, match="no checkpoint"):
        manager.resume("first")
    with pytest.raises(JobError, match="--out"):
        manager.submit(["--out", "elsewhere"])


def test_metrics_reader_ignores_a_half_written_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert jobs.read_jsonl(p) == [{"step": 1, "loss": 3.0}]


def test_estimate_uses_measured_speed_of_earlier_runs_of_that_size(tmp_path):
    rough = jobs.estimate(model_size="toy", arch="gptoss", vocab_size=4096, block_size=128, batch_size=16,
                          max_iters=600, root=tmp_path)
    assert not rough["measured"] and rough["params_total"] > 1_000_000
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"model_size": "toy", "arch": "gptoss",
                                                           "model_overrides": {}}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens_per_s": 1000.0}) + "\n"
                                               for i in range(3)))
    measured = jobs.estimate(model_size="toy", arch="gptoss", vocab_size=4096, block_size=128, batch_size=16,
                             max_iters=600, root=tmp_path)
    assert measured["measured"] and measured["seconds"] == pytest.approx(16 * 128 * 600 / 1000.0)
    gpt2 = jobs.estimate(model_size="toy", arch="gpt2", vocab_size=4096, block_size=128, batch_size=16,
                         max_iters=600, root=tmp_path)
    assert not gpt2["measured"]
