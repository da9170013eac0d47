"""Validation loss and bits per byte of any checkpoint on a text file: `python -m model.evaluate`.

Bits per byte (bpb) = total nats / ln 2 / UTF-8 bytes of the scored text. Loss per token depends on how finely a
tokenizer cuts text; bpb does not, so models with different vocabularies compare fairly on it.

What is scored, per story (document):

    ids = [BOS] + encode(story) + [EOS]

Every token after the BOS is predicted, the EOS included (a story model must learn where a story ends), each
from the story's own start: stories are never packed together. `tokens` counts the predicted tokens (story tokens
+ 1 EOS per story); `bytes` counts the UTF-8 bytes of the story text (the EOS adds none). A tokenizer without a
BOS starts from its EOS (GPT-2 style: `<|endoftext|>` is both); with neither, the first token goes unpredicted.

Stories longer than the model's context are scored in overlapping windows no longer than the context: the first
window scores all of its tokens, each later window advances by `stride` tokens and scores only the tokens not yet
scored, so every token is scored exactly once with at least `max_context - stride` tokens of context (GPT-2's
learned positions never see a position past its context). Windows are right-padded into batches; causal attention
makes the padding invisible to the real tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LN2 = math.log(2.0)


@dataclass
class Window:
    """One forward pass worth of a document: `ids` fed to the model, targets `ids[1:]`, of which the last
    `n_scored` are counted."""

    ids: list[int]
    n_scored: int


def document_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids a story is scored as: [BOS] + story + [EOS] (see the module docstring)."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    ids = ([start] if start is not None else []) + list(tokenizer.encode(text))
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids


def make_windows(ids: list[int], max_context: int, stride: int | None = None) -> list[Window]:
    """Cut one document into windows of at most `max_context` tokens that score every token after the first
    exactly once. `stride` (default max_context // 2) is how far each later window advances."""
    if max_context < 2:
        raise ValueError(f"max_context must be at least 2, got {max_context}")
    n = len(ids)
    if n < 2:
        return []
    if n <= max_context:
        return [Window(list(ids), n - 1)]
    stride = stride or max(1, max_context // 2)
    if not 1 <= stride <= max_context - 1:
        raise ValueError(f"stride must be in [1, max_context - 1] = [1, {max_context - 1}], got {stride}")
    windows = [Window(list(ids[:max_context]), max_context - 1)]
    scored_until = max_context  # ids[1:scored_until] are scored
    while scored_until < n:
        end = min(scored_until + stride, n)
        start = max(0, end - max_context)
        windows.append(Window(list(ids[start:end]), end - scored_until))
        scored_until = end
    return windows


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    order = sorted(windows, key=lambda w: len(w.ids), reverse=True)  # similar lengths share a batch: less padding
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def score_windows(model: Any, windows: list[Window], batch_size: int = 8, device: Any = None,
                  autocast_dtype: Any = None) -> tuple[float, int]:
    """(total nats, tokens scored) of the windows under `model`, in right-padded batches, without gradients."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in _batches(windows, batch_size):
                T = max(len(w.ids) for w in batch)
                x = torch.zeros(len(batch), T, dtype=torch.long)
                keep = torch.zeros(len(batch), T - 1, dtype=torch.bool)
                for b, w in enumerate(batch):
                    L = len(w.ids)
                    x[b, :L] = torch.tensor(w.ids)
                    keep[b, L - 1 - w.n_scored:L - 1] = True
                x, keep = x.to(device), keep.to(device)
                if autocast_dtype is not None:
                    with torch.autocast(device.type, dtype=autocast_dtype):
                        logits = model(x)
                else:
                    logits = model(x)
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      x[:, 1:].reshape(-1), reduction="none").view(len(batch), T - 1)
                total += float(nll[keep].double().sum())
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total, count


def evaluate_ids(model: Any, documents_ids: Iterable[list[int]], n_bytes: int, max_context: int | None = None,
                 batch_size: int = 8, stride: int | None = None, device: Any = None,
                 autocast_dtype: Any = None) -> dict[str, Any]:
    """`evaluate_text` on documents already turned into ids by `document_ids`; `n_bytes` is the UTF-8 byte
    count of their text. The trainer tokenizes its validation stories once and calls this at every eval."""
    ctx = int(max_context or model.config.max_context)
    if getattr(model.config, "arch", "") == "gpt2":  # learned positions: nothing past them exists
        ctx = min(ctx, int(model.config.max_context))
    windows: list[Window] = []
    n_docs = 0
    for ids in documents_ids:
        n_docs += 1
        windows.extend(make_windows(list(ids), ctx, stride))
    if not n_docs or n_bytes <= 0:
        raise ValueError("no documents to evaluate: the text is empty (stories are separated by <|endoftext|>)")
    nats, tokens = score_windows(model, windows, batch_size=batch_size, device=device,
                                 autocast_dtype=autocast_dtype)
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "bits_per_byte": nats / LN2 / n_bytes,
        "bits_per_token": loss / LN2,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": n_docs,
        "nats": nats,
        "windows": len(windows),
    }


def tokenize_documents(tokenizer: Any, documents: Iterable[str]) -> tuple[list[list[int]], int]:
    """(ids per non-empty story as scored, total UTF-8 bytes of the stories)."""
    texts = [t.strip() for t in documents]
    texts = [t for t in texts if t]
    return [document_ids(tokenizer, t) for t in texts], sum(len(t.encode("utf-8")) for t in texts)


def evaluate_text(model: Any, tokenizer: Any, documents: Iterable[str], max_context: int | None = None,
                  batch_size: int = 8, stride: int | None = None, device: Any = None,
                  autocast_dtype: Any = None) -> dict[str, Any]:
    """Loss (nats per predicted token) and bits per byte of `model` on `documents` (story texts).

    Returns dict(loss, bits_per_byte, bits_per_token, perplexity, tokens, bytes, documents, nats, windows).
    `max_context` defaults to the model's `config.max_context` (GPT-2 never gets more than that: its positions
    are learned; GPT-OSS's rotary positions allow longer windows)."""
    ids, n_bytes = tokenize_documents(tokenizer, documents)
    return evaluate_ids(model, ids, n_bytes, max_context=max_context, batch_size=batch_size, stride=stride,
                        device=device, autocast_dtype=autocast_dtype)


def read_documents(path_or_name: str, max_docs: int | None = None) -> list[str]:
    """Stories from a text file (separated by `<|endoftext|>` lines) or a data source name/split (model.data)."""
    from . import data

    p = Path(path_or_name)
    if p.is_file():
        source = p
    else:
        name, _, split = str(path_or_name).partition(":")
        source = data.resolve_data_source(name, split or "valid")
    docs: list[str] = []
    for doc in data.iter_documents(source):
        if max_docs is not None and len(docs) >= max_docs:
            break
        docs.append(doc)
    return docs


def _format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Validation loss and bits per byte of a checkpoint on a text file (stories separated by "
                    "<|endoftext|> lines). Bits per byte compares models with different tokenizers fairly.")
    p.add_argument("--model", required=True, help="checkpoint directory (ours, e.g. runs/NAME/final, or gpt-oss)")
    p.add_argument("--data", required=True,
                   help="text file, or a data source name with optional split, e.g. tinystories:valid")
    p.add_argument("--max-docs", "--max_docs", dest="max_docs", type=int, default=None,
                   help="score only the first N stories")
    p.add_argument("--max-context", "--max_context", dest="max_context", type=int, default=None,
                   help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="window advance for long stories (default: half)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 runs the forward under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .checkpoint import load_checkpoint

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.time()
    try:
        docs = read_documents(args.data, args.max_docs)
    except (OSError, ValueError, RuntimeError) as e:  # model.data.DataError is a RuntimeError
        print(f"error: cannot read --data {args.data}: {e}", file=sys.stderr)
        return 2
    model, tokenizer, _card = load_checkpoint(args.model, device=device)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    res = evaluate_text(model, tokenizer, docs, max_context=args.max_context, batch_size=args.batch_size,
                        stride=args.stride, autocast_dtype=autocast)
    res.update(model=str(args.model), data=str(args.data), tokenizer=getattr(tokenizer, "name", ""),
               max_context=int(args.max_context or model.config.max_context), seconds=round(time.time() - t0, 2))
    if args.json:
        print(json.dumps(res))
    else:
        print(_format_table([
            ("model", res["model"]), ("data", res["data"]), ("tokenizer", str(res["tokenizer"])),
            ("documents", str(res["documents"])), ("tokens", str(res["tokens"])), ("bytes", str(res["bytes"])),
            ("loss (nats/token)", f"{res['loss']:.4f}"), ("perplexity", f"{res['perplexity']:.3f}"),
            ("bits/token", f"{res['bits_per_token']:.4f}"), ("bits/byte", f"{res['bits_per_byte']:.4f}"),
            ("seconds", f"{res['seconds']:.1f}"),
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
