"""Text generation: prefill the prompt in one forward, then decode one token at a time with a KV cache.

    gen = Generator.from_checkpoint("weights/small")          # load once
    stream = gen.stream("Once upon a time", SamplingParams(temperature=0.7, top_k=50))
    for piece in stream:                                       # stream many times
        print(piece, end="", flush=True)
    print(stream.result.stop_reason, stream.result.tokens_per_s)

What happens per call (all of it lives in the call, nothing on the Generator, so one model can serve several
sessions at once):

* The prompt is encoded (BOS first) and run through the model in one batched forward that fills a fresh
  `ModelCache`. Sliding-window layers keep a ring buffer of the last `window` keys/values, full-attention layers
  grow with the context (see `model/layers.py`).
* Each step samples the next token with `model/sampling.py` (HF semantics; the repetition-penalty context is the
  prompt plus everything generated) from a per-call `torch.Generator` seeded with the resolved seed, then feeds
  that one token back through the model.
* Generation ends on a stop id (the tokenizer's EOS by default; never emitted), a stop string (never emitted:
  text that could be the start of one is held back until it is decided), the token budget, or cancellation.
* When the next position would pass `model.config.max_context`, the most recent 3/4 of the context is
  prefilled into a new cache and decoding goes on (`context_trimmed=True`, and a log warning), instead of crashing.
* Text comes out through `IncrementalDetokenizer`, which decodes a short tail of tokens per step (constant work
  per token) and never emits half of a multi-byte character.

The seeds' API is kept: `generate_text`, `load_model_and_generate`, `TokenGenerator`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .sampling import SamplingParams, make_generator, resolve_seed, sample_next

log = logging.getLogger(__name__)

STOP_REASONS = ("eos", "stop_string", "max_tokens", "cancelled")
TRIM_FRACTION = 0.75  # on reaching max_context, keep this share of the most recent tokens
_REPLACEMENT = "\ufffd"  # what decoders produce for an incomplete UTF-8 sequence


@dataclass
class GenerationResult:
    """The outcome of one generation call.

    text: the continuation as emitted (stop strings and stop tokens excluded; not the prompt).
    token_ids: generated ids (the stop id that ended the call is not included; with a stop string, the ids
        that spelled it are).
    prompt_tokens: prompt length in tokens, BOS included.
    stop_reason: "eos" (a stop id), "stop_string", "max_tokens" or "cancelled".
    seed: the seed actually used (the drawn one when the request asked for -1): re-run with it to reproduce.
    time_to_first_token_s: from the start of the call (prefill included) to the first generated token.
    tokens_per_s: decode speed, tokens after the first divided by the time after the first.
    elapsed_s: wall time of the whole call.
    context_trimmed: the context reached the model's limit and older tokens were dropped.
    stop_id: the stop id that ended the call (stop_reason "eos"), else None.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stop_reason: str
    seed: int
    time_to_first_token_s: float
    tokens_per_s: float
    elapsed_s: float
    context_trimmed: bool = False
    stop_id: int | None = None


# ---- incremental detokenizer -------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns token ids into text pieces as they arrive, with constant work per token.

    Each step decodes only a short window: the tokens already emitted since the last boundary (the "prefix")
    and the same plus the new ones, and emits the difference. Decoding the prefix too keeps tokenizer quirks
    that depend on the start of the string (SentencePiece drops a leading space) out of the pieces. While the
    decoded text ends in U+FFFD, the last token stopped in the middle of a multi-byte character (byte-level
    BPE splits emoji and accents), so nothing is emitted until a later token completes it.

    `context_ids` (the end of the prompt) gives the first generated token its proper leading space.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = (), context_tokens: int = 6):
        self._decode = tokenizer.decode
        ids = [int(i) for i in list(context_ids)[-context_tokens:]] if context_tokens else []
        prefix_text = self._decode(ids) if ids else ""
        if prefix_text.endswith(_REPLACEMENT):  # the prompt ends inside a character: start clean
            ids, prefix_text = [], ""
        self._ids = ids
        self._read = len(ids)  # ids[:_read] have been emitted (or are context)
        self._prefix_text = prefix_text  # decode(ids[:_read])

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        full = self._decode(self._ids)
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        piece = full[len(self._prefix_text):]
        # Next window starts at the tokens just emitted: they are the new prefix.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        full = self._decode(self._ids)
        piece = full[len(self._prefix_text):] if len(full) > len(self._prefix_text) else ""
        self._ids = self._ids[len(self._ids):]
        self._read, self._prefix_text = 0, ""
        return piece


