"""Sidebar controls: model picker, sampling settings with presets, reasoning effort.

Streamlit drops a widget's value when the user switches pages, so every setting lives under a plain
session_state key (``SETTINGS_KEY``, a dict) and each widget is re-seeded from it before it is drawn. Widgets
take their value from session_state only (never also a ``value=`` argument), which is what lets callbacks and
the chat page set them: a preset choice, the per-model defaults, or reverting a model that failed to load.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import streamlit as st

from app.registry import HARMONY, ModelEntry
from model.harmony import REASONING_EFFORTS
from model.sampling import GPT_OSS_DEFAULTS, PRESETS, SamplingParams

SETTINGS_KEY = "settings"  # persistent dict: every value the sidebar shows
MODEL_DEFAULT = "Model default"
CUSTOM = "Custom"
PRESET_NAMES = [MODEL_DEFAULT, *PRESETS, CUSTOM]

# The settings a preset sets; max new tokens and the seed are the user's and are left alone.
_PRESET_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size")

_STORY_DEFAULTS = replace(PRESETS["Balanced"], max_new_tokens=200)
_HARMONY_DEFAULTS = replace(GPT_OSS_DEFAULTS, max_new_tokens=1024)  # reasoning takes tokens before the answer


def model_defaults(kind: str) -> SamplingParams:
    """Per-model sampling defaults: OpenAI's for gpt-oss (temperature 1.0, top_p 1.0), Balanced for stories."""
    return _HARMONY_DEFAULTS if kind == HARMONY else _STORY_DEFAULTS


def _initial_settings() -> dict[str, Any]:
    d = _STORY_DEFAULTS
    return {
        "model_id": None, "preset": MODEL_DEFAULT, "temperature": d.temperature, "top_k": d.top_k,
        "top_p": d.top_p, "min_p": d.min_p, "repetition_penalty": d.repetition_penalty,
        "no_repeat_ngram_size": d.no_repeat_ngram_size, "max_new_tokens": d.max_new_tokens,
        "random_seed": True, "seed": 42, "reasoning_effort": "low", "defaults_kind": None,
    }


def settings() -> dict[str, Any]:
    """The persistent settings dict of this browser session (created on first use)."""
    if SETTINGS_KEY not in st.session_state:
        st.session_state[SETTINGS_KEY] = _initial_settings()
    return st.session_state[SETTINGS_KEY]


def _wkey(name: str) -> str:
    return f"w_{name}"


def _set(name: str, value: Any) -> None:
    """Set a setting and its widget (only call before that widget is drawn in this run, or in a callback)."""
    settings()[name] = value
    st.session_state[_wkey(name)] = value


def _seed_widget(name: str) -> str:
    key = _wkey(name)
    if key not in st.session_state:
        st.session_state[key] = settings()[name]
    return key


def _remember(name: str) -> Any:
    value = st.session_state[_wkey(name)]
    settings()[name] = value
    return value


# ---- model picker -------------------------------------------------------------------------------------------
def requested_model_id(default_id: str | None) -> str | None:
    """The model the user asked for: the dropdown's value (possibly just changed), else the saved choice,
    else the registry default. Read before the dropdown is drawn, so a failed load can still revert it."""
    value = st.session_state.get(_wkey("model_id")) or settings()["model_id"]
    return value or default_id


def set_model_id(model_id: str | None) -> None:
    """Record the model in use (call before `model_select` in a run, e.g. to revert a failed choice)."""
    _set("model_id", model_id)


def model_select(entries: list[ModelEntry], disabled: bool = False) -> str | None:
    """The model dropdown: every registry entry, unavailable ones marked and explained below it."""
    if not entries:
        return None
    ids = [e.id for e in entries]
    by_id = {e.id: e for e in entries}
    key = _seed_widget("model_id")
    if st.session_state[key] not in ids:
        st.session_state[key] = next((e.id for e in entries if e.available), ids[0])
    st.selectbox("Model", ids, key=key, format_func=lambda i: by_id[i].label, disabled=disabled,
                 help="Models in weights/ and finished training runs; gpt-oss once downloaded. "
                      "See the Models page for details.")
    chosen = by_id[_remember("model_id")]
    if not chosen.available:
        st.warning(f"**{chosen.name}** is not available. {chosen.instructions}")
    return chosen.id


