"""Background training jobs: each one a `python -m model.train` subprocess with its own run directory.

No Streamlit here: the Train page calls this module, tests drive it directly.

Why it is built this way (docs/streamlit-and-sampling.md, section 3):

* A job is a run directory under the runs root holding ``job.json`` (what the manager knows: state, the CLI
  arguments, the pid and the process start time) next to what the trainer writes (``config.json``,
  ``status.json``, ``metrics.jsonl``, ``samples.jsonl``, ``train.log``, ``ckpt/``, ``final/``). Everything is
  on disk, so the jobs survive a restart of the app: a new :class:`JobManager` over the same root sees them.
* The trainer runs in its own process group (``start_new_session``), so cancelling ends it and anything it
  started. A recorded pid is the job only while ``/proc/<pid>`` exists, is not a zombie and started at the
  recorded time: pids are reused, and a finished but unreaped child still answers ``kill(pid, 0)``.
* A queue: :meth:`JobManager.submit` only writes ``job.json`` (state ``queued``); :meth:`JobManager.tick`
  starts queued jobs in submission order while fewer than ``max_running`` train. Polling, not a thread, so
  nothing is lost when the server stops, and nothing runs twice when Streamlit reruns a script.
* Cancel: a ``STOP`` file and SIGINT to the group (the trainer saves a checkpoint and exits 0), then SIGTERM
  and SIGKILL if it does not end within the grace period (escalated by ``tick``/``cancel(wait=True)``).
* A stopped run gets a ``final/`` checkpoint exported from its resume checkpoint, so it can be chatted with
  like a finished one (the registry lists runs with ``final/``).

States: ``queued``, ``running``, ``stopping``, ``finished``, ``stopped``, ``failed``, ``cancelled`` (removed
from the queue before it started). Runs started from a terminal (no ``job.json``) are listed too, read-only
apart from cancel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.registry import read_json_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_FILE = "job.json"
MAX_JOBS_ENV = "STORYFORGE_MAX_JOBS"
THREADS_ENV = "STORYFORGE_TRAIN_THREADS"  # OMP_NUM_THREADS for training subprocesses (unset: torch decides)

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
FINISHED, STOPPED, FAILED, CANCELLED = "finished", "stopped", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING, STOPPING)
DONE_STATES = (FINISHED, STOPPED, FAILED, CANCELLED)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

#: Popen handles of the children this process started, shared by every manager in the process, so any of
#: them can reap a finished child (an unreaped child is a zombie and would still look alive).
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobError(RuntimeError):
    """A job operation that cannot be done; the message says why and what to do instead."""


# ---- small file helpers ---------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an append-only JSON-lines file; a last line still being written (no newline) is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = text.split("\n")
    out = []
    for line in lines[:-1]:  # the piece after the last newline is incomplete (or empty)
        if line.strip():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def tail(path: Path, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a (possibly large) text file; "" when it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# ---- processes -------------------------------------------------------------------------------------------------
def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, stable across calls), or None if there is none."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, ValueError, OSError):
        return None


def process_alive(pid: int | None, start_time: float | None) -> bool:
    """True when `pid` is a live (not zombie) process that started at `start_time` (within 0.05 s): a pid
    that was reused by another process since does not count."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:  # ours and finished: reaped now
        _CHILDREN.pop(pid, None)
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except (psutil.Error, ValueError, OSError):
        return False
    return start_time is not None and abs(started - float(start_time)) < 0.05


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the trainer and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# ---- what a job is ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A snapshot of one run directory, as the page shows it."""

    name: str
    dir: Path
    state: str
    managed: bool  # started by a JobManager (False: a run started from a terminal)
    step: int = 0
    max_iters: int = 0
    pid: int | None = None
    created: float = 0.0
    message: str = ""
    args: tuple[str, ...] = ()
    train_config: dict[str, Any] = field(default_factory=dict, compare=False)
    last: dict[str, Any] = field(default_factory=dict, compare=False)  # the last metrics record
    tokens_per_s: float | None = None
    eta_s: float | None = None
    resumable: bool = False  # has a complete resume checkpoint
    has_final: bool = False  # final/ exists: the chat page lists it
    log_tail: str = ""  # only filled for failed jobs

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.max_iters) if self.max_iters else 0.0

    @property
    def model_id(self) -> str:
        """The registry id of the run's checkpoint (runs/<name>)."""
        return f"runs/{self.name}"


