"""Train page (AppTest): the form launches a real tiny training job, the runs list shows it, charts are drawn
from its metrics, and "Chat with this model" opens the chat page with the run selected."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import jobs
from tests.test_jobs import tiny_corpus

SERVER = str(Path(__file__).resolve().parents[1] / "server.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pagedata")
    return tiny_corpus(root / "data"), root / "cache"


@pytest.fixture
def train_roots(model_roots, corpus, monkeypatch):
    data, cache = corpus
    monkeypatch.setenv("STORYFORGE_DATA_DIR", str(data))
    monkeypatch.setenv("STORYFORGE_CACHE_DIR", str(cache))
    monkeypatch.setenv(jobs.THREADS_ENV, "1")
    st.cache_resource.clear()
    yield model_roots
    st.cache_resource.clear()


def train_page() -> AppTest:
    at = AppTest.from_file(SERVER, default_timeout=60)
    at.run()
    at.switch_page("app/pages/train.py").run()
    assert not at.exception, at.exception
    return at


def widget(at: AppTest, kind: str, label: str):
    return next(w for w in getattr(at, kind) if w.label == label)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def wait_until_done(runs: Path, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.JobManager(runs).get(name)
        if not job.active:
            return {"state": job.state, "log": jobs.tail(job.dir / "train.log", 40)}
        time.sleep(0.3)
    raise AssertionError(f"{name} still running after {timeout}s")


def test_form_estimate_follows_the_preset_and_architecture(train_roots):
    at = train_page()
    assert "arrives soon" in at.info[0].value  # the first-visit guide
    assert widget(at, "selectbox", "Preset").value == "toy"
    assert widget(at, "number_input", "Iterations").value == 600
    estimate = next(c.value for c in at.caption if "Estimate" in c.value)
    assert "parameters" in estimate and "1,228,800 training tokens" in estimate  # 600 x 16 x 128
    widget(at, "selectbox", "Preset").set_value("debug").run()
    assert widget(at, "number_input", "Iterations").value == 20
    assert widget(at, "number_input", "Batch size").value == 4
    widget(at, "number_input", "Context memory slots").set_value(8)
    widget(at, "number_input", "Multi-token prediction heads").set_value(2).run()
    assert not at.exception


def test_start_lists_the_job_draws_its_charts_and_opens_chat_with_it(train_roots):
    _, runs = train_roots
    at = train_page()
    widget(at, "selectbox", "Preset").set_value("debug").run()
    widget(at, "number_input", "Iterations").set_value(6)
    widget(at, "number_input", "Batch size").set_value(2)
    widget(at, "number_input", "Block size (tokens)").set_value(32)
    widget(at, "number_input", "Vocabulary size").set_value(400)
    widget(at, "number_input", "Multi-token prediction heads").set_value(1)
    widget(at, "text_input", "Run name").set_value("page-run").run()
    button(at, "Start training").click().run()
    assert not at.exception, at.exception

    # The job exists, started with the form's values, and the list shows it.
    job = jobs.JobManager(runs).get("page-run")
    assert job.managed and job.state in ("running", "finished")
    args = job.args
    for flag, value in (("--max_iters", "6"), ("--batch_size", "2"), ("--block_size", "32"),
                        ("--vocab_size", "400"), ("--mtp_heads", "1"), ("--preset", "debug")):
        assert args[args.index(flag) + 1] == value
    assert any("page-run" in m.value for m in at.markdown)
    assert at.get("progress"), "no progress bar for the job"
    at.run()  # a rerun (as any widget change causes) does not start the job twice
    assert [j.name for j in jobs.JobManager(runs).list()] == ["page-run"]

    done = wait_until_done(runs, "page-run")
    assert done["state"] == "finished", done["log"]
    at.run()
    assert not at.exception, at.exception
    charts = at.get("plotly_chart")
    assert len(charts) >= 3  # loss, learning rate, speed (+ expert load)
    loss = json.loads(charts[0].proto.spec)
    steps = [x for trace in loss["data"] if trace["name"] == "train" for x in trace["x"]]
    assert steps and max(steps) == 6  # drawn from the run's metrics
    assert any("Sample story" in m.value for m in at.markdown)

    button(at, "Chat with this model").click().run()
    assert not at.exception, at.exception
    model = next(w for w in at.sidebar.selectbox if w.label == "Model")
    assert model.value == "runs/page-run"
