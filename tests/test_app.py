"""The app: registry, engine and pages (Streamlit AppTest) with tiny models in temporary model roots."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import engine, registry
from app.registry import HARMONY, STORY
from model import harmony
from model.sampling import SamplingParams

SERVER = str(Path(__file__).resolve().parents[1] / "server.py")
TIMEOUT = 60


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_cache():
    """cache_resource is process-global: every test starts (and ends) with no model loaded."""
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


@pytest.fixture
def story_roots(model_roots, tiny_story_checkpoint):
    weights, runs = model_roots
    shutil.copytree(tiny_story_checkpoint, weights / "default")
    return weights, runs


def new_app() -> AppTest:
    at = AppTest.from_file(SERVER, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def sidebar_widget(at: AppTest, kind: str, label: str):
    return next(w for w in getattr(at.sidebar, kind) if w.label == label)


def replies(at: AppTest) -> list:
    return [m for m in at.chat_message if m.name == "assistant"]


class FakeHarmonyTokenizer:
    """o200k_harmony-shaped ids for a tiny made-up vocabulary (one id per character)."""

    vocab_size = harmony.FIRST_SPECIAL_ID + 100

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


class FakeResult:
    def __init__(self, ids, reason):
        self.token_ids, self.stop_reason, self.seed = list(ids), reason, 7
        self.tokens_per_s, self.time_to_first_token_s, self.elapsed_s = 10.0, 0.01, 0.1
        self.prompt_tokens, self.context_trimmed = 5, False


class FakeTokenStream:
    """Plays a scripted token sequence; the stop id ends it without being yielded (like the real one)."""

    def __init__(self, script, stop_ids):
        self.script, self.stop_ids, self.i, self.out, self.result = script, set(stop_ids), 0, [], None

    def __iter__(self):
        return self

    def __next__(self):
        if self.result is None and self.i < len(self.script):
            tok = self.script[self.i]
            self.i += 1
            if tok not in self.stop_ids:
                self.out.append(tok)
                return tok
            self.result = FakeResult(self.out, "eos")
        if self.result is None:
            self.result = FakeResult(self.out, "max_tokens")
        raise StopIteration

    def close(self):
        if self.result is None:
            self.result = FakeResult(self.out, "cancelled")


class FakeHarmonyGenerator:
    """Stands in for a gpt-oss Generator: replies with analysis, then a final answer, then <|return|>."""

    def __init__(self):
        self.tokenizer = FakeHarmonyTokenizer()
        self.model = type("M", (), {"config": type("C", (), {"max_context": 4096})()})()
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        enc = self.tokenizer.encode
        self.script = ([harmony.CHANNEL, *enc("analysis"), harmony.MESSAGE, *enc("User greets; say hi."),
                        harmony.END, harmony.START, *enc("assistant"), harmony.CHANNEL, *enc("final"),
                        harmony.MESSAGE, *enc("Hello there!"), harmony.RETURN])

    def stream_tokens(self, prompt_ids, params, *, stop_ids=None, cancel=None):
        self.prompts.append(list(prompt_ids))
        self.params.append(params)
        return FakeTokenStream(self.script, stop_ids or ())


def make_harmony_dir(weights: Path, name: str = "tiny-oss") -> Path:
    """A checkpoint directory the registry lists as a harmony model (config + o200k_harmony tokenizer info)."""
    from model.config import ModelConfig

    d = weights / name
    d.mkdir()
    ModelConfig(vocab_size=201088, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, num_experts=2, experts_per_token=1,
                intermediate_size=32).to_json(d / "config.json")
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer_info.json").write_text(json.dumps({"kind": "tiktoken", "encoding": "o200k_harmony"}))
    return d


# ---- registry ----------------------------------------------------------------------------------------------
def test_registry_lists_default_runs_and_missing_gpt_oss_with_how_to_get(story_roots, tiny_story_checkpoint):
    weights, runs = story_roots
    shutil.copytree(tiny_story_checkpoint, runs / "finished" / "final")
    (runs / "unfinished" / "ckpt").mkdir(parents=True)  # no final/: still training, not listed
    entries = registry.list_models()
    ids = [e.id for e in entries]
    assert ids == ["weights/default", "runs/finished", "gpt-oss-20b", "gpt-oss-120b"]
    default = entries[0]
    assert default.available and default.kind == STORY
    assert default.params_total == registry.parameter_counts(
        registry.ModelConfig.from_json(weights / "default" / "config.json"))["total"]
    assert default.size_bytes > 0 and default.memory_bytes > default.size_bytes
    assert default.description == "tiny story test model"
    g20 = registry.get_model("gpt-oss-20b", entries)
    assert not g20.available and g20.kind == HARMONY
    assert g20.command == "python download_weights.py --model gpt-oss-20b"
    assert 20e9 < g20.params_total < 22e9 and 3e9 < g20.params_active < 4.5e9
    assert 12 * 1024**3 < g20.memory_bytes < 20 * 1024**3
    assert registry.default_model_id(entries) == "weights/default"
    with pytest.raises(registry.RegistryError, match="runs/finished"):
        registry.get_model("../../etc", entries)


def test_registry_without_default_lists_it_with_command_and_picks_another(model_roots, tiny_story_checkpoint):
    weights, runs = model_roots
    assert registry.default_model_id(registry.list_models()) is None
    shutil.copytree(tiny_story_checkpoint, runs / "r1" / "final")
    entries = registry.list_models()
    default = registry.get_model(registry.DEFAULT_MODEL_ID, entries)
    assert not default.available and "model.train" in default.command
    assert registry.default_model_id(entries) == "runs/r1"


def test_gpt_oss_is_available_only_after_a_verified_download(model_roots):
    weights, _ = model_roots
    (weights / "gpt-oss-20b" / "original").mkdir(parents=True)
    e = registry.get_model("gpt-oss-20b", registry.list_models())
    assert not e.available and "incomplete" in e.problem
    (weights / "gpt-oss-20b" / registry.DOWNLOAD_MARKER).write_text("{}")
    e = registry.get_model("gpt-oss-20b", registry.list_models())
    assert e.available and e.is_large and e.kind == HARMONY and not e.command


def test_harmony_tokenizer_makes_a_checkpoint_a_harmony_model(model_roots):
    weights, _ = model_roots
    make_harmony_dir(weights)
    assert registry.get_model("weights/tiny-oss", registry.list_models()).kind == HARMONY


# ---- engine ------------------------------------------------------------------------------------------------
def test_story_text_joins_user_parts_and_keeps_continuations_verbatim():
    msgs = [{"role": "user", "content": "Once upon a ti"}, {"role": "assistant", "content": "me, a cat."},
            {"role": "user", "content": "Then it rained."}, {"role": "assistant", "content": " The end."}]
    assert engine.story_text(msgs) == "Once upon a time, a cat. Then it rained. The end."


def test_memory_check_refuses_a_model_that_does_not_fit(story_roots, monkeypatch):
    entry = registry.get_model("weights/default", registry.list_models())
    monkeypatch.setattr(engine, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(engine.ModelLoadError, match="needs about .* only 1000 B is free"):
        engine.ModelManager(device="cpu").load(entry)


def test_failed_small_load_keeps_previous_and_large_load_releases_first(story_roots, tiny_story_checkpoint):
    weights, _ = story_roots
    shutil.copytree(tiny_story_checkpoint, weights / "other")
    entries = registry.list_models()
    default, other = (registry.get_model(i, entries) for i in ("weights/default", "weights/other"))
    seen = []

    def loader(entry, device):
        seen.append((entry.id, manager.current.entry.id if manager.current else None))
        if entry.id == "weights/other":
            raise ValueError("corrupt weights")
        return object()

    manager = engine.ModelManager(loader=loader, device="cpu")
    first = manager.load(default)
    with pytest.raises(engine.ModelLoadError, match="could not be loaded: corrupt weights"):
        manager.load(other)
    assert manager.current is first and not first.released
    big = registry.ModelEntry(id="big", name="big", kind=HARMONY, path=weights, available=True,
                              memory_bytes=registry.LARGE_MODEL_BYTES)
    manager.load(big)
    assert seen[-1] == ("big", None) and first.released  # the old model was gone before the big one loaded


def test_generation_is_serialized_per_model(story_roots):
    entry = registry.get_model("weights/default", registry.list_models())
    loaded = engine.ModelManager(device="cpu").load(entry)
    params = SamplingParams(max_new_tokens=5, seed=1)
    a = engine.StoryReply(loaded, "Once upon a time", params)
    next(a)  # a holds the model
    b = engine.StoryReply(loaded, "The dog", params)
    got = []
    t = threading.Thread(target=lambda: got.append("".join(b)))
    t.start()
    time.sleep(0.3)
    assert not got and t.is_alive()  # b waits for a
    a.close()
    t.join(10)
    assert got and b.stats is not None and b.stats.tokens > 0


def test_stopping_a_story_keeps_the_partial_text_and_says_why(story_roots):
    entry = registry.get_model("weights/default", registry.list_models())
    loaded = engine.ModelManager(device="cpu").load(entry)
    cancel = threading.Event()
    reply = engine.StoryReply(loaded, "Once upon a time", SamplingParams(max_new_tokens=100, seed=3), cancel)
    pieces = [next(reply) for _ in range(3)]
    cancel.set()
    rest = list(reply)
    assert reply.text == "".join(pieces + rest) and reply.text
    assert reply.stats.stop_reason == "cancelled" and reply.stats.tokens < 100 and reply.stats.seed == 3
    assert "stopped by you" in reply.stats.describe()
    assert not loaded.lock.locked()


def test_harmony_reply_splits_reasoning_and_answer_with_a_real_tiny_model(tiny_harmony_checkpoint):
    """The gpt-oss path end to end on a tiny o200k_harmony model (random weights: the text is noise, but the
    prompt is rendered, tokens stream, and every piece lands in a channel)."""
    entry = registry.ModelEntry(id="t", name="t", kind=HARMONY, path=tiny_harmony_checkpoint, available=True)
    loaded = engine.ModelManager(device="cpu").load(entry)
    reply = engine.HarmonyReply(loaded, [{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=8,
                                seed=1), reasoning_effort="high")
    events = list(reply)
    assert reply.stats is not None and reply.stats.tokens == 8 and reply.stats.stop_reason == "max_tokens"
    assert "".join(t for _, t in events) == reply.reasoning + "".join(reply.answer_parts + reply.loose_parts)
    prompt = loaded.generator.tokenizer.decode(reply.prompt_ids(loaded.generator))
    assert "Reasoning: high" in prompt and prompt.endswith("Hi<|end|><|start|>assistant")


# ---- pages (AppTest) ---------------------------------------------------------------------------------------
def test_fresh_start_selects_the_default_and_streams_a_reply(story_roots):
    at = new_app()
    assert sidebar_widget(at, "selectbox", "Model").value == "weights/default"
    assert "Default story model" in at.caption[0].value
    at.chat_input[0].set_value("Once upon a time").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_message[0].markdown[0].value == "Once upon a time"
    reply = replies(at)[0]
    stored = at.session_state["chat"]["messages"][-1]
    # (a random model's text may start with control characters, which markdown rendering drops)
    assert stored["content"].strip() and reply.markdown[0].value.strip() == stored["content"].strip()
    stats = reply.caption[0].value
    assert f"{stored['stats']['tokens']} tokens" in stats and "tokens/s" in stats and "first token" in stats
    assert f"seed {stored['stats']['seed']}" in stats
    assert stats.endswith(engine.STOP_REASON_TEXT[stored["stats"]["stop_reason"]])
    assert {"regenerate", "continue", "clear"} <= {b.key for b in at.button}


def test_sampling_controls_reach_the_generator(story_roots, monkeypatch):
    from model.generation import Generator

    seen = []
    original = Generator.stream

    def spy(self, prompt, params, **kw):
        seen.append(params)
        return original(self, prompt, params, **kw)

    monkeypatch.setattr(Generator, "stream", spy)
    at = new_app()
    sidebar_widget(at, "slider", "Temperature").set_value(0.0)
    sidebar_widget(at, "slider", "Top-k").set_value(20)
    sidebar_widget(at, "slider", "Top-p").set_value(0.9)
    sidebar_widget(at, "slider", "Min-p").set_value(0.05)
    sidebar_widget(at, "slider", "Repetition penalty").set_value(1.3)
    sidebar_widget(at, "slider", "Max new tokens").set_value(32)
    sidebar_widget(at, "checkbox", "Random seed").uncheck()
    at.run()
    sidebar_widget(at, "number_input", "Seed").set_value(1234)
    at.run()
    assert sidebar_widget(at, "selectbox", "Preset").value == "Custom"
    at.chat_input[0].set_value("The cat").run()
    assert not at.exception, at.exception
    p = seen[-1]
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.max_new_tokens, p.seed) == (
        0.0, 20, 0.9, 0.05, 1.3, 32, 1234)
    assert "seed 1234" in replies(at)[0].caption[0].value
    # Regenerate: the same prompt with a new seed; Greedy preset sets temperature 0 and keeps max tokens.
    sidebar_widget(at, "selectbox", "Preset").select("Creative").run()
    at.button(key="regenerate").click().run()
    assert seen[-1].temperature == 1.0 and seen[-1].top_k == 200 and seen[-1].seed == -1
    assert seen[-1].max_new_tokens == 32
    assert len(replies(at)) == 1 and at.chat_message[0].markdown[0].value == "The cat"


def test_continue_extends_the_story_and_clear_empties_it(story_roots):
    at = new_app()
    sidebar_widget(at, "slider", "Max new tokens").set_value(16)
    at.chat_input[0].set_value("Once upon a time").run()
    first = at.session_state["chat"]["messages"][-1]["content"]
    at.button(key="continue").click().run()
    msgs = at.session_state["chat"]["messages"]
    assert len(msgs) == 2 and msgs[-1]["content"].startswith(first) and len(msgs[-1]["content"]) > len(first)
    at.button(key="clear").click().run()
    assert not at.chat_message and not at.session_state["chat"]["messages"]


def test_switching_models(story_roots, tiny_story_checkpoint):
    weights, _ = story_roots
    other = weights / "other"
    shutil.copytree(tiny_story_checkpoint, other)
    (other / "card.json").write_text(json.dumps({"name": "Other story model"}))
    at = new_app()
    sidebar_widget(at, "selectbox", "Model").select("weights/other").run()
    assert not at.exception, at.exception
    assert "Other story model" in at.caption[0].value
    assert engine.shared_manager().current.entry.id == "weights/other"
    at.chat_input[0].set_value("Once").run()
    assert "tokens/s" in replies(at)[0].caption[0].value
    assert at.session_state["chat"]["messages"][-1]["model"] == "Other story model"


def test_a_model_that_fails_to_load_shows_why_and_the_previous_one_stays(story_roots):
    weights, _ = story_roots
    broken = weights / "broken"
    shutil.copytree(weights / "default", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)  # truncated
    at = new_app()
    sidebar_widget(at, "selectbox", "Model").select("weights/broken").run()
    assert not at.exception, at.exception
    assert "broken could not be loaded" in at.error[0].value
    assert sidebar_widget(at, "selectbox", "Model").value == "weights/default"
    assert engine.shared_manager().current.entry.id == "weights/default"
    at.chat_input[0].set_value("Once").run()
    assert len(replies(at)) == 1 and not at.error


def test_an_unavailable_model_is_listed_with_its_download_command(story_roots):
    at = new_app()
    model = sidebar_widget(at, "selectbox", "Model")
    assert "gpt-oss-20b" in model.options[-2] and "not available" in model.options[-2]
    model.select("gpt-oss-20b").run()
    assert "python download_weights.py --model gpt-oss-20b" in at.error[0].value
    assert sidebar_widget(at, "selectbox", "Model").value == "weights/default"


def test_settings_survive_page_switches(story_roots):
    at = new_app()
    sidebar_widget(at, "slider", "Temperature").set_value(1.35)
    sidebar_widget(at, "slider", "Max new tokens").set_value(48)
    at.run()
    at.switch_page("app/pages/models.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Models"
    assert "Default story model" in at.dataframe[0].value["Model"].tolist()
    at.switch_page("app/pages/train.py").run()
    assert at.title[0].value == "Train" and not at.exception
    assert any(sb.label == "Preset" for sb in at.selectbox)  # the training form, drawn on the Train page
    at.switch_page("app/pages/chat.py").run()
    assert sidebar_widget(at, "slider", "Temperature").value == 1.35
    assert sidebar_widget(at, "slider", "Max new tokens").value == 48
    assert sidebar_widget(at, "selectbox", "Preset").value == "Custom"


def test_gpt_oss_chat_shows_the_answer_and_hides_reasoning_in_an_expander(model_roots, monkeypatch):
    weights, _ = model_roots
    make_harmony_dir(weights)
    fake = FakeHarmonyGenerator()
    monkeypatch.setattr(engine, "load_generator", lambda entry, device: fake)
    at = new_app()
    assert sidebar_widget(at, "selectbox", "Model").value == "weights/tiny-oss"
    assert sidebar_widget(at, "slider", "Temperature").value == 1.0  # gpt-oss defaults
    assert sidebar_widget(at, "slider", "Top-p").value == 1.0
    effort = sidebar_widget(at, "segmented_control", "Reasoning effort")
    assert effort.value == "low"
    effort.set_value("high").run()
    at.chat_input[0].set_value("Hi!").run()
    assert not at.exception, at.exception
    reply = replies(at)[0]
    assert reply.markdown[-1].value == "Hello there!"
    expander = reply.expander[0]
    assert expander.label == "Reasoning" and expander.markdown[0].value == "User greets; say hi."
    assert "answer complete" in reply.caption[0].value
    prompt = fake.tokenizer.decode(i for i in fake.prompts[-1] if i < harmony.FIRST_SPECIAL_ID)
    assert "Reasoning: high" in prompt and prompt.endswith("userHi!assistant")
    assert fake.params[-1].temperature == 1.0 and fake.params[-1].top_p == 1.0
    # A second turn carries the first answer (not its reasoning) in the conversation.
    at.chat_input[0].set_value("Again").run()
    prompt = fake.tokenizer.decode(i for i in fake.prompts[-1] if i < harmony.FIRST_SPECIAL_ID)
    assert "Hello there!" in prompt and "User greets" not in prompt
    assert "continue" not in {b.key for b in at.button}


def test_with_no_model_at_all_the_page_says_how_to_get_one(model_roots):
    at = new_app()
    assert "No model is available yet" in at.info[0].value
    text = " ".join(m.value for m in at.markdown)
    assert "python -m model.train" in text and "python download_weights.py --model gpt-oss-20b" in text
    assert at.chat_input[0].disabled