class StopStringMatcher:
    """Cuts text at the first stop string, holding back any tail that could still become one.

    `feed(piece) -> (safe_text, stopped)`: `safe_text` can be shown now; once `stopped` is True the text before
    the stop string has been returned and the stop string itself never is. `flush()` releases the held tail at
    the natural end of a generation (it did not turn into a stop string)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = 0
        for s in self.stops:  # longest proper prefix of a stop string that the text ends with
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# ---- one decoding run ----------------------------------------------------------------------------------------
class _DecodeRun:
    """State of one generation call (cache, RNG, counters) and its token loop."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: Iterable[int], cancel: threading.Event | None,
                 cache: Any = None, cached_ids: Sequence[int] = ()):
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give some text, or a tokenizer with a BOS id (add_bos=True)")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.params = params
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.cancel = cancel
        self.seed = resolve_seed(params)
        self.max_context = int(model.config.max_context)
        self.generated: list[int] = []
        self.stop_reason: str | None = None
        self.context_trimmed = False
        self.t_start = self.t_first = self.t_last = None
        self.t_end: float | None = None
        # Reuse of a cache that already holds a prefix of the prompt (TokenGenerator's multi-turn calls).
        self._cache = cache
        self._cached = len(cached_ids) if cache is not None else 0
        self.cache: Any = None  # this call's cache (kept at the end for reuse by TokenGenerator)
        self.in_cache = 0
        self.last_stop_id: int | None = None

    # The model forward and sampling run under inference_mode, but not across `yield`: grad mode is
    # thread-local and must not leak into the consumer's code between steps.
    def _forward(self, ids: list[int] | torch.Tensor, cache: Any) -> torch.Tensor:
        with torch.inference_mode():
            if not isinstance(ids, torch.Tensor):
                ids = torch.tensor([ids], dtype=torch.long, device=self._device)
            last_logits = getattr(self.model, "last_logits", None)  # ours: no unembedding of the other positions
            return last_logits(ids, cache) if last_logits is not None else self.model(ids, cache)[:, -1, :]

    def _fresh_prefill(self, ids: list[int]) -> tuple[Any, torch.Tensor]:
        with torch.inference_mode():
            cache = self.model.new_cache(1)
        return cache, self._forward(ids, cache)

    def tokens(self) -> Iterator[int]:
        params, model = self.params, self.model
        self._device = next(model.parameters()).device
        self.t_start = time.perf_counter()
        gen = make_generator(self.seed)
        ids = self.prompt_ids
        keep = max(1, int(self.max_context * TRIM_FRACTION))
        if len(ids) >= self.max_context:  # the prompt alone fills the context: keep its most recent part
            self._trimmed(keep)
            self.cache, logits = self._fresh_prefill(ids[-keep:])
        elif self._cache is not None and 0 < self._cached < len(ids):
            self.cache = self._cache
            logits = self._forward(ids[self._cached:], self.cache)
        else:
            self.cache, logits = self._fresh_prefill(ids)
        self._cache = None
        self.in_cache = len(ids)  # prompt + generated ids the cache holds (meaningful while not trimmed)
        # Repetition penalty / no-repeat-ngram context (prompt + generated): a preallocated tensor whose growing
        # prefix is passed, so there is no list -> tensor conversion per token.
        context = None
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0:
            context = torch.empty((1, len(ids) + min(params.max_new_tokens, 4096)), dtype=torch.long)
            context[0, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        n_ctx = len(ids)
        for step in range(params.max_new_tokens):
            if self.cancel is not None and self.cancel.is_set():
                self.stop_reason = "cancelled"
                break
            with torch.inference_mode():
                nxt = sample_next(logits, context[:, :n_ctx] if context is not None else None, params, gen)
            tok = int(nxt[0])
            now = time.perf_counter()
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
            if tok in self.stop_ids:
                self.stop_reason = "eos"
                self.last_stop_id = tok
                break
            self.generated.append(tok)
            if context is not None:
                if n_ctx == context.shape[1]:
                    context = torch.cat([context, torch.empty_like(context)], dim=1)
                context[0, n_ctx] = tok
            n_ctx += 1
            yield tok
            if step == params.max_new_tokens - 1:
                self.stop_reason = "max_tokens"
                break
            if self.cancel is not None and self.cancel.is_set():
                self.stop_reason = "cancelled"
                break
            if self.cache.length >= self.max_context:  # the next position would pass the model's limit
                self._trimmed(keep)
                self.cache, logits = self._fresh_prefill((self.prompt_ids + self.generated)[-keep:])
            else:
                logits = self._forward(nxt.view(1, 1).to(self._device), self.cache)
                self.in_cache += 1
        self.t_end = time.perf_counter()

    @property
    def cache_ids(self) -> list[int] | None:
        """The ids the final cache holds, in order (None once the context was trimmed: not a plain prefix)."""
        if self.cache is None or self.context_trimmed:
            return None
        return (self.prompt_ids + self.generated)[:self.in_cache]

    def _trimmed(self, keep: int) -> None:
        if not self.context_trimmed:
            log.warning("context reached the model's limit of %d tokens: continuing from the most recent %d "
                        "(earlier text is forgotten)", self.max_context, keep)
        self.context_trimmed = True

    def finish(self, text: str | None = None) -> GenerationResult:
        """The result so far; a run that has not reached a stop condition counts as cancelled."""
        if self.stop_reason is None:
            self.stop_reason = "cancelled"
        now = time.perf_counter()
        t_end = self.t_end or now
        start = self.t_start if self.t_start is not None else t_end
        ttft = (self.t_first - start) if self.t_first is not None else 0.0
        n = len(self.generated)
        if n > 1 and self.t_first is not None and self.t_last > self.t_first:
            tps = (n - 1) / (self.t_last - self.t_first)
        else:
            tps = n / (t_end - start) if t_end > start else 0.0
        if text is None:
            text = self.tokenizer.decode(self.generated) if self.tokenizer is not None and n else ""
        return GenerationResult(text=text, token_ids=list(self.generated), prompt_tokens=len(self.prompt_ids),
                                stop_reason=self.stop_reason, seed=self.seed, time_to_first_token_s=ttft,
                                tokens_per_s=tps, elapsed_s=t_end - start, context_trimmed=self.context_trimmed,
                                stop_id=self.last_stop_id)


class TokenStream:
    """Iterator of generated token ids. `.result` is set when it ends, or when `.close()` stops it early
    (stop_reason "cancelled", tokens so far kept). Usable as a context manager."""

    def __init__(self, run: _DecodeRun):
        self._run = run
        self._it = run.tokens()
        self.result: GenerationResult | None = None

    @property
    def seed(self) -> int:
        """The seed this call uses (known before the first token)."""
        return self._run.seed

    @property
    def context_trimmed(self) -> bool:
        return self._run.context_trimmed

    @property
    def stop_id(self) -> int | None:
        """The stop id that ended the stream (it is not yielded), or None."""
        return self._run.last_stop_id

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self.result = self._run.finish()
            raise

    def _stop(self, reason: str) -> None:
        if self.result is None:
            self._it.close()
            if self._run.stop_reason is None:
                self._run.stop_reason = reason
            self.result = self._run.finish()

    def close(self) -> None:
        """Stop generating now; `.result` keeps what was produced (stop_reason "cancelled" if unfinished)."""
        self._stop("cancelled")

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TextStream:
    """Iterator of text pieces (never half a character, never a stop string). `.result` is set when it ends
    or on `.close()`; `result.text` is exactly the concatenation of the pieces yielded."""

    def __init__(self, run: _DecodeRun, tokenizer: Any):
        self._tokens = TokenStream(run)
        self._detok = IncrementalDetokenizer(tokenizer, run.prompt_ids)
        self._stops = StopStringMatcher(run.params.stop)
        self._pieces: list[str] = []
        self.result: GenerationResult | None = None

    @property
    def seed(self) -> int:
        return self._tokens.seed

    @property
    def context_trimmed(self) -> bool:
        return self._tokens.context_trimmed

    @property
    def text(self) -> str:
        """Text yielded so far."""
        return "".join(self._pieces)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.result is None:
            try:
                tok = next(self._tokens)
            except StopIteration:  # eos / max_tokens / cancel event: release what is held back
                piece, _ = self._stops.feed(self._detok.flush())
                piece += self._stops.flush()
                self._finish()
                if piece:
                    self._pieces.append(piece)
                    self.result = replace(self.result, text=self.text)
                    return piece
                break
            piece, stopped = self._stops.feed(self._detok.add(tok))
            if stopped:
                self._tokens._stop("stop_string")
                if piece:
                    self._pieces.append(piece)
                self._finish()
                if piece:
                    return piece
                break
            if piece:
                self._pieces.append(piece)
                return piece
        raise StopIteration

    def _finish(self) -> None:
        self._tokens._stop("cancelled")  # no-op when the run already ended
        assert self._tokens.result is not None
        self.result = replace(self._tokens.result, text=self.text)

    def close(self) -> None:
        """Stop now; `.result.text` is the text yielded so far (held-back fragments are dropped)."""
        if self.result is None:
            self._finish()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the app's entry point -----------------------------------------------------------------------------------
class Generator:
    """A loaded model and tokenizer: load once, stream many times, from several threads if need be.

    The Generator holds no per-call state (each call gets its own cache, RNG and counters); the model is only
    read. Running two calls at once on one model is safe; whether it is faster than one after the other depends
    on the cores (the app serializes calls per model)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: str | torch.device | None = None):
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> Generator:
        """Load a checkpoint directory (model + the tokenizer saved with it)."""
        from .checkpoint import load_checkpoint

        model, tokenizer, _card = load_checkpoint(path, device=device, dtype=dtype)
        return cls(model, tokenizer)

    def encode_prompt(self, prompt: str | Sequence[int], add_bos: bool = True) -> list[int]:
        """Token ids for a prompt: text is encoded (BOS first when the tokenizer has one and `add_bos`); a list
        of ids is used as given."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
            bos = getattr(self.tokenizer, "bos_id", None)
            if add_bos and bos is not None:
                ids = [int(bos)] + ids
            return ids
        return [int(i) for i in prompt]

    def _stop_ids(self, stop_ids: Iterable[int] | None) -> frozenset[int]:
        if stop_ids is None:
            return frozenset(getattr(self.tokenizer, "stop_ids", frozenset()) or ())
        return frozenset(int(i) for i in stop_ids)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams, *, stop_ids: Iterable[int] | None = None,
               cancel: threading.Event | None = None, add_bos: bool = True) -> TextStream:
        """Stream the continuation of `prompt` as text pieces. Nothing runs until the first `next()`."""
        run = _DecodeRun(self.model, self.tokenizer, self.encode_prompt(prompt, add_bos), params,
                         self._stop_ids(stop_ids), cancel)
        return TextStream(run, self.tokenizer)

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                      stop_ids: Iterable[int] | None = None, cancel: threading.Event | None = None) -> TokenStream:
        """Stream generated token ids (stop strings are a text matter and are not checked here)."""
        run = _DecodeRun(self.model, self.tokenizer, [int(i) for i in prompt_ids], params,
                         self._stop_ids(stop_ids), cancel)
        return TokenStream(run)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams, **kw: Any) -> GenerationResult:
        """Run `stream` to the end and return its result."""
        stream = self.stream(prompt, params, **kw)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


