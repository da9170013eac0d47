"""Model loading and generation for the app: one model in memory, one generation at a time, streaming.

Everything except `shared_manager()` is free of Streamlit, so it is tested directly.

* `ModelManager` holds the loaded model. A model from the registry is loaded once and reused by every browser
  tab. Switching models releases the old one; for a large model (gpt-oss) the old one is released *before* the
  new one loads, after a memory check, so two large models are never in memory together. A small model is
  swapped only once its replacement loaded, so a failed load leaves the previous model in place.
* Generation on a shared model is serialized by the model's lock: several tabs can chat safely; a second tab
  waits for the first reply to finish. The lock is taken when the reply starts streaming and released when it
  ends or is closed (Stop).
* `StoryReply` streams a nano model's continuation of the story so far (trimmed from the left to fit the
  context). `HarmonyReply` renders a gpt-oss conversation in the harmony format, streams tokens and parses
  them into the reasoning (analysis channel) and the final answer.
* The device is chosen automatically: CUDA when present, else the CPU.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from app.registry import HARMONY, ModelEntry, format_bytes
from model.harmony import (
    STOP_IDS,
    ContentDelta,
    HarmonyStreamParser,
    Message,
    MessageStart,
    Stop,
    SystemOptions,
    final_message,
    render_conversation_ids,
)
from model.sampling import SamplingParams

#: gpt-oss can attend to 131k tokens, but a chat in this app keeps at most this many (memory and speed).
HARMONY_CHAT_CONTEXT = 8192

STOP_REASON_TEXT = {
    "eos": "ended by the model",
    "return": "answer complete",
    "call": "asked for a tool (not supported)",
    "endoftext": "ended by the model",
    "max_tokens": "max new tokens reached",
    "stop_string": "stop string reached",
    "cancelled": "stopped by you",
}

Progress = Callable[[float, str], None]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


# ---- device and memory -------------------------------------------------------------------------------------
def pick_device() -> str:
    """'cuda' when a GPU is usable, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_memory_bytes(device: str) -> int:
    """Memory free for a model on `device` (model.gptoss_weights' measure, which the loader's check uses too)."""
    from model.gptoss_weights import free_memory_bytes as free

    return free(device)


def load_generator(entry: ModelEntry, device: str) -> Any:
    """Load a registry entry's checkpoint as a `model.generation.Generator` (any supported format)."""
    from model.generation import Generator

    return Generator.from_checkpoint(entry.path, device=device)


# ---- loaded models -----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model in memory: its registry entry, the Generator, and the lock that serializes generation on it."""

    entry: ModelEntry
    generator: Any
    device: str
    load_seconds: float
    lock: threading.Lock
    released: bool = False

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def max_context(self) -> int:
        cfg = getattr(self.generator.model, "config", None)
        limit = int(getattr(cfg, "max_context", 0) or 0) or HARMONY_CHAT_CONTEXT
        return min(limit, HARMONY_CHAT_CONTEXT) if self.kind == HARMONY else limit