# ---- sampling ----------------------------------------------------------------------------------------------
def apply_preset(name: str) -> None:
    """Set the sampling widgets to a preset's values (a callback, or before the widgets are drawn)."""
    if name not in PRESETS and name != MODEL_DEFAULT:
        return
    kind = settings().get("defaults_kind") or "story"
    source = model_defaults(kind) if name == MODEL_DEFAULT else PRESETS[name]
    for f in _PRESET_FIELDS:
        _set(f, getattr(source, f))
    _set("preset", name)


def apply_model_defaults(kind: str) -> None:
    """Switch to a model kind's defaults when the kind changes (gpt-oss <-> story models); the user's
    settings are kept when switching between models of the same kind."""
    s = settings()
    if s.get("defaults_kind") == kind:
        return
    s["defaults_kind"] = kind
    apply_preset(MODEL_DEFAULT)
    _set("max_new_tokens", model_defaults(kind).max_new_tokens)


def _on_preset_change() -> None:
    apply_preset(st.session_state[_wkey("preset")])


def _on_value_change() -> None:
    _set("preset", CUSTOM)


def sampling_controls(kind: str, disabled: bool = False) -> SamplingParams:
    """Draw the sampling controls (in the current container) and return the chosen SamplingParams."""
    st.selectbox("Preset", PRESET_NAMES, key=_seed_widget("preset"), on_change=_on_preset_change,
                 disabled=disabled, help="Model default: temperature 1.0 and top-p 1.0 for gpt-oss (OpenAI's "
                 "recommendation), Balanced for story models. Moving a slider makes it Custom.")
    _remember("preset")
    common = {"disabled": disabled, "on_change": _on_value_change}
    st.slider("Temperature", 0.0, 2.0, step=0.05, key=_seed_widget("temperature"),
              help="0 = greedy (always the most likely token). Higher = more surprising.", **common)
    st.slider("Top-k", 0, 500, step=5, key=_seed_widget("top_k"),
              help="Sample only from the k most likely tokens. 0 = off.", **common)
    st.slider("Top-p", 0.05, 1.0, step=0.01, key=_seed_widget("top_p"),
              help="Sample from the smallest set of tokens whose probability adds up to p. 1 = off.", **common)
    max_tokens = 4096 if kind == HARMONY else 1024
    key = _seed_widget("max_new_tokens")
    st.session_state[key] = min(max(16, int(st.session_state[key])), max_tokens)
    st.slider("Max new tokens", 16, max_tokens, step=16, key=key, disabled=disabled)
    with st.expander("More settings"):
        st.slider("Min-p", 0.0, 0.5, step=0.01, key=_seed_widget("min_p"),
                  help="Drop tokens less likely than min-p x the most likely one. 0 = off.", **common)
        st.slider("Repetition penalty", 1.0, 2.0, step=0.05, key=_seed_widget("repetition_penalty"),
                  help="Makes tokens already in the text less likely. 1 = off.", **common)
        st.slider("No-repeat n-gram size", 0, 6, key=_seed_widget("no_repeat_ngram_size"),
                  help="Never repeat a sequence of this many tokens. 0 = off.", **common)
        st.checkbox("Random seed", key=_seed_widget("random_seed"), disabled=disabled,
                    help="Each reply uses a new seed (shown under the reply). Untick to reproduce a story.")
        st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=_seed_widget("seed"),
                        disabled=disabled or st.session_state[_wkey("random_seed")])
    values = {name: _remember(name) for name in (*_PRESET_FIELDS, "max_new_tokens", "random_seed", "seed")}
    return current_params(values)


def current_params(values: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from the saved settings (or from `values`)."""
    v = values if values is not None else settings()
    return SamplingParams(
        temperature=float(v["temperature"]), top_k=int(v["top_k"]), top_p=float(v["top_p"]),
        min_p=float(v["min_p"]), repetition_penalty=float(v["repetition_penalty"]),
        no_repeat_ngram_size=int(v["no_repeat_ngram_size"]), max_new_tokens=int(v["max_new_tokens"]),
        seed=-1 if v["random_seed"] else int(v["seed"])).validate()


def reasoning_effort_control(disabled: bool = False) -> str:
    """gpt-oss reasoning effort (low, medium, high): how long it thinks before answering."""
    st.segmented_control("Reasoning effort", list(REASONING_EFFORTS), key=_seed_widget("reasoning_effort"),
                         disabled=disabled, help="How much gpt-oss thinks before it answers. Low is fastest.")
    value = st.session_state[_wkey("reasoning_effort")] or settings()["reasoning_effort"]
    settings()["reasoning_effort"] = value
    return value
