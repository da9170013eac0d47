"""Generate stories from a checkpoint on the command line.

    python -m model.generate --model weights/small --prompt "Once upon a time" --max-tokens 200
    python -m model.generate --model weights/small --prompt "Tom had a dog" --num-samples 3 --seed 7
    python -m model.generate --model weights/small --interactive      # one prompt per line until EOF (Ctrl-D)

The story text goes to stdout as it is generated; a one-line summary per answer (stop reason, seed, speed)
goes to stderr, so `> story.txt` keeps only the text. `--seed S` with several samples uses S, S+1, ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (ours, or a gpt-oss download)")
    p.add_argument("--prompt", default=None, help="text to continue (required unless --interactive)")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens per answer (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x top probability; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off, 1.1-1.3 typical")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams; 0 = off")
    p.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token before the prompt")
    return p


def _summary(result, index: int, total: int) -> str:
    label = f"sample {index + 1}/{total}: " if total > 1 else ""
    trimmed = ", context trimmed to fit the model" if result.context_trimmed else ""
    return (f"[{label}stop={result.stop_reason} seed={result.seed} tokens={len(result.token_ids)} "
            f"prompt={result.prompt_tokens} ttft={result.time_to_first_token_s * 1000:.0f}ms "
            f"{result.tokens_per_s:.1f} tok/s{trimmed}]")


def _answer(gen, prompt: str, params, args, out: TextIO, err: TextIO, echo_prompt: bool) -> None:
    for i in range(args.num_samples):
        p = params if params.seed < 0 else replace(params, seed=params.seed + i)
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1}/{args.num_samples} ---\n")
        if echo_prompt:
            out.write(prompt)
        stream = gen.stream(prompt, p, add_bos=not args.no_bos)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        finally:
            stream.close()
        out.write("\n")
        out.flush()
        err.write(_summary(stream.result, i, args.num_samples) + "\n")
        err.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is None and not args.interactive:
        print("error: give --prompt TEXT, or --interactive to read prompts from stdin", file=sys.stderr)
        return 2
    if args.num_samples < 1:
        print("error: --num-samples must be at least 1", file=sys.stderr)
        return 2

    from .sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                no_repeat_ngram_size=args.no_repeat_ngram_size, max_new_tokens=args.max_tokens,
                                seed=args.seed, stop=tuple(args.stop)).validate()
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .generation import Generator

    try:
        gen = Generator.from_checkpoint(args.model, device=args.device)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2

    out, err = sys.stdout, sys.stderr
    try:
        if args.prompt is not None:
            _answer(gen, args.prompt, params, args, out, err, echo_prompt=True)
        if args.interactive:
            tty = sys.stdin.isatty()
            while True:
                if tty:
                    err.write("> ")
                    err.flush()
                line = sys.stdin.readline()
                if not line:  # EOF
                    break
                prompt = line.rstrip("\n")
                if not prompt.strip():
                    continue
                _answer(gen, prompt, params, args, out, err, echo_prompt=False)
    except KeyboardInterrupt:
        out.write("\n")
        print("[interrupted]", file=err)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