class ModelManager:
    """The one model in memory, shared by every session (keep it in `st.cache_resource`)."""

    def __init__(self, loader: Callable[[ModelEntry, str], Any] | None = None, device: str | None = None):
        self._loader = loader
        self._device = device
        self._lock = threading.Lock()  # one load or switch at a time
        self._current: LoadedModel | None = None

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = pick_device()
        return self._device

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def load(self, entry: ModelEntry, progress: Progress | None = None) -> LoadedModel:
        """The loaded model for `entry`, loading it (and releasing the previous one) if needed.

        Raises ModelLoadError when the entry is not available, memory is short, or loading fails. A failed
        small-model load keeps the previous model; after a failed large-model load nothing is loaded and the
        caller may load the previous entry again.
        """
        report = progress or (lambda _f, _m: None)
        with self._lock:
            cur = self._current
            if cur is not None and cur.entry.id == entry.id and cur.entry.path == entry.path:
                return cur
            if not entry.available:
                raise ModelLoadError(f"{entry.name} is not available. {entry.instructions}".strip())
            release_first = entry.is_large or (cur is not None and cur.entry.is_large)
            report(0.05, "Checking memory")
            self._check_memory(entry, cur if release_first else None)
            if release_first and cur is not None:
                report(0.1, f"Releasing {cur.entry.name}")
                self._release(cur)
                self._current = None
            report(0.2, f"Reading {entry.name} weights ({format_bytes(entry.size_bytes)}) on {self.device}")
            loader = self._loader or load_generator
            t0 = time.perf_counter()
            try:
                generator = loader(entry, self.device)
            except MemoryError:
                gc.collect()
                raise ModelLoadError(f"{entry.name} ran out of memory while loading: it needs about "
                                     f"{format_bytes(entry.memory_bytes)}. Close other programs or pick a "
                                     "smaller model.") from None
            except Exception as e:  # every loader failure becomes a message in the UI, not a crash
                gc.collect()
                raise ModelLoadError(f"{entry.name} could not be loaded: {e}") from e
            loaded = LoadedModel(entry=entry, generator=generator, device=self.device,
                                 load_seconds=time.perf_counter() - t0, lock=threading.Lock())
            if cur is not None and not release_first:
                self._release(cur)
            self._current = loaded
            report(1.0, f"{entry.name} ready in {loaded.load_seconds:.1f} s")
            return loaded

    def release(self) -> None:
        """Free the loaded model (waits for a generation on it to finish)."""
        with self._lock:
            if self._current is not None:
                self._release(self._current)
                self._current = None

    def _check_memory(self, entry: ModelEntry, to_release: LoadedModel | None) -> None:
        need = entry.memory_bytes or 0
        if not need:
            return
        free = free_memory_bytes(self.device)
        if to_release is not None and to_release.device == self.device:
            free += to_release.entry.memory_bytes or 0
        if need > free:
            where = "GPU memory" if self.device.startswith("cuda") else "memory"
            raise ModelLoadError(
                f"{entry.name} needs about {format_bytes(need)} of {where}, but only {format_bytes(free)} is "
                f"free. Close other programs, use a machine with more {where}, or pick a smaller model.")

    @staticmethod
    def _release(loaded: LoadedModel) -> None:
        with loaded.lock:  # waits for a reply streaming from it
            loaded.released = True
            loaded.generator = None
        gc.collect()
        if loaded.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