# ---- the seeds' API, kept working ----------------------------------------------------------------------------
def _as_generator(model: Any, tokenizer: Any = None, device: str | torch.device | None = None) -> Generator:
    if isinstance(model, Generator):
        return model
    if isinstance(model, (str, Path)):
        return Generator.from_checkpoint(model, device=device or "cpu")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("generate_text needs a tokenizer: pass tokenizer=..., a Generator, or a checkpoint path")
    return Generator(model, tokenizer, device=device)


def generate_text(model: Any, prompt: str, max_tokens: int = 100, temperature: float = 0.8, top_k: int = 0,
                  top_p: float = 1.0, repetition_penalty: float = 1.0, *, tokenizer: Any = None, min_p: float = 0.0,
                  seed: int = -1, stop: Sequence[str] = ()) -> str:
    """The continuation of `prompt` (not the prompt itself). `model` is a Generator, a checkpoint path, or a
    model plus `tokenizer=`."""
    gen = _as_generator(model, tokenizer)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, max_new_tokens=max_tokens, seed=seed,
                            stop=tuple(stop))
    return gen.generate(prompt, params).text


def load_model_and_generate(checkpoint_path: str | Path, prompt: str, max_length: int = 200,
                            temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                            repetition_penalty: float = 1.0, *, seed: int = -1,
                            device: str = "cpu") -> str:
    """Load a checkpoint and return the continuation of `prompt`; `max_length` counts new tokens."""
    gen = Generator.from_checkpoint(checkpoint_path, device=device)
    return generate_text(gen, prompt, max_tokens=max_length, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, seed=seed)


