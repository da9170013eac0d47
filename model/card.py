"""Recompute a checkpoint's model card: `python -m model.card weights/default [--valid FILE] [--test FILE]`.

Every number on the card comes from here: parameter counts from the config, validation loss on the validation
split, bits per byte on the test split (both through `model.evaluate`), and sample stories generated with the
sampling settings printed beside them. The training facts (steps, tokens seen, hardware, wall time) are carried
over from the `card.json` the trainer wrote. Writes `card.json` and `README.md` into the checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PROMPTS = (
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park.",
    "The old owl lived in a big tree.",
)
SAMPLE_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")  # the app's default preset, Balanced
SAMPLE_TOKENS = 160
TRAINING_KEYS = ("name", "note", "arch", "size", "tokenizer", "vocab_size", "data", "train_source", "steps",
                 "tokens_seen", "hardware", "world_size", "torch", "wall_time_s", "train_config")


def build_card(path: Path, valid: Path, test: Path, seed: int = 1234, max_docs: int | None = None) -> dict[str, Any]:
    import torch

    from .checkpoint import load_checkpoint
    from .config import parameter_counts
    from .data import iter_documents
    from .evaluate import evaluate_text
    from .generation import Generator
    from .sampling import PRESETS, SamplingParams

    model, tok, old = load_checkpoint(path)
    card = {k: old[k] for k in TRAINING_KEYS if k in old}
    counts = parameter_counts(model.config)
    card.update(params_total=counts["total"], params_active=counts["active"], params_embedding=counts["embedding"],
                context=model.config.max_context, checkpoint_bytes=(path / "model.safetensors").stat().st_size)
    for split, file in (("valid", valid), ("test", test)):
        docs = list(iter_documents(file))[:max_docs]
        with torch.inference_mode():
            r = evaluate_text(model, tok, docs)
        card[f"{split}_loss"] = round(float(r["loss"]), 4)
        card[f"{split}_bits_per_byte"] = round(float(r["bits_per_byte"]), 4)
        card[f"{split}_file"] = str(file)
        card[f"{split}_documents"] = len(docs)
    gen = Generator(model, tok)
    settings = {**{f: getattr(PRESETS["Balanced"], f) for f in SAMPLE_FIELDS}, "max_new_tokens": SAMPLE_TOKENS}
    card["samples"] = []
    for i, prompt in enumerate(PROMPTS):
        res = gen.generate(prompt, SamplingParams(seed=seed + i, **settings))
        card["samples"].append({"prompt": prompt, "continuation": res.text, "seed": res.seed,
                                "stop_reason": res.stop_reason})
    card["sample_settings"] = settings
    card["card_written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return card


def render_readme(card: dict[str, Any], path: Path) -> str:
    from .config import format_count

    tc = card.get("train_config", {})
    hours = card.get("wall_time_s", 0) / 3600
    lines = [
        f"# {card.get('name', path.name)}: a GPT-OSS-architecture story model",
        "",
        "Written by `python -m model.card` from the checkpoint itself; rerun it to check every number.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {card.get('arch', 'gptoss')} (MoE, sinks, sliding window, YaRN), "
        f"preset `{card.get('size')}` |",
        f"| parameters | {format_count(card['params_total'])} total, {format_count(card['params_active'])} active per "
        f"token ({format_count(card['params_embedding'])} in the embedding tables) |",
        f"| context | {card['context']} tokens |",
        f"| tokenizer | {card.get('tokenizer')} ({card.get('vocab_size')} pieces), trained on the training text |",
        f"| data | TinyStories sample `{Path(card.get('train_source', '?')).name}` |",
        f"| training | {card.get('steps')} steps, {card.get('tokens_seen', 0):,} tokens seen, batch "
        f"{tc.get('batch_size')} x {tc.get('block_size')}, lr {tc.get('lr')} cosine to {tc.get('min_lr')} |",
        f"| hardware and time | {card.get('hardware')}, {hours:.2f} h, torch {card.get('torch')} |",
        f"| validation loss | {card['valid_loss']} nats/token on `{Path(card['valid_file']).name}` "
        f"({card['valid_documents']} stories) |",
        f"| test bits per byte | **{card['test_bits_per_byte']}** on `{Path(card['test_file']).name}` "
        f"({card['test_documents']} stories); llama2.c's stories260K scores 0.922 there |",
        f"| checkpoint size | {card['checkpoint_bytes'] / 1e6:.1f} MB |",
        "",
        *([card["note"], ""] if card.get("note") else []),
        "## Samples",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in card["sample_settings"].items()) + "; seeds as shown.",
        "",
    ]
    for s in card["samples"]:
        lines += [f"**{s['prompt']}**{s['continuation']}", "", f"_(seed {s['seed']}, stopped: {s['stop_reason']})_",
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    data_dir = Path(os.environ.get("STORYFORGE_DATA_DIR", "data"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="our checkpoint directory, e.g. weights/default")
    ap.add_argument("--valid", type=Path, default=data_dir / "valid.txt")
    ap.add_argument("--test", type=Path, default=data_dir / "test.txt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-docs", type=int, default=None, help="score only the first N stories (quick checks)")
    ap.add_argument("--name", help="display name for the card (the app's model list shows it)")
    ap.add_argument("--note", help="a sentence about how it was trained (shown under the table)")
    ap.add_argument("--dry-run", action="store_true", help="print the card, write nothing")
    args = ap.parse_args(argv)
    for f in (args.valid, args.test):
        if not f.exists():
            raise SystemExit(f"{f} not found: pass --valid/--test or set STORYFORGE_DATA_DIR to the folder with "
                             "valid.txt and test.txt")
    card = build_card(args.model, args.valid, args.test, args.seed, args.max_docs)
    if args.name:
        card["name"] = args.name
    if args.note:
        card["note"] = args.note
    readme = render_readme(card, args.model)
    if args.dry_run:
        print(readme)
    else:
        (args.model / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (args.model / "README.md").write_text(readme + "\n")
        print(readme)
    return card


if __name__ == "__main__":
    main()