def job_args(*, preset: str = "fast", model_size: str | None = None, arch: str | None = None,
             data: str | None = None, max_iters: int | None = None, batch_size: int | None = None,
             block_size: int | None = None, lr: float | None = None, seed: int | None = None,
             vocab_size: int | None = None, mtp_heads: int | None = None, context_memory: int | None = None,
             eval_interval: int | None = None, log_interval: int | None = None,
             sample_interval: int | None = None, warmup_iters: int | None = None,
             model_overrides: dict[str, Any] | None = None,
             extra: Sequence[str] = ()) -> list[str]:
    """Trainer CLI arguments (no --out) for the options given; None leaves the preset's value."""
    args = ["--preset", preset]
    options: dict[str, Any] = dict(model_size=model_size, arch=arch, data=data, max_iters=max_iters,
                                   batch_size=batch_size, block_size=block_size, lr=lr, seed=seed,
                                   vocab_size=vocab_size, mtp_heads=mtp_heads, context_memory=context_memory,
                                   eval_interval=eval_interval, log_interval=log_interval,
                                   sample_interval=sample_interval, warmup_iters=warmup_iters)
    for key, value in options.items():
        if value is not None:
            args += [f"--{key}", str(value)]
    if model_overrides:
        args += ["--model_overrides", json.dumps(model_overrides)]
    return args + list(extra)


