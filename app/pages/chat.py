"""Chat page: write the opening of a story and a nano model continues it, or converse with gpt-oss.

Order matters in a Streamlit chat (docs/streamlit-and-sampling.md, section 2):
1. `st.chat_input` comes first, and the buttons only record an action in callbacks, so before anything else
   is drawn the page knows whether this run will generate; the sidebar is then drawn disabled, since a widget
   change during streaming would rerun the script and kill the reply.
2. The model is loaded (and a failed choice reverted) before the model dropdown is drawn.
3. While a reply streams, the Stop button raises StopException at the next `st.*` call, after which every
   `st.*` call raises again. So the messages list and the state dict are fetched before streaming, and the
   `finally:` block stores the partial reply into them with plain Python only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import streamlit as st

from app import controls, engine, registry

STATE_KEY = "chat"
STORY_STARTERS = [
    "Once upon a time, a little fox found a shiny key in the forest.",
    "Tom had a red kite. One windy day,",
    "The moon was sad because nobody could see it in the day.",
]


def chat_state() -> dict[str, Any]:
    if STATE_KEY not in st.session_state:
        st.session_state[STATE_KEY] = {"messages": [], "action": None, "kind": None, "loaded_id": None,
                                       "error": None}
    return st.session_state[STATE_KEY]


def _set_action(name: str, text: str | None = None) -> None:
    chat_state()["action"] = (name, text)


def _clear() -> None:
    chat_state()["messages"].clear()


# ---- model loading -----------------------------------------------------------------------------------------
def _load_with_progress(manager: engine.ModelManager, entry: registry.ModelEntry) -> engine.LoadedModel:
    cur = manager.current
    if cur is not None and cur.entry.id == entry.id:
        return manager.load(entry)
    holder = st.empty()
    with holder.container():
        bar = st.progress(0.0, text=f"Loading {entry.name}…")
        try:
            loaded = manager.load(entry, progress=lambda f, msg: bar.progress(f, text=msg))
        finally:
            holder.empty()
    st.toast(f"{entry.name} loaded in {loaded.load_seconds:.1f} s", icon=":material/check_circle:")
    return loaded


def ensure_model(entries: list[registry.ModelEntry], state: dict[str, Any]) -> engine.LoadedModel | None:
    """Load the chosen model; if that fails, say why and go back to the model that worked before."""
    manager = engine.shared_manager()
    requested = controls.requested_model_id(registry.default_model_id(entries))
    if requested is None:
        return None
    by_id = {e.id: e for e in entries}
    try:
        entry = registry.get_model(requested, entries)
        loaded = _load_with_progress(manager, entry)
    except (engine.ModelLoadError, registry.RegistryError) as e:
        state["error"] = str(e)
        previous = state.get("loaded_id")
        controls.set_model_id(previous)
        if previous is None or previous not in by_id or previous == requested:
            return None
        try:
            loaded = _load_with_progress(manager, by_id[previous])
        except engine.ModelLoadError as e2:
            state["error"] += f"\n\nThe previous model could not be loaded again either: {e2}"
            controls.set_model_id(None)
            return None
    state["loaded_id"] = loaded.entry.id
    controls.set_model_id(loaded.entry.id)
    return loaded


# ---- drawing -----------------------------------------------------------------------------------------------
def show_message(msg: dict[str, Any]) -> None:
    with st.chat_message(msg["role"], avatar=":material/person:" if msg["role"] == "user"
                         else ":material/auto_stories:"):
        if msg.get("reasoning"):
            with st.expander("Reasoning", expanded=False, icon=":material/psychology:"):
                st.markdown(msg["reasoning"])
        st.markdown(msg["content"] or "_(no text)_")
        if msg.get("stats"):
            st.caption(engine.ReplyStats(**msg["stats"]).describe())


def sidebar(entries: list[registry.ModelEntry], loaded: engine.LoadedModel | None, busy: bool):
    with st.sidebar:
        controls.model_select(entries, disabled=busy)
        if loaded is not None:
            e = loaded.entry
            st.caption(f"{registry.format_count(e.params_total)} parameters "
                       f"({registry.format_count(e.params_active)} active) · {loaded.device.upper()}"
                       + (f" · {e.description}" if e.description else ""))
        kind = loaded.kind if loaded is not None else registry.STORY
        effort = "low"
        if kind == registry.HARMONY:
            effort = controls.reasoning_effort_control(disabled=busy)
        st.subheader("Sampling")
        params = controls.sampling_controls(kind, disabled=busy)
    return params, effort


def empty_state(loaded: engine.LoadedModel | None, entries: list[registry.ModelEntry]) -> None:
    if loaded is None:
        st.info("No model is available yet.", icon=":material/info:")
        for e in entries:
            if not e.available and e.instructions:
                st.markdown(f"**{e.name}**: {e.instructions}")
        st.page_link("app/pages/models.py", label="See all models", icon=":material/inventory_2:")
        return
    if loaded.kind == registry.HARMONY:
        st.markdown(f"Ask **{loaded.entry.name}** anything. Its reasoning appears in a collapsed "
                    "*Reasoning* box above each answer.")
        return
    st.markdown("Write the first sentence or two of a story, and the model will continue it. "
                "Add a line of your own whenever you like, or press **Continue** for more.")
    st.caption("Or start with one of these:")
    with st.container(horizontal=True):
        for i, text in enumerate(STORY_STARTERS):
            st.button(text, key=f"starter{i}", icon=":material/edit_note:", on_click=_set_action,
                      args=("send", text))


def action_buttons(kind: str) -> None:
    with st.container(horizontal=True):
        if kind == registry.STORY:
            st.button("Continue", key="continue", icon=":material/arrow_forward:", on_click=_set_action,
                      args=("continue",), help="Let the model write more of this story.", type="primary")
        st.button("Regenerate", key="regenerate", icon=":material/refresh:", on_click=_set_action,
                  args=("regenerate",), help="The same prompt again, with a new seed.")
        st.button("Clear", key="clear", icon=":material/delete:", on_click=_clear,
                  help="Start a new story." if kind == registry.STORY else "Start a new conversation.")


# ---- generation --------------------------------------------------------------------------------------------
def _stream_story(loaded: engine.LoadedModel, messages: list[dict[str, Any]], state: dict[str, Any],
                  params, action: str) -> None:
    cont = action == "continue" and messages and messages[-1]["role"] == "assistant"
    target = messages[-1] if cont else {"role": "assistant", "content": "", "model": loaded.entry.name}
    base = target["content"] if cont else ""
    story = engine.story_text(messages)
    cancel = threading.Event()
    reply = engine.StoryReply(loaded, story, params, cancel)

    def pieces():
        if base:
            yield base
        yield from reply

    try:
        with st.chat_message("assistant", avatar=":material/auto_stories:"):
            st.write_stream(pieces())
    finally:  # plain Python only: after Stop every st.* call raises
        cancel.set()
        reply.close()
        target["content"] = base + reply.text
        target["stats"] = reply.stats.to_dict() if reply.stats is not None else None
        if not cont and (target["content"] or target["stats"]):
            messages.append(target)
        state["busy"] = False
        state["refresh"] = True


def _stream_harmony(loaded: engine.LoadedModel, messages: list[dict[str, Any]], state: dict[str, Any],
                    params, effort: str) -> None:
    target = {"role": "assistant", "content": "", "reasoning": "", "model": loaded.entry.name}
    cancel = threading.Event()
    reply = engine.HarmonyReply(loaded, messages, params, reasoning_effort=effort, cancel=cancel)

    try:
        with st.chat_message("assistant", avatar=":material/auto_stories:"):
            thinking = st.status("Thinking…", expanded=False)
            box = thinking.empty()

            def answer_pieces():
                last = 0.0
                for channel, text in reply:
                    if channel == "analysis":
                        if time.monotonic() - last > 0.2:
                            box.markdown(reply.reasoning)
                            last = time.monotonic()
                    else:
                        yield text
                box.markdown(reply.reasoning or "_(no reasoning)_")

            st.write_stream(answer_pieces())
            thinking.update(label="Reasoning", state="complete")
    finally:  # plain Python only: after Stop every st.* call raises
        cancel.set()
        reply.close()
        target["content"] = reply.answer
        target["reasoning"] = reply.reasoning
        target["stats"] = reply.stats.to_dict() if reply.stats is not None else None
        if target["content"] or target["reasoning"] or target["stats"]:
            messages.append(target)
        state["busy"] = False
        state["refresh"] = True


def generate(loaded: engine.LoadedModel, state: dict[str, Any], action: tuple[str, str | None], params,
             effort: str) -> None:
    messages = state["messages"]  # fetched before streaming: the finally blocks append to this object
    name = action[0]
    if name == "regenerate":
        params = replace(params, seed=-1)  # same prompt, new seed
    try:
        if loaded.kind == registry.HARMONY:
            _stream_harmony(loaded, messages, state, params, effort)
        else:
            _stream_story(loaded, messages, state, params, name)
    except engine.ModelLoadError as e:
        state["error"] = str(e)


@st.fragment(run_every=0.5)
def _refresh_after_stop() -> None:
    """Drawn only while a reply streams. Stop ends the script run with no rerun, which would leave the
    sidebar disabled and the reply without its stats line and buttons; the `finally:` blocks set
    `refresh`, and this fragment's timer (it keeps firing after the run stopped) then reruns the app.
    A timer firing while the reply still streams only queues a fragment run, which does not interrupt it."""
    state = chat_state()
    if state.get("refresh"):
        state["refresh"] = False
        st.rerun(scope="app")


# ---- the page ----------------------------------------------------------------------------------------------
def main() -> None:
    state = chat_state()
    state["refresh"] = False
    entries = registry.list_models()
    messages = state["messages"]
    chosen = controls.requested_model_id(registry.default_model_id(entries))
    chosen_entry = next((e for e in entries if e.id == chosen), None)
    harmony = chosen_entry is not None and chosen_entry.kind == registry.HARMONY
    placeholder = ("Message the model…" if harmony else
                   "Add to the story…" if messages else "Write the opening of a story…")
    prompt = st.chat_input(placeholder, submit_mode="stop", disabled=not any(e.available for e in entries))
    action = state.pop("action", None)
    state["action"] = None
    if prompt:
        action = ("send", prompt)
    busy = action is not None

    st.title("StoryForge")
    loaded = ensure_model(entries, state)
    if loaded is not None:
        if state.get("kind") not in (None, loaded.kind) and messages:
            messages.clear()
            st.toast("New conversation: story models and gpt-oss read different formats.")
        state["kind"] = loaded.kind
        controls.apply_model_defaults(loaded.kind)
        st.caption(f"Chatting with **{loaded.entry.name}**" + (
            " in the harmony format." if loaded.kind == registry.HARMONY else
            ": you start the story, it carries on. The whole story so far is its context."))
    params, effort = sidebar(entries, loaded, busy and loaded is not None)

    if state.get("error"):
        st.error(state["error"], icon=":material/error:")
        state["error"] = None

    if loaded is None:
        empty_state(None, entries)
        return

    if busy:
        name, text = action
        if name == "send" and text:
            messages.append({"role": "user", "content": text})
        elif name == "regenerate":
            if messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                busy = False
        elif name == "continue" and not messages:
            busy = False

    continuing = busy and action[0] == "continue" and messages[-1]["role"] == "assistant"
    for msg in messages[:-1] if continuing else messages:  # a continued reply is redrawn as it grows
        show_message(msg)

    if busy:
        state["busy"] = True
        _refresh_after_stop()
        generate(loaded, state, action, params, effort)
        st.rerun()  # redraw with the stats line, the buttons and enabled controls
    elif messages:
        action_buttons(loaded.kind)
    else:
        empty_state(loaded, entries)


main()
