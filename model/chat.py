"""Chat with gpt-oss in the terminal, in the harmony format.

    python -m model.chat --model weights/gpt-oss-20b [--reasoning low|medium|high] [--system TEXT]
        [--developer TEXT] [--max-tokens N] [--temperature 1.0] [--top-p 1.0] [--expert-cache-gb G]
        [--show-reasoning] [--prompt TEXT]

With --prompt it answers once and exits; otherwise it reads one user message per line until EOF (Ctrl-D),
keeping the conversation (final answers only, as harmony requires). `/reset` starts over, `/quit` exits.
The answer (`final` channel) goes to stdout; reasoning (`analysis`) is hidden unless --show-reasoning, then
printed dimmed to stderr. A status line per turn (tokens, tokens/s, stop reason) goes to stderr.

Runs on CPU with packed MXFP4 experts (see model/gptoss_weights.py) or on a GPU (--device cuda).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

NOT_DOWNLOADED = "gpt-oss-20b is not downloaded: run `python download_weights.py --model gpt-oss-20b`"
DIM, RESET = "\033[2m", "\033[0m"

# (prompt ids, sampling params) -> generated ids; the stop id that ended generation may or may not be included.
TokenSource = Callable[[list[int], Any], Iterable[int]]


@dataclass
class TurnResult:
    answer: str  # the final-channel text ("" when the model gave none)
    reasoning: str  # analysis/commentary text
    tokens: int  # generated tokens
    seconds: float
    stop: str  # "return", "call", "endoftext" or "max_tokens"


class ChatSession:
    """One conversation: renders harmony prompts, streams tokens from `generate`, parses channels, prints the
    answer as it arrives and keeps the history (HarmonyChat). `generate` is injected so tests can script it."""

    def __init__(self, tokenizer: Any, generate: TokenSource, params: Any, *, reasoning: str = "medium",
                 system: str | None = None, developer: str | None = None, show_reasoning: bool = False,
                 out: TextIO | None = None, err: TextIO | None = None, color: bool | None = None):
        from .harmony import HarmonyChat, SystemOptions

        options = SystemOptions(reasoning_effort=reasoning).with_today()
        if system:  # --system replaces the model identity line of the system message
            options = SystemOptions(reasoning_effort=reasoning, model_identity=system,
                                    current_date=options.current_date)
        self.tokenizer, self.generate, self.params = tokenizer, generate, params
        self.chat = HarmonyChat(system=options, developer=developer)
        self.show_reasoning = show_reasoning
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = self.err.isatty() if color is None else color

    def ask(self, user_text: str) -> TurnResult:
        """Run one turn: print the answer (and reasoning if asked) while it streams; update the history."""
        from .harmony import STOP_IDS, ContentDelta, HarmonyStreamParser, MessageStart, Stop

        ids = self.chat.prompt_ids(self.tokenizer, user_text)
        parser = HarmonyStreamParser(self.tokenizer)
        n, stop, answer, reasoning = 0, "max_tokens", [], []
        in_reasoning = False
        t0 = time.perf_counter()
        for tok in self.generate(ids, self.params):
            events = parser.push(int(tok))
            if int(tok) not in STOP_IDS:
                n += 1
            for ev in events:
                if isinstance(ev, MessageStart) and ev.channel not in (None, "final") and self.show_reasoning:
                    self._reasoning(f"[{ev.channel}] ")
                elif isinstance(ev, ContentDelta):
                    if ev.channel in (None, "final"):
                        if in_reasoning:
                            self._reasoning("\n")
                            in_reasoning = False
                        answer.append(ev.text)
                        self.out.write(ev.text)
                        self.out.flush()
                    else:
                        reasoning.append(ev.text)
                        if self.show_reasoning:
                            in_reasoning = True
                            self._reasoning(ev.text)
                elif isinstance(ev, Stop):
                    stop = ev.reason
            if parser.stop_reason is not None:
                break
        for ev in parser.finish():
            if isinstance(ev, ContentDelta) and ev.channel in (None, "final"):
                answer.append(ev.text)
                self.out.write(ev.text)
        self.out.write("\n")
        self.out.flush()
        reply = self.chat.record_reply(parser.messages)
        if reply is None:  # no answer (cut off in the reasoning): drop the question so history stays valid
            self.chat.undo_last_user()
        dt = time.perf_counter() - t0
        note = "" if reply is not None else "; no final answer (try a larger --max-tokens)"
        self.err.write(f"[{n} tokens in {dt:.1f} s, {n / dt if dt > 0 else 0.0:.2f} tokens/s, stop: {stop}{note}]\n")
        self.err.flush()
        return TurnResult("".join(answer), "".join(reasoning), n, dt, stop)

    def _reasoning(self, text: str) -> None:
        self.err.write(f"{DIM}{text}{RESET}" if self.color else text)
        self.err.flush()

    def reset(self) -> None:
        self.chat.reset()


def generator_source(generator: Any) -> TokenSource:
    """A TokenSource over model.generation.Generator: stream_tokens with harmony's stop ids."""
    from .harmony import STOP_IDS

    def run(ids: list[int], params: Any) -> Iterable[int]:
        stream = generator.stream_tokens(ids, params, stop_ids=STOP_IDS)
        yield from stream
        if stream.stop_id is not None:  # the stop id itself is not yielded; the harmony parser wants it
            yield stream.stop_id

    return run