class TokenGenerator:
    """OpenAI's reference interface: `generate(prompt_tokens, stop_tokens, temperature, max_tokens)` yields ids.

    As in the reference, the stop token that ends a call is yielded too, and `max_tokens=0` means no limit
    (the context is trimmed when full). Unlike the reference it decodes with a KV cache, and when a call's
    prompt extends the previous call's tokens (a chat going on) only the new tokens are prefilled. `reset()`
    forgets that cache. One TokenGenerator serves one conversation; use `Generator` to share a model."""

    def __init__(self, checkpoint: str | Path | torch.nn.Module, device: str | torch.device = "cpu",
                 tokenizer: Any = None):
        if isinstance(checkpoint, torch.nn.Module):
            self.model = checkpoint.to(device).eval()
            self.tokenizer = tokenizer
        else:
            from .checkpoint import load_checkpoint

            self.model, self.tokenizer, _ = load_checkpoint(checkpoint, device=device)
        self.device = torch.device(device)
        self.seed = -1
        self.last_result: GenerationResult | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the cached conversation: the next call prefills its whole prompt."""
        self._cache: Any = None
        self._cache_ids: list[int] = []

    def generate(self, prompt_tokens: Sequence[int], stop_tokens: Iterable[int] | None = None,
                 temperature: float = 1.0, max_tokens: int = 0, *, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> Iterator[int]:
        """Yield generated ids one by one; the stop token (if reached) is the last one yielded."""
        prompt = [int(t) for t in prompt_tokens]
        stops = frozenset(int(t) for t in (stop_tokens or ()))
        budget = max_tokens if max_tokens and max_tokens > 0 else 2**31 - 1
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=budget,
                                seed=self.seed if seed is None else seed)
        n_cached = len(self._cache_ids)
        reuse = self._cache is not None and 0 < n_cached < len(prompt) and prompt[:n_cached] == self._cache_ids
        run = _DecodeRun(self.model, self.tokenizer, prompt, params, stops, None,
                         cache=self._cache if reuse else None, cached_ids=self._cache_ids if reuse else ())
        self.reset()  # the old cache is being consumed by this run
        stream = TokenStream(run)
        try:
            yield from stream
            if run.stop_reason == "eos" and run.last_stop_id is not None:
                yield run.last_stop_id
        finally:
            stream.close()
            self.last_result = stream.result
            ids = run.cache_ids
            if ids is not None:
                self._cache, self._cache_ids = run.cache, ids
