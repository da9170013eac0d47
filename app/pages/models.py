"""Models page: what the registry knows, available or not, with sizes, memory needed and how to get it."""

from __future__ import annotations

import streamlit as st

from app import registry

KIND_LABEL = {registry.STORY: "Story model", registry.HARMONY: "Chat (harmony)"}


def _machine_line() -> str:
    import psutil

    ram = psutil.virtual_memory()
    return (f"This machine: {registry.format_bytes(ram.available)} of {registry.format_bytes(ram.total)} memory "
            "free. gpt-oss is loaded only when it fits.")


def main() -> None:
    st.title("Models")
    st.caption("Story models from weights/ and your training runs, and OpenAI's gpt-oss once downloaded. "
               "Pick one in the Model list on the Chat page.")
    entries = registry.list_models()
    st.dataframe(
        [{
            "Model": e.name,
            "Type": KIND_LABEL.get(e.kind, e.kind),
            "Status": "available" if e.available else "not available",
            "Parameters": registry.format_count(e.params_total),
            "Active / token": registry.format_count(e.params_active),
            "On disk": registry.format_bytes(e.size_bytes) if e.size_bytes else "-",
            "Memory needed": registry.format_bytes(e.memory_bytes),
        } for e in entries],
        hide_index=True, use_container_width=True)
    st.caption(_machine_line())

    for e in entries:
        with st.container(border=True):
            icon = ":material/check_circle:" if e.available else ":material/download:"
            st.markdown(f"#### {icon} {e.name}")
            if e.description:
                st.markdown(e.description)
            facts = [KIND_LABEL.get(e.kind, e.kind), f"{registry.format_count(e.params_total)} parameters",
                     f"{registry.format_count(e.params_active)} active per token",
                     f"needs about {registry.format_bytes(e.memory_bytes)}"]
            if e.context_length:
                facts.append(f"context {e.context_length:,} tokens")
            st.caption(" · ".join(facts) + f"  \nFrom: {e.source}")
            if e.problem:
                st.warning(e.problem.capitalize(), icon=":material/warning:")
            if not e.available:
                st.markdown(e.how_to_get)
                if e.command:
                    st.code(e.command, language="bash")


main()
