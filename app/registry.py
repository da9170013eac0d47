"""Which models the app can offer: our checkpoints in weights/, finished runs in runs/, and gpt-oss.

Everything here reads small JSON files and file sizes only: no weights are loaded and neither torch nor
Streamlit is imported, so the registry is cheap to rebuild on every page run and easy to test.

Model ids are the only way the UI names a model (``weights/<dir>``, ``runs/<run>``, ``gpt-oss-20b``,
``gpt-oss-120b``). The engine loads an entry's ``path``, which the registry built itself from those roots;
no free-text path typed by a user ever reaches the loader.

Roots: ``STORYFORGE_WEIGHTS_DIR`` (default ``<repo>/weights``) and ``STORYFORGE_RUNS_DIR`` (default
``<repo>/runs``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ModelConfig, parameter_counts

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_ENV = "STORYFORGE_WEIGHTS_DIR"
RUNS_ENV = "STORYFORGE_RUNS_DIR"

DEFAULT_MODEL_ID = "weights/default"
GPT_OSS_MODELS = ("gpt-oss-20b", "gpt-oss-120b")
DOWNLOAD_MARKER = ".download_complete.json"

STORY = "story"  # a nano story model: the user writes an opening, the model continues it
HARMONY = "harmony"  # gpt-oss and other o200k_harmony models: a conversation in the harmony format

#: A model whose estimated memory is at least this is "large": the engine releases the current model
#: before loading it, so two such models are never in memory together.
LARGE_MODEL_BYTES = 2 * 1024**3

#: Context the memory estimate of gpt-oss reserves a KV cache for (the app never fills 131k tokens).
GPT_OSS_CHAT_CONTEXT = 8192

_GPT_OSS_INFO = {
    "gpt-oss-20b": "OpenAI's open-weight reasoning model (mixture of experts, MXFP4 weights; Apache-2.0). "
                   "Chat in the harmony format with visible reasoning.",
    "gpt-oss-120b": "OpenAI's larger open-weight reasoning model (mixture of experts, MXFP4 weights; "
                    "Apache-2.0). Needs a machine with about 64 GB of memory or more.",
}


_DOWNLOAD_BYTES = {"gpt-oss-20b": 14 * 1024**3, "gpt-oss-120b": 65 * 1024**3}  # original/ MXFP4 files


class RegistryError(LookupError):
    """A model id the registry does not know; the message lists what is available."""


@dataclass(frozen=True)
class ModelEntry:
    """One model the UI can list. ``available`` False means it is shown with ``how_to_get`` instead."""

    id: str
    name: str
    kind: str  # STORY or HARMONY
    path: Path
    available: bool
    how_to_get: str = ""  # prose for an unavailable entry
    command: str = ""  # the command that gets it, if there is one
    params_total: int | None = None
    params_active: int | None = None
    size_bytes: int | None = None  # on disk
    memory_bytes: int | None = None  # estimated memory needed to chat with it
    context_length: int | None = None
    source: str = ""  # where it came from
    description: str = ""
    problem: str = ""  # why an existing directory cannot be used (broken config, unfinished download)
    card: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_large(self) -> bool:
        return (self.memory_bytes or 0) >= LARGE_MODEL_BYTES

    @property
    def instructions(self) -> str:
        """How to get it, as one Markdown line (prose and the command)."""
        return self.how_to_get + (f" Run `{self.command}`" if self.command else "")

    @property
    def label(self) -> str:
        """Dropdown label: name, size and, when not available, a marker."""
        size = f" · {format_count(self.params_total)}" if self.params_total else ""
        return f"{self.name}{size}" + ("" if self.available else " (not available)")


# ---- roots --------------------------------------------------------------------------------------------------
def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or REPO_ROOT / "weights")


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV) or REPO_ROOT / "runs")


# ---- formatting helpers (used by the pages) -----------------------------------------------------------------
def format_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


# ---- listing ------------------------------------------------------------------------------------------------
def list_models(weights_root: Path | None = None, runs_root: Path | None = None) -> list[ModelEntry]:
    """Every model the app knows about, available or not, in display order.

    Order: the shipped default, other checkpoints in weights/, finished runs (newest first), gpt-oss-20b,
    gpt-oss-120b. The default and gpt-oss entries are always listed, with how to get them when missing.
    """
    wroot = Path(weights_root) if weights_root is not None else weights_dir()
    rroot = Path(runs_root) if runs_root is not None else runs_dir()
    entries: list[ModelEntry] = []

    default_dir = wroot / "default"
    if (default_dir / "config.json").exists():
        entries.append(_checkpoint_entry(DEFAULT_MODEL_ID, "Default story model", default_dir,
                                         "shipped with the app (weights/default)"))
    else:
        entries.append(ModelEntry(
            id=DEFAULT_MODEL_ID, name="Default story model", kind=STORY, path=default_dir, available=False,
            how_to_get="The default model is not in weights/default yet. Train one on the Train page or from a "
                       "terminal; finished runs appear in the model list.",
            command="python -m model.train --preset small --out runs/my-model",
            source="shipped with the app (weights/default)"))

    if wroot.is_dir():
        for d in sorted(p for p in wroot.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if d.name == "default" or d.name in GPT_OSS_MODELS:
                continue
            if (d / "config.json").exists():
                entries.append(_checkpoint_entry(f"weights/{d.name}", d.name, d, f"weights/{d.name}"))

    if rroot.is_dir():
        runs = [p for p in rroot.iterdir() if p.is_dir() and (p / "final" / "config.json").exists()]
        runs.sort(key=lambda p: (p / "final" / "config.json").stat().st_mtime, reverse=True)
        for run in runs:
            entries.append(_checkpoint_entry(f"runs/{run.name}", f"Run: {run.name}", run / "final",
                                             f"trained here (runs/{run.name})"))

    for name in GPT_OSS_MODELS:
        entries.append(_gpt_oss_entry(name, wroot / name))
    return entries


def get_model(model_id: str, entries: list[ModelEntry] | None = None) -> ModelEntry:
    """The entry with this id; RegistryError (listing the known ids) when there is none."""
    entries = list_models() if entries is None else entries
    for e in entries:
        if e.id == model_id:
            return e
    known = ", ".join(e.id for e in entries if e.available) or "none"
    raise RegistryError(f"unknown model {model_id!r}; available models: {known}")


def default_model_id(entries: list[ModelEntry]) -> str | None:
    """The model selected on a fresh start: weights/default, else the first available story model, else the
    first available model of any kind, else None (nothing to chat with yet)."""
    available = [e for e in entries if e.available]
    for e in available:
        if e.id == DEFAULT_MODEL_ID:
            return e.id
    for e in available:
        if e.kind == STORY:
            return e.id
    return available[0].id if available else None


# ---- entry builders -----------------------------------------------------------------------------------------
def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def _checkpoint_kind(path: Path, card: dict[str, Any]) -> str:
    if card.get("kind") in (STORY, HARMONY):
        return card["kind"]
    info = read_json_dict(path / "tokenizer_info.json")
    return HARMONY if info.get("encoding") == "o200k_harmony" else STORY


def _kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * bytes_per_value


def _checkpoint_entry(model_id: str, name: str, path: Path, source: str) -> ModelEntry:
    """An entry for a directory in our checkpoint format (listed as unavailable when it is broken)."""
    card = read_json_dict(path / "card.json")
    kind = _checkpoint_kind(path, card)
    display = str(card.get("name") or name)
    try:
        cfg = ModelConfig.from_json(path / "config.json")
    except (OSError, ValueError, TypeError) as e:
        return ModelEntry(id=model_id, name=display, kind=kind, path=path, available=False,
                          how_to_get="Re-save or re-train this checkpoint.", source=source, card=card,
                          problem=f"config.json cannot be read: {e}")
    counts = parameter_counts(cfg)
    weights = path / "model.safetensors"
    weights_bytes = weights.stat().st_size if weights.exists() else 0
    problem = "" if weights.exists() else "model.safetensors is missing"
    # Weights as stored, a KV cache for the full context (fp32), plus ~10% for activations and logits.
    memory = int((weights_bytes + _kv_cache_bytes(cfg, cfg.max_context, 4)) * 1.1) + 64 * 1024**2
    return ModelEntry(
        id=model_id, name=display, kind=kind, path=path, available=not problem,
        how_to_get="Re-save or re-train this checkpoint." if problem else "",
        params_total=counts["total"], params_active=counts["active"], size_bytes=_dir_size(path),
        memory_bytes=memory, context_length=cfg.max_context, source=source,
        description=describe_card(card), problem=problem, card=card)


def gpt_oss_memory_bytes(name: str) -> int:
    """Memory to chat with gpt-oss: MXFP4 expert weights (4.25 bits each), everything else bf16, a bf16 KV cache
    for GPT_OSS_CHAT_CONTEXT tokens, and 1 GB of working memory."""
    cfg = ModelConfig.preset(name)
    counts = parameter_counts(cfg)
    expert_weights = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    other = counts["total"] - expert_weights
    return int(expert_weights * 4.25 / 8 + other * 2 + _kv_cache_bytes(cfg, GPT_OSS_CHAT_CONTEXT, 2)) + 1024**3


def _gpt_oss_entry(name: str, path: Path) -> ModelEntry:
    counts = parameter_counts(ModelConfig.preset(name))
    command = f"python download_weights.py --model {name}"
    marker = path / DOWNLOAD_MARKER
    available = marker.exists()
    problem = ""
    if not available and path.exists():
        problem = "the download is incomplete or was not verified"
    return ModelEntry(
        id=name, name=name, kind=HARMONY, path=path, available=available,
        how_to_get="" if available else f"Not downloaded yet (needs internet and about "
                                         f"{format_bytes(_DOWNLOAD_BYTES[name])} of disk).",
        command="" if available else command,
        params_total=counts["total"], params_active=counts["active"],
        size_bytes=_dir_size(path) if path.exists() else None, memory_bytes=gpt_oss_memory_bytes(name),
        context_length=131072, source="OpenAI, Hugging Face Hub openai/" + name,
        description=_GPT_OSS_INFO[name], problem=problem, card=read_json_dict(marker) if available else {})


def describe_card(card: dict[str, Any]) -> str:
    """A one-line summary of a card.json: its description, or the training facts it records."""
    if not card:
        return ""
    if isinstance(card.get("description"), str) and card["description"]:
        return card["description"]
    parts = []
    for key, label in (("preset", "preset"), ("dataset", "data"), ("steps", "steps"), ("tokens", "tokens"),
                       ("val_loss", "validation loss"), ("bits_per_byte", "bits/byte")):
        value = card.get(key)
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.3f}"
        parts.append(f"{label} {value}")
    return ", ".join(parts)