# ---- reply statistics --------------------------------------------------------------------------------------
@dataclass
class ReplyStats:
    """What is shown under a reply."""

    tokens: int
    tokens_per_s: float
    time_to_first_token_s: float
    seed: int
    stop_reason: str
    elapsed_s: float
    prompt_tokens: int
    context_trimmed: bool = False

    @classmethod
    def from_result(cls, result: Any, stop_reason: str | None = None, context_trimmed: bool = False) -> ReplyStats:
        return cls(tokens=len(result.token_ids), tokens_per_s=float(result.tokens_per_s),
                   time_to_first_token_s=float(result.time_to_first_token_s), seed=int(result.seed),
                   stop_reason=stop_reason or result.stop_reason, elapsed_s=float(result.elapsed_s),
                   prompt_tokens=int(result.prompt_tokens),
                   context_trimmed=bool(context_trimmed or result.context_trimmed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: tokens · tokens/s · time to first token · seed · why it stopped."""
        why = STOP_REASON_TEXT.get(self.stop_reason, self.stop_reason)
        line = (f"{self.tokens} tokens · {self.tokens_per_s:.1f} tokens/s · first token "
                f"{self.time_to_first_token_s:.2f} s · seed {self.seed} · {why}")
        if self.context_trimmed:
            line += " · the start of the story was left out to fit the context"
        return line


# ---- streaming replies -------------------------------------------------------------------------------------
class _Reply:
    """Shared lifecycle: take the model's lock on the first `next()`, release it when done or closed."""

    def __init__(self, loaded: LoadedModel, cancel: threading.Event | None):
        self.loaded = loaded
        self.cancel = cancel if cancel is not None else threading.Event()
        self.stats: ReplyStats | None = None
        self._stream: Any = None  # the generator's stream, once the first piece is asked for
        self._trimmed = False  # the prompt was cut from the left to fit the context
        self._locked = False
        self._done = False

    def _acquire(self) -> Any:
        if not self._locked:
            self.loaded.lock.acquire()
            self._locked = True
            if self.loaded.released or self.loaded.generator is None:
                self._release_lock()
                self._done = True
                raise ModelLoadError(f"{self.loaded.entry.name} was unloaded (another tab switched models): "
                                     "send your message again.")
        return self.loaded.generator

    def _release_lock(self) -> None:
        if self._locked:
            self._locked = False
            self.loaded.lock.release()

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop (if still running), record the stats, free the model for the next reply."""
        if self._done and self.stats is not None:
            return
        self._done = True
        try:
            if self._stream is not None:
                self._stream.close()
                if self._stream.result is not None:
                    self.stats = self._stats(self._stream.result)
        finally:
            self._release_lock()

    def _stats(self, result: Any) -> ReplyStats:
        return ReplyStats.from_result(result, context_trimmed=self._trimmed)

    def __del__(self) -> None:  # a reply dropped without close() must not keep the model locked
        self._release_lock()


class StoryReply(_Reply):
    """Iterator of text pieces continuing a story. `.text` so far; `.stats` once finished or closed."""

    def __init__(self, loaded: LoadedModel, story: str, params: SamplingParams,
                 cancel: threading.Event | None = None):
        super().__init__(loaded, cancel)
        self.story = story
        self.params = params
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def prompt_ids(self, generator: Any) -> list[int]:
        """The story as ids, cut from the left to leave room for the reply (BOS only when nothing was cut)."""
        ids = generator.encode_prompt(self.story) if self.story else generator.encode_prompt("")
        budget = max(self.loaded.max_context - self.params.max_new_tokens, self.loaded.max_context // 2, 1)
        if len(ids) > budget:
            self._trimmed = True
            ids = generator.tokenizer.encode(self.story)[-budget:]
        return ids

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        generator = self._acquire()
        try:
            if self._stream is None:
                self._stream = generator.stream(self.prompt_ids(generator), self.params, cancel=self.cancel)
            piece = next(self._stream)
        except BaseException:  # the end of the stream (StopIteration) included
            self.close()
            raise
        self.pieces.append(piece)
        return piece


def harmony_messages(history: Sequence[dict[str, Any]]) -> list[Message]:
    """Chat history (dicts with role and content) as harmony messages: assistant turns as final answers."""
    out = []
    for m in history:
        if m["role"] == "user":
            out.append(Message("user", m["content"]))
        elif m["role"] == "assistant" and m.get("content"):
            out.append(Message("assistant", m["content"], channel="final"))
    return out


class HarmonyReply(_Reply):
    """Iterator of (channel, text) pieces of a gpt-oss reply: channel "analysis" (reasoning), "final" (the
    answer) or None (text outside any channel, shown as the answer). `.reasoning` and `.answer` so far."""

    def __init__(self, loaded: LoadedModel, history: Sequence[dict[str, Any]], params: SamplingParams,
                 reasoning_effort: str = "low", cancel: threading.Event | None = None):
        super().__init__(loaded, cancel)
        self.history = list(history)
        self.params = params
        self.system = SystemOptions(reasoning_effort=reasoning_effort).with_today()  # type: ignore[arg-type]
        self.reasoning_parts: list[str] = []
        self.answer_parts: list[str] = []
        self.loose_parts: list[str] = []
        self._parser: HarmonyStreamParser | None = None
        self._queue: list[tuple[str | None, str]] = []
        self._stop_reason: str | None = None

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def answer(self) -> str:
        """The final answer so far; text outside any channel counts when there is no final channel."""
        if self.answer_parts:
            return "".join(self.answer_parts)
        return "".join(self.loose_parts).strip()

    def prompt_ids(self, generator: Any) -> list[int]:
        """The conversation rendered in harmony; the oldest turns are dropped while it is too long."""
        messages = harmony_messages(self.history)
        budget = max(self.loaded.max_context - self.params.max_new_tokens, self.loaded.max_context // 2, 1)
        while True:
            ids = render_conversation_ids(generator.tokenizer, messages, self.system)
            if len(ids) <= budget or len(messages) <= 1:
                return ids
            self._trimmed = True
            messages = messages[1:]
            while messages and messages[0].role != "user":
                messages = messages[1:]

    def _route(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, ContentDelta):
                if ev.channel == "analysis":
                    self.reasoning_parts.append(ev.text)
                elif ev.channel == "final":
                    self.answer_parts.append(ev.text)
                elif ev.channel is None:
                    self.loose_parts.append(ev.text)
                else:  # commentary (tool preambles): show as reasoning
                    self.reasoning_parts.append(ev.text)
                    ev = ContentDelta("analysis", ev.text, ev.recipient)
                self._queue.append((ev.channel, ev.text))
            elif isinstance(ev, Stop):
                self._stop_reason = ev.reason
            elif isinstance(ev, MessageStart):
                pass

    def __next__(self) -> tuple[str | None, str]:
        while not self._queue:
            if self._done:
                raise StopIteration
            generator = self._acquire()
            try:
                if self._stream is None:
                    self._parser = HarmonyStreamParser(generator.tokenizer)
                    self._stream = generator.stream_tokens(self.prompt_ids(generator), self.params,
                                                           stop_ids=STOP_IDS, cancel=self.cancel)
                tok = next(self._stream)
            except StopIteration:
                self._finish_parser()
                self.close()
                continue
            except BaseException:
                self.close()
                raise
            assert self._parser is not None
            self._route(self._parser.push(tok))
        return self._queue.pop(0)

    def _finish_parser(self) -> None:
        if self._parser is not None:
            self._route(self._parser.finish())

    @property
    def messages(self) -> list[Message]:
        return list(self._parser.messages) if self._parser is not None else []

    def final(self) -> Message | None:
        return final_message(self.messages)

    def _stats(self, result: Any) -> ReplyStats:
        reason = None
        if result.stop_reason == "eos":  # <|return|>, <|call|> or <|endoftext|>
            reason = self._stop_reason or ("return" if self.answer_parts else "endoftext")
        return ReplyStats.from_result(result, stop_reason=reason, context_trimmed=self._trimmed)


# ---- stories -----------------------------------------------------------------------------------------------
def story_text(messages: Sequence[dict[str, Any]]) -> str:
    """The story so far from the chat: the user's parts and the model's continuations in order.

    A model continuation is appended exactly as generated (it may continue a word); a part the user writes
    after a continuation gets a space when neither side has whitespace at the seam.
    """
    text = ""
    for m in messages:
        part = m.get("content") or ""
        if not part:
            continue
        if m["role"] == "user" and text and not text[-1].isspace() and not part[0].isspace():
            text += " "
        text += part
    return text


# ---- Streamlit glue ----------------------------------------------------------------------------------------
_cached_manager: Callable[[], ModelManager] | None = None


def shared_manager() -> ModelManager:
    """The process-wide ModelManager, kept in `st.cache_resource` (created on first use, freed on clear)."""
    global _cached_manager
    if _cached_manager is None:
        import streamlit as st

        @st.cache_resource(show_spinner=False, on_release=lambda m: m.release())
        def _manager() -> ModelManager:
            return ModelManager()

        _cached_manager = _manager
    return _cached_manager()