def load(model_dir: Path, device: str, expert_cache_gb: float | None) -> tuple[Any, Any]:
    """(model, tokenizer) from a gpt-oss download directory; SystemExit with a clear message if impossible."""
    import torch

    from .checkpoint import CheckpointError, detect_format
    from .gptoss_weights import GiB, InsufficientMemoryError, load_gpt_oss
    from .tokenizer import load_tokenizer

    if not model_dir.exists():
        raise SystemExit(f"{NOT_DOWNLOADED} (no directory {model_dir})")
    try:
        fmt = detect_format(model_dir)
    except CheckpointError:
        raise SystemExit(f"{NOT_DOWNLOADED} ({model_dir} holds no gpt-oss checkpoint)") from None
    if fmt == "ours":
        raise SystemExit(f"{model_dir} is one of this project's story models, not gpt-oss; use `python -m "
                         "model.generate` for those")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = None if expert_cache_gb is None else int(expert_cache_gb * GiB)
    try:
        model = load_gpt_oss(model_dir, fmt, device=device, dtype=torch.bfloat16, experts="auto",
                             expert_cache_bytes=cache)
    except InsufficientMemoryError as e:
        raise SystemExit(str(e)) from None
    return model, load_tokenizer(model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("weights/gpt-oss-20b"), help="gpt-oss download directory")
    p.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--system", default=None, help="model identity line of the system message")
    p.add_argument("--developer", default=None, help="developer instructions")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens generated per reply")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (gpt-oss recommends 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=-1, help="-1 draws a random seed")
    p.add_argument("--expert-cache-gb", type=float, default=None,
                   help="decoded-expert cache budget in GiB (default $STORYFORGE_EXPERT_CACHE_GB or 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel (dimmed, stderr)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.expert_cache_gb is not None and args.expert_cache_gb < 0:
        p.error("--expert-cache-gb must be >= 0")

    if not args.model.exists():  # before the heavy imports: answer at once
        print(f"{NOT_DOWNLOADED} (no directory {args.model})", file=sys.stderr)
        return 2

    from .generation import Generator
    from .sampling import SamplingParams

    t0 = time.perf_counter()
    model, tokenizer = load(args.model, args.device, args.expert_cache_gb)
    print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens,
                            seed=args.seed)
    session = ChatSession(tokenizer, generator_source(Generator(model, tokenizer)), params,
                          reasoning=args.reasoning, system=args.system, developer=args.developer,
                          show_reasoning=args.show_reasoning)
    if args.prompt is not None:
        session.ask(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        session.ask(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
