"""Train page: start a training run, watch it learn, compare runs, then chat with the result.

Layout and widgets only: jobs (subprocesses, queue, cancel, resume) are app/jobs.py's. Jobs start only in the
Start button's callback, so no rerun can start one twice; the live part is a fragment that reruns itself every
few seconds only while a job is queued or training (docs/streamlit-and-sampling.md, sections 2 and 3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

from app import controls, jobs, registry
from model.data import DATA_DIR_ENV
from model.train import TRAIN_PRESETS

POLL_SECONDS = 2.0
STATE_KEY = "train_page"

# Page presets: (trainer preset, model size, what to expect)
PRESETS: dict[str, tuple[str, str, str]] = {
    "toy": ("fast", "toy", "a 2M-parameter story model in minutes on a laptop CPU"),
    "debug": ("debug", "toy", "a smoke test of the whole pipeline in seconds (not a useful model)"),
    "standard": ("standard", "small", "the shipped size: about an hour on a GPU"),
    "production": ("production", "medium", "the long run: a bigger model and context, hours on a GPU"),
}
ARCH_LABELS = {"gptoss": "GPT-OSS", "gpt2": "GPT-2"}
SIZES = ["toy", "small", "medium", "large"]
LOCAL, HUB, FILE = "local", "hub", "file"
STATE_BADGE = {
    "queued": ":gray-badge[:material/schedule: queued]",
    "running": ":blue-badge[:material/play_arrow: training]",
    "stopping": ":orange-badge[:material/pause: stopping]",
    "finished": ":green-badge[:material/check_circle: finished]",
    "stopped": ":violet-badge[:material/stop_circle: stopped]",
    "failed": ":red-badge[:material/error: failed]",
    "cancelled": ":gray-badge[:material/block: cancelled]",
}


def page_state() -> dict[str, Any]:
    if STATE_KEY not in st.session_state:
        st.session_state[STATE_KEY] = {"selected": None, "confirm_delete": None, "error": None, "notice": None}
    return st.session_state[STATE_KEY]


def manager() -> jobs.JobManager:
    return jobs.JobManager(registry.runs_dir())


# ---- the form ---------------------------------------------------------------------------------------------------
def _apply_preset() -> None:
    name = st.session_state["tr_preset"]
    train_preset, size, _ = PRESETS[name]
    cfg = TRAIN_PRESETS[train_preset]
    st.session_state.update(tr_size=size, tr_iters=cfg.max_iters, tr_batch=cfg.batch_size,
                            tr_block=cfg.block_size, tr_lr=cfg.lr)


def _init_form() -> None:
    if "tr_preset" not in st.session_state:
        st.session_state.update(tr_preset="toy", tr_arch="gptoss", tr_seed=1337, tr_vocab=4096, tr_mtp=0,
                                tr_memory=0, tr_name="", tr_path="",
                                tr_source=LOCAL if os.environ.get(DATA_DIR_ENV) else HUB)
        _apply_preset()


def _source_label(value: str) -> str:
    if value == LOCAL:
        return f"Local corpus ({os.environ.get(DATA_DIR_ENV)})"
    return {HUB: "TinyStories (download from the Hugging Face Hub)", FILE: "A file of stories"}[value]


def _intervals(train_preset: str, iters: int) -> dict[str, int]:
    """Log, eval and sample intervals scaled down for short runs, so even a 20-step run draws a curve."""
    cfg = TRAIN_PRESETS[train_preset]
    return {"log_interval": max(1, min(cfg.log_interval, iters // 50)),
            "eval_interval": max(1, min(cfg.eval_interval, iters // 4)),
            "sample_interval": max(1, min(cfg.sample_interval, iters // 2)) if cfg.sample_interval else 0,
            "warmup_iters": min(cfg.warmup_iters, iters // 10)}


def _start() -> None:
    """Start button callback: queue the job and start it if a slot is free (callbacks run once per click)."""
    s, ps = st.session_state, page_state()
    mgr = manager()
    train_preset, _, _ = PRESETS[s.tr_preset]
    size, arch, iters = s.tr_size, s.tr_arch, int(s.tr_iters)
    name = (s.tr_name or "").strip() or mgr.new_name(f"{size}-{arch}")
    env: dict[str, str | None] = {}
    upload_path = None
    if s.tr_source == LOCAL:
        data = "tinystories"
    elif s.tr_source == HUB:
        data, env = "tinystories", {DATA_DIR_ENV: None}  # the hub download even when a local corpus is set
    else:
        upload = s.get("tr_upload")
        if upload is not None:
            upload_path = mgr.root / name / "upload" / Path(upload.name).name
            data = str(upload_path)
        elif s.tr_path.strip():
            data = str(Path(s.tr_path.strip()).expanduser())
            if not Path(data).exists():
                ps["error"] = f"{data} does not exist: upload a .txt/.jsonl file or give a path on this machine."
                return
        else:
            ps["error"] = "Choose a file of stories (upload one, or give a path on this machine)."
            return
    args = jobs.job_args(
        preset=train_preset, model_size=size, arch=arch, data=data, max_iters=iters,
        batch_size=int(s.tr_batch), block_size=int(s.tr_block), lr=float(s.tr_lr), seed=int(s.tr_seed),
        vocab_size=int(s.tr_vocab), mtp_heads=int(s.tr_mtp) or None,
        context_memory=int(s.tr_memory) if arch == "gptoss" and s.tr_memory else None,
        **_intervals(train_preset, iters))
    try:
        job = mgr.submit(args, name=name, env=env)
        if upload_path is not None:
            upload_path.parent.mkdir(parents=True, exist_ok=True)
            upload_path.write_bytes(s.tr_upload.getvalue())
        mgr.tick()
    except (jobs.JobError, OSError) as e:
        ps["error"] = str(e)
        return
    ps.update(selected=job.name, error=None, notice=f"Started **{job.name}**.")
    s.tr_name = ""


def new_run_form(mgr: jobs.JobManager) -> None:
    _init_form()
    s = st.session_state
    st.selectbox("Preset", list(PRESETS), key="tr_preset", on_change=_apply_preset,
                 format_func=lambda p: f"{p} · {PRESETS[p][2]}",
                 help="Fills in size, iterations, batch, block and learning rate; change any of them after.")
    c1, c2 = st.columns(2)
    c1.segmented_control("Architecture", list(ARCH_LABELS), key="tr_arch", format_func=ARCH_LABELS.get,
                         help="GPT-OSS: mixture of experts, rotary positions, attention sinks. GPT-2: the dense "
                              "baseline with the same total parameter count, for comparison.")
    c2.selectbox("Size", SIZES, key="tr_size")
    arch = s.tr_arch or "gptoss"
    sources = ([LOCAL] if os.environ.get(DATA_DIR_ENV) else []) + [HUB, FILE]
    if s.tr_source not in sources:
        s.tr_source = sources[0]
    st.radio("Data", sources, key="tr_source", format_func=_source_label, horizontal=False)
    if s.tr_source == FILE:
        f1, f2 = st.columns([3, 2])
        f1.file_uploader("Upload stories (.txt with <|endoftext|> between stories, or .jsonl)",
                         type=["txt", "jsonl"], key="tr_upload")
        f2.text_input("…or a path on this machine", key="tr_path", placeholder="/data/stories.txt")
    c1, c2, c3 = st.columns(3)
    c1.number_input("Iterations", min_value=1, max_value=1_000_000, step=50, key="tr_iters")
    c2.number_input("Batch size", min_value=1, max_value=1024, step=1, key="tr_batch")
    c3.number_input("Block size (tokens)", min_value=8, max_value=4096, step=16, key="tr_block")
    c1, c2, c3 = st.columns(3)
    c1.number_input("Learning rate", min_value=1e-6, max_value=1.0, step=1e-4, format="%.4f", key="tr_lr")
    c2.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="tr_seed")
    c3.text_input("Run name", key="tr_name", placeholder="automatic", max_chars=60)
    with st.expander("Advanced", icon=":material/tune:"):
        a1, a2, a3 = st.columns(3)
        a1.number_input("Vocabulary size", min_value=260, max_value=32768, step=256, key="tr_vocab",
                        help="Pieces of the SentencePiece tokenizer trained on the data (cached for reuse).")
        a2.number_input("Multi-token prediction heads", min_value=0, max_value=4, step=1, key="tr_mtp",
                        help="Extra heads that learn tokens t+2 … t+1+K; they enable self-speculative "
                             "decoding. 0 = off.")
        a3.number_input("Context memory slots", min_value=0, max_value=64, step=4, key="tr_memory",
                        disabled=arch != "gptoss",
                        help="Memory carried across chunks of a story (GPT-OSS only). 0 = off.")

    est = jobs.estimate(model_size=s.tr_size, arch=arch, vocab_size=int(s.tr_vocab), block_size=int(s.tr_block),
                        batch_size=int(s.tr_batch), max_iters=int(s.tr_iters), mtp_heads=int(s.tr_mtp),
                        context_memory=int(s.tr_memory) if arch == "gptoss" else 0, root=mgr.root)
    basis = ("the speed of your earlier runs of this size" if est["measured"]
             else "a rough CPU speed for this size; a GPU is much faster")
    active = est["params_active"]
    st.caption(f":material/calculate: **Estimate:** {registry.format_count(est['params_total'])} parameters"
               + (f" ({registry.format_count(active)} active per token)" if active != est["params_total"] else "")
               + f" · {est['tokens']:,} training tokens · about **{jobs.format_duration(est['seconds'])}** "
               f"at ~{est['tokens_per_s']:,.0f} tokens/s ({basis}).")
    busy = sum(1 for j in mgr.list() if j.managed and j.state in ("running", "stopping"))
    label = "Start training" if busy < mgr.max_running else "Queue training run"
    st.button(label, type="primary", icon=":material/play_arrow:", on_click=_start, key="tr_start")
    if busy >= mgr.max_running:
        st.caption(f"{busy} run(s) already training; this one will wait its turn ({mgr.max_running} at a time).")


# ---- charts -----------------------------------------------------------------------------------------------------
def _fig(title: str, x_title: str, y_title: str, log_y: bool = False):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=280, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title=x_title, yaxis_title=y_title, hovermode="x unified",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def _series(metrics: list[dict[str, Any]], x: str, y: str) -> tuple[list, list]:
    pts = [(m[x], m[y]) for m in metrics if m.get(y) is not None and m.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_figure(runs: dict[str, list[dict[str, Any]]], x: str, title: str):
    """Train (solid) and validation (dotted, markers) loss of one or more runs against step or tokens."""
    import plotly.graph_objects as go

    fig = _fig(title, "tokens" if x == "tokens" else "step", "loss (nats/token)")
    palette = ["#e45756", "#4c78a8", "#54a24b", "#f58518", "#b279a2", "#72b7b2", "#ff9da6", "#9d755d"]
    for i, (name, metrics) in enumerate(runs.items()):
        color = palette[i % len(palette)]
        label = "" if len(runs) == 1 else f"{name} · "
        xs, ys = _series(metrics, x, "loss")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{label}train", line=dict(color=color, width=2)))
        xs, ys = _series(metrics, x, "val_loss")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{label}validation",
                                 line=dict(color=color, width=2, dash="dot"), marker=dict(size=7)))
    return fig


def metric_figure(metrics: list[dict[str, Any]], y: str, title: str, y_title: str, color: str):
    import plotly.graph_objects as go

    fig = _fig(title, "step", y_title)
    xs, ys = _series(metrics, "step", y)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=y_title, line=dict(color=color, width=2),
                             fill="tozeroy" if y == "tokens_per_s" else None))
    fig.update_layout(showlegend=False)
    return fig


def expert_figure(metrics: list[dict[str, Any]]):
    """Share of the last layer's tokens routed to each expert (balanced = 1/E each)."""
    import plotly.graph_objects as go

    recs = [m for m in metrics if m.get("expert_fractions")]
    fig = _fig("Expert load (last layer)", "step", "share of tokens")
    n = len(recs[-1]["expert_fractions"])
    for e in range(n):
        fig.add_trace(go.Scatter(x=[m["step"] for m in recs], y=[m["expert_fractions"][e] for m in recs],
                                 mode="lines", stackgroup="experts", name=f"expert {e}", line=dict(width=0.5)))
    fig.update_yaxes(range=[0, 1])
    return fig