class JobManager:
    """Training jobs under `root` (default: the registry's runs directory).

    `max_running`: jobs training at once (default ``$STORYFORGE_MAX_JOBS`` or 1: on a CPU two trainers only
    slow each other down). `env`: extra environment for the trainer processes (a value of None removes the
    variable). `grace_s`: how long a cancelled job gets to save before SIGTERM, and again before SIGKILL.
    """

    def __init__(self, root: str | Path | None = None, *, max_running: int | None = None,
                 env: dict[str, str | None] | None = None, grace_s: float = 30.0) -> None:
        if root is None:
            from app.registry import runs_dir

            root = runs_dir()
        self.root = Path(root)
        self.max_running = max(1, int(max_running or os.environ.get(MAX_JOBS_ENV) or 1))
        self.env = dict(env or {})
        self.grace_s = grace_s

    # ---- listing -----------------------------------------------------------------------------------------
    def list(self) -> list[Job]:
        """Every run directory with a job or trainer status, newest first."""
        if not self.root.is_dir():
            return []
        jobs = [self._snapshot(d) for d in self.root.iterdir()
                if d.is_dir() and not d.name.startswith(".")
                and ((d / JOB_FILE).exists() or (d / "status.json").exists())]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def get(self, name: str) -> Job:
        d = self._dir(name)
        if not ((d / JOB_FILE).exists() or (d / "status.json").exists()):
            raise JobError(f"no training run named {name!r} in {self.root}")
        return self._snapshot(d)

    def has_active(self) -> bool:
        return any(j.active for j in self.list())

    def metrics(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self._dir(name) / "metrics.jsonl")

    def samples(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self._dir(name) / "samples.jsonl")

    def log_tail(self, name: str, lines: int = 30) -> str:
        return tail(self._dir(name) / "train.log", lines)

    # ---- submitting and scheduling ----------------------------------------------------------------------
    def new_name(self, stem: str) -> str:
        """A free run name `stem-YYYYmmdd-HHMMSS` (with a counter if taken)."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "run"
        base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, i = base, 2
        while (self.root / name).exists():
            name, i = f"{base}-{i}", i + 1
        return name

    def submit(self, args: Sequence[str], name: str | None = None, env: dict[str, str | None] | None = None
               ) -> Job:
        """Queue a new training run (trainer CLI arguments without --out); `tick` starts it when a slot is
        free. `env`: environment changes for this job only (None removes a variable)."""
        if any(a in ("--out", "--resume") for a in args):
            raise JobError("give the trainer options without --out/--resume: the manager chooses the run "
                           "directory, and resume() continues a run")
        name = name or self.new_name("run")
        if not _NAME_RE.match(name):
            raise JobError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' (up to 80)")
        d = self.root / name
        try:
            d.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise JobError(f"a run named {name!r} already exists; choose another name") from None
        now = time.time()
        _write_json_atomic(d / JOB_FILE, {"name": name, "state": QUEUED, "args": list(args), "env": env or {},
                                          "created": now, "queued_at": now, "attempts": []})
        return self._snapshot(d)

    def tick(self) -> list[Job]:
        """Advance every job: reap finished children, escalate overdue cancels, export stopped runs' final/
        checkpoints, and start queued jobs in order while slots are free. Returns the job list."""
        jobs = self.list()
        for job in jobs:
            if job.state == STOPPING:
                self._escalate(job)
            if job.managed and job.state == STOPPED and job.resumable and self._final_is_stale(job):
                self.export_final(job.name)
        jobs = self.list()
        running = sum(1 for j in jobs if j.managed and j.state in (RUNNING, STOPPING))
        queued = sorted((j for j in jobs if j.managed and j.state == QUEUED),
                        key=lambda j: read_json_dict(j.dir / JOB_FILE).get("queued_at", j.created))
        started = False
        for job in queued:
            if running >= self.max_running:
                break
            self._launch(job.name)
            running += 1
            started = True
        return self.list() if started else jobs

    def _launch(self, name: str) -> None:
        d = self._dir(name)
        info = read_json_dict(d / JOB_FILE)
        resume = bool(info.get("resume"))
        args = [sys.executable, "-u", "-m", "model.train", "--no-progress"]
        if resume:
            args += ["--resume", "--out", str(d), *info.get("resume_args", [])]
        else:
            args += [*info.get("args", []), "--out", str(d)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        threads = os.environ.get(THREADS_ENV)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        for key, value in {**self.env, **info.get("env", {})}.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        (d / "STOP").unlink(missing_ok=True)
        with open(d / "train.log", "ab") as log:
            log.write(f"[manager] {'resuming' if resume else 'starting'}: {' '.join(args[2:])}\n".encode())
            log.flush()
            proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _CHILDREN[proc.pid] = proc
        start = process_start_time(proc.pid)
        info.update(state=RUNNING, pid=proc.pid, start_time=start, started=time.time(), stop_requested=None)
        info.setdefault("attempts", []).append({"pid": proc.pid, "started": time.time(), "resume": resume})
        _write_json_atomic(d / JOB_FILE, info)

    # ---- cancel, resume, delete -------------------------------------------------------------------------
    def cancel(self, name: str, *, wait: bool = False, timeout: float | None = None) -> Job:
        """Stop a job: a queued one leaves the queue; a running one gets a STOP file and SIGINT (it saves a
        checkpoint and exits), escalated to SIGTERM then SIGKILL after `grace_s` each (by `tick`, or here
        with `wait=True`, which returns once the process group is gone)."""
        d = self._dir(name)
        job = self.get(name)
        if job.state == QUEUED:
            info = read_json_dict(d / JOB_FILE)
            had_run = bool(info.get("attempts"))
            info.update(state=STOPPED if had_run else CANCELLED, cancelled=time.time())
            _write_json_atomic(d / JOB_FILE, info)
            return self.get(name)
        if job.state in (RUNNING, STOPPING):
            (d / "STOP").touch()
            if job.state == RUNNING:
                if job.managed:
                    info = read_json_dict(d / JOB_FILE)
                    info["stop_requested"] = time.time()
                    _write_json_atomic(d / JOB_FILE, info)
                if job.managed:
                    _signal_group(job.pid, signal.SIGINT)
                else:
                    _signal_pid(job.pid, signal.SIGINT)
            if wait:
                deadline = time.monotonic() + (timeout if timeout is not None else 2 * self.grace_s + 10)
                while time.monotonic() < deadline:
                    job = self.get(name)
                    if job.state not in (RUNNING, STOPPING):
                        break
                    self._escalate(job)
                    time.sleep(0.1)
                if job.managed and job.pid:
                    _signal_group(job.pid, signal.SIGKILL)  # anything the trainer left behind in its group
                    self._reap(job.pid)
                if job.state == STOPPED and job.resumable and self._final_is_stale(job):
                    self.export_final(name)
        return self.get(name)

    def _escalate(self, job: Job) -> None:
        info = read_json_dict(job.dir / JOB_FILE)
        asked = info.get("stop_requested")
        if not asked or not job.pid:
            return
        waited = time.time() - float(asked)
        if waited > 2 * self.grace_s:
            _signal_group(job.pid, signal.SIGKILL)
        elif waited > self.grace_s and not info.get("sigterm_sent"):
            _signal_group(job.pid, signal.SIGTERM)
            info["sigterm_sent"] = time.time()
            _write_json_atomic(job.dir / JOB_FILE, info)
        self._reap(job.pid)

    @staticmethod
    def _reap(pid: int) -> None:
        child = _CHILDREN.get(pid)
        if child is not None and child.poll() is not None:
            _CHILDREN.pop(pid, None)

    def resume(self, name: str, max_iters: int | None = None) -> Job:
        """Queue a stopped (or failed, or finished) run to continue from its last checkpoint; `max_iters`
        trains a finished run further."""
        job = self.get(name)
        if job.active:
            raise JobError(f"{name} is {job.state}; it can be resumed once it has stopped")
        if not job.resumable:
            raise JobError(f"{name} has no checkpoint to resume from (it stopped before saving one): start a "
                           "new run instead")
        d = self._dir(name)
        info = read_json_dict(d / JOB_FILE) or {"name": name, "created": job.created, "args": [], "attempts": [],
                                            "adopted": True}
        info.update(state=QUEUED, resume=True, queued_at=time.time(), stop_requested=None, sigterm_sent=None,
                    resume_args=["--max_iters", str(max_iters)] if max_iters else [])
        _write_json_atomic(d / JOB_FILE, info)
        return self.get(name)

    def delete(self, name: str) -> None:
        """Remove a run directory and everything in it. Refused while the job trains: cancel it first."""
        job = self.get(name)
        if job.state in (RUNNING, STOPPING):
            raise JobError(f"{name} is still {job.state}: cancel it and wait until it has stopped, then delete")
        shutil.rmtree(job.dir)

    # ---- stopped runs get a chat-able checkpoint ---------------------------------------------------------
    def _final_is_stale(self, job: Job) -> bool:
        card = read_json_dict(job.dir / "final" / "card.json")
        return not job.has_final or int(card.get("steps", -1)) != job.step

    def export_final(self, name: str, timeout: float = 300) -> bool:
        """Write final/ (our checkpoint format) from the resume checkpoint of a stopped run, in a subprocess
        with the job's environment (it finds the run's tokenizer the way the trainer did). True on success;
        a failure is noted in job.json and the run stays resumable."""
        d = self._dir(name)
        info = read_json_dict(d / JOB_FILE)
        env = {**os.environ}
        for key, value in {**self.env, **info.get("env", {})}.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        res = subprocess.run([sys.executable, "-m", "app.jobs", "export", str(d)], cwd=REPO_ROOT, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 and info:
            info["export_error"] = (res.stderr or res.stdout).strip()[-2000:]
            _write_json_atomic(d / JOB_FILE, info)
        return res.returncode == 0

    # ---- state ---------------------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        if not _NAME_RE.match(name or ""):
            raise JobError(f"invalid run name {name!r}")
        return self.root / name

    def _snapshot(self, d: Path) -> Job:
        from model.train import find_resume_checkpoint

        info = read_json_dict(d / JOB_FILE)
        status = read_json_dict(d / "status.json")
        config = read_json_dict(d / "config.json").get("train", {})
        metrics = read_jsonl(d / "metrics.jsonl")
        last_train = next((m for m in reversed(metrics) if "loss" in m), {})
        managed = bool(info)
        resumable = find_resume_checkpoint(d) is not None
        has_final = (d / "final" / "config.json").exists()
        message = str(status.get("message", ""))
        trainer_state = status.get("state")
        log_tail = ""
        if managed:
            pid, start = info.get("pid"), info.get("start_time")
            state = info.get("state", QUEUED)
            if state in (RUNNING, STOPPING):
                if process_alive(pid, start):
                    state = STOPPING if info.get("stop_requested") else RUNNING
                elif trainer_state in (FINISHED, STOPPED, FAILED):
                    state = trainer_state
                elif info.get("stop_requested"):  # killed while cancelling, before it could record "stopped"
                    state = STOPPED if resumable else CANCELLED
                    message = "cancelled" + ("" if resumable else " before the first checkpoint")
                else:
                    state = FAILED
                    message = ("the training process ended without recording why (killed, or it crashed "
                               "before it started); see the log")
            created = float(info.get("created", 0.0))
        else:  # a run started from a terminal: the trainer's status is all there is
            pid = status.get("pid")
            state = trainer_state or FAILED
            if state == RUNNING and not _is_trainer(pid, status.get("started_at")):
                state, message = FAILED, "the training process is gone and did not record why; see the log"
            created = _mtime(d / "config.json") or _mtime(d)
        if state == FAILED:
            log_tail = tail(d / "train.log", 25)
        if state == STOPPED and info.get("export_error") and not has_final:
            message += f" (no chat checkpoint: {info['export_error'].splitlines()[-1]})"
        max_iters = int(status.get("max_iters") or config.get("max_iters") or _arg(info, "--max_iters") or 0)
        if info.get("resume_args") and state in ACTIVE_STATES:
            max_iters = int(info["resume_args"][1])
        # status.json is rewritten at checkpoints; metrics.jsonl says where training is in between
        step = max(int(status.get("step") or 0), int(metrics[-1].get("step", 0)) if metrics else 0)
        return Job(
            name=d.name, dir=d, state=state, managed=managed, step=step,
            max_iters=max_iters, pid=pid, created=created, message=message, args=tuple(info.get("args", [])),
            train_config=config, last=metrics[-1] if metrics else {},
            tokens_per_s=last_train.get("tokens_per_s"), eta_s=last_train.get("eta_s") if state == RUNNING else None,
            resumable=resumable, has_final=has_final, log_tail=log_tail)


def _signal_pid(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _arg(info: dict[str, Any], flag: str) -> str | None:
    args = info.get("args", [])
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _is_trainer(pid: Any, started_at: Any) -> bool:
    """Is `pid` still the trainer of a terminal-started run? Its command line runs model.train and it started
    no later than the trainer's recorded start (a reused pid starts later)."""
    if not isinstance(pid, int) or not process_alive(pid, process_start_time(pid)):
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())
        created = proc.create_time()
    except (psutil.Error, OSError):
        return False
    if "model.train" not in cmd:
        return False
    try:
        recorded = time.mktime(time.strptime(str(started_at)[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return True
    return created <= recorded + 2


# ---- estimates -------------------------------------------------------------------------------------------------
#: Rough CPU training speed (tokens/s) by model size when no earlier run of that size measured one.
ROUGH_TOKENS_PER_S = {"toy": 3000.0, "small": 400.0, "medium": 60.0, "large": 15.0}


def measured_tokens_per_s(root: Path, model_size: str, arch: str) -> float | None:
    """The median training speed of earlier runs of this size and architecture under `root`, if any."""
    speeds = []
    if not root.is_dir():
        return None
    for d in root.iterdir():
        cfg = read_json_dict(d / "config.json").get("train", {})
        if cfg.get("model_size") != model_size or cfg.get("arch") != arch or cfg.get("model_overrides"):
            continue
        recs = [m["tokens_per_s"] for m in read_jsonl(d / "metrics.jsonl") if m.get("tokens_per_s")]
        if recs:
            speeds.append(sorted(recs)[len(recs) // 2])
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def estimate(*, model_size: str, arch: str, vocab_size: int, block_size: int, batch_size: int, max_iters: int,
             mtp_heads: int = 0, context_memory: int = 0, root: Path | None = None) -> dict[str, Any]:
    """Parameters of the model a run would train and a rough duration, without building anything.

    The speed is the median tokens/s of earlier runs of the same size here (`root`), else a rough constant;
    "measured" says which. Validation and samples add a little on top."""
    from model.config import ModelConfig, gpt2_matched, parameter_counts

    cfg = ModelConfig.preset(model_size, vocab_size=vocab_size, max_context=block_size)
    if arch == "gpt2":
        cfg = gpt2_matched(cfg)
    counts = parameter_counts(cfg)
    measured = measured_tokens_per_s(root, model_size, arch) if root is not None else None
    tps = measured or ROUGH_TOKENS_PER_S.get(model_size, 1000.0)
    tokens = batch_size * block_size * max_iters * (2 if context_memory else 1)
    seconds = tokens / tps * (1 + 0.15 * mtp_heads)
    return {"params_total": counts["total"], "params_active": counts["active"], "tokens": tokens,
            "tokens_per_s": tps, "measured": measured is not None, "seconds": seconds}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s:02d} s" if m else f"{s} s"


# ---- final/ from a resume checkpoint (runs in a subprocess: `python -m app.jobs export RUN_DIR`) -------------
def _export_main(run_dir: Path) -> None:
    """Copy ckpt/ weights and model config into final/ with the run's tokenizer and a card: our checkpoint
    format, written atomically."""
    from model import data
    from model.train import TrainConfig, find_resume_checkpoint, resolve_tokenizer

    ckpt = find_resume_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir} has no complete checkpoint in ckpt/")
    saved = read_json_dict(run_dir / "config.json")
    cfg = TrainConfig.from_dict(saved["train"])
    tokenizer = resolve_tokenizer(cfg, data.resolve_data_source(cfg.data, "train"), log=lambda _m: None)
    status = read_json_dict(run_dir / "status.json")
    from model.checkpoint import write_directory_atomically
    from model.config import ModelConfig, parameter_counts

    counts = parameter_counts(ModelConfig.from_json(ckpt / "config.json"))
    card = {"name": run_dir.name, "arch": saved.get("model", {}).get("arch"), "size": cfg.model_size,
            "params_total": counts["total"], "params_active": counts["active"], "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "data": cfg.data, "steps": int(status.get("step") or 0),
            "tokens_seen": status.get("tokens_seen"), "final_val_loss": status.get("last_val_loss"),
            "description": f"stopped at step {status.get('step')} of {cfg.max_iters}", "train_config": cfg.to_dict(),
            "exported_from": "ckpt", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    def fill(tmp: Path) -> None:
        shutil.copyfile(ckpt / "model.safetensors", tmp / "model.safetensors")
        shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        tokenizer.save(tmp)
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")

    write_directory_atomically(run_dir / "final", fill)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "export":
        _export_main(Path(sys.argv[2]))
    else:
        print("usage: python -m app.jobs export RUN_DIR", file=sys.stderr)
        sys.exit(2)