# ---- the runs ---------------------------------------------------------------------------------------------------
def _cancel(name: str) -> None:
    try:
        manager().cancel(name)
    except jobs.JobError as e:
        page_state()["error"] = str(e)


def _resume(name: str) -> None:
    try:
        mgr = manager()
        mgr.resume(name)
        mgr.tick()
    except jobs.JobError as e:
        page_state()["error"] = str(e)


def _delete(name: str) -> None:
    ps = page_state()
    if ps["confirm_delete"] != name:  # the first click asks
        ps["confirm_delete"] = name
        return
    ps["confirm_delete"] = None
    try:
        manager().delete(name)
        ps["notice"] = f"Deleted **{name}**."
        if ps["selected"] == name:
            ps["selected"] = None
    except (jobs.JobError, OSError) as e:
        ps["error"] = str(e)


def _keep_delete(_name: str) -> None:
    page_state()["confirm_delete"] = None


def job_row(job: jobs.Job, selected: bool) -> None:
    ps = page_state()
    with st.container(border=True):
        head, badge = st.columns([3, 1.3], vertical_alignment="center")
        cfg = job.train_config
        what = " · ".join(str(v) for v in (cfg.get("model_size"), ARCH_LABELS.get(cfg.get("arch"), "")) if v)
        head.markdown(f"**{job.name}**" + (" :material/visibility:" if selected else "")
                      + (f"  \n:small[{what}]" if what else ""))
        badge.markdown(STATE_BADGE.get(job.state, job.state))
        if job.state in ("running", "stopping", "queued") or job.max_iters:
            bits = [f"step {job.step:,} / {job.max_iters:,}"]
            if job.state == "running" and job.tokens_per_s:
                bits.append(f"{job.tokens_per_s:,.0f} tokens/s")
            if job.eta_s is not None:
                bits.append(f"ETA {jobs.format_duration(job.eta_s)}")
            last_val = next((m["val_loss"] for m in reversed(jobs.read_jsonl(job.dir / "metrics.jsonl"))
                             if "val_loss" in m), None) if job.state != "queued" else None
            if last_val is not None:
                bits.append(f"val loss {last_val:.3f}")
            st.progress(job.progress, text=" · ".join(bits))
        if job.state == "failed":
            st.error(job.message or "The run failed.", icon=":material/error:")
            if job.log_tail:
                st.code(job.log_tail, language="text")
        elif job.state in ("stopped", "cancelled") and job.message:
            st.caption(job.message)
        cols = st.columns([1, 1, 1.8, 1])
        if job.state != "queued" or job.step:
            cols[0].button("Show", key=f"show_{job.name}", icon=":material/monitoring:", disabled=selected,
                           on_click=lambda n=job.name: page_state().update(selected=n), use_container_width=True)
        if job.state in ("queued", "running"):
            cols[1].button("Cancel", key=f"cancel_{job.name}", icon=":material/stop:", on_click=_cancel,
                           args=(job.name,), use_container_width=True,
                           help="Saves a checkpoint and stops; you can resume later.")
        if job.state in ("stopped", "failed") and job.resumable:
            cols[1].button("Resume", key=f"resume_{job.name}", icon=":material/play_arrow:", on_click=_resume,
                           args=(job.name,), use_container_width=True, help="Continue from the last checkpoint.")
        if job.has_final and not job.active:
            if cols[2].button("Chat with this model", key=f"chat_{job.name}", icon=":material/chat:",
                              type="primary", use_container_width=True):
                controls.set_model_id(job.model_id)
                st.switch_page("app/pages/chat.py")
        if not job.active:
            confirming = ps["confirm_delete"] == job.name
            cols[3].button("Really delete?" if confirming else "Delete", key=f"delete_{job.name}",
                           icon=":material/delete:", on_click=_delete, args=(job.name,),
                           type="primary" if confirming else "secondary", use_container_width=True,
                           help="Removes the run directory with its checkpoints. Click twice.")
            if confirming:
                st.warning(f"Delete **{job.name}** and all its checkpoints? Click **Really delete?** to confirm.",
                           icon=":material/warning:")
                st.button("Keep it", key=f"keep_{job.name}", on_click=_keep_delete, args=(job.name,))


def run_details(mgr: jobs.JobManager, job: jobs.Job) -> None:
    metrics = mgr.metrics(job.name)
    st.subheader(f":material/monitoring: {job.name}", divider="gray")
    if not metrics:
        st.info("Waiting for the first measurements: the trainer prepares the tokenizer and data first "
                "(the first run on a corpus takes longest).", icon=":material/hourglass_top:")
    else:
        axis = st.segmented_control("Loss against", ["step", "tokens"], key="tr_axis", default="step") or "step"
        st.plotly_chart(loss_figure({job.name: metrics}, axis, "Training and validation loss"),
                        use_container_width=True, key=f"loss_{job.name}")
        c1, c2 = st.columns(2)
        with c1:
            st.plotly_chart(metric_figure(metrics, "lr", "Learning rate", "lr", "#f58518"),
                            use_container_width=True, key=f"lr_{job.name}")
        with c2:
            st.plotly_chart(metric_figure(metrics, "tokens_per_s", "Speed", "tokens/s", "#54a24b"),
                            use_container_width=True, key=f"tps_{job.name}")
        if any(m.get("expert_fractions") for m in metrics):
            st.plotly_chart(expert_figure(metrics), use_container_width=True, key=f"experts_{job.name}")
    samples = mgr.samples(job.name)
    if samples:
        latest = samples[-1]
        with st.container(border=True):
            st.markdown(f":material/auto_stories: **Sample story at step {latest['step']:,}**")
            st.markdown(latest["text"])
    with st.expander("Log", icon=":material/terminal:", expanded=job.state == "failed"):
        st.code(mgr.log_tail(job.name, 40) or "(no log yet)", language="text")


def runs_section(was_active: bool) -> None:
    """The jobs list and the selected run; a fragment polled while a job is active."""
    mgr = manager()
    job_list = mgr.tick()
    ps = page_state()
    if was_active and not any(j.active for j in job_list):
        st.rerun(scope="app")  # the last job ended: redraw the page once (stops the polling)
    if ps.get("error"):
        st.error(ps["error"], icon=":material/error:")
        ps["error"] = None
    if ps.get("notice"):
        st.success(ps["notice"], icon=":material/check_circle:")
        ps["notice"] = None
    if not job_list:
        return
    names = [j.name for j in job_list]
    if ps["selected"] not in names:
        ps["selected"] = names[0]
    st.subheader("Runs")
    for job in job_list:
        job_row(job, selected=job.name == ps["selected"])
    run_details(mgr, next(j for j in job_list if j.name == ps["selected"]))


def compare_section(mgr: jobs.JobManager) -> None:
    with_metrics = [j for j in mgr.list() if (j.dir / "metrics.jsonl").exists()]
    if len(with_metrics) < 2:
        return
    with st.expander("Compare runs", icon=":material/compare_arrows:"):
        st.caption("Overlay the loss curves of several runs, for example GPT-OSS against GPT-2 of the same size.")
        names = [j.name for j in with_metrics]
        chosen = st.multiselect("Runs", names, default=names[:2], key="tr_compare")
        axis = st.segmented_control("Against", ["step", "tokens"], key="tr_compare_axis", default="tokens") \
            or "tokens"
        if chosen:
            st.plotly_chart(loss_figure({n: mgr.metrics(n) for n in chosen}, axis, "Loss"),
                            use_container_width=True, key="compare_chart")


def main() -> None:
    st.title("Train")
    mgr = manager()
    job_list = mgr.tick()
    active = any(j.active for j in job_list)
    if not job_list:
        st.info("Your first model arrives soon: keep the **toy** preset, press **Start training** and watch the "
                "loss fall. When it is done, chat with it from here or pick it in the Chat page's model list.",
                icon=":material/school:")
    with st.expander("New training run", icon=":material/add_circle:", expanded=not active):
        new_run_form(mgr)
    st.fragment(run_every=POLL_SECONDS if active else None)(runs_section)(active)
    compare_section(mgr)


main()
