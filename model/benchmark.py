"""One entry point for the benchmark scripts: `python -m model.benchmark NAME [options]`.

    model     forward and training-step tokens/s, ours vs transformers' GptOss   (model.benchmark_model)
    train     training tokens/s: sizes, GPT-OSS vs GPT-2, fp32 vs bf16, compile  (model.benchmark_train)
    decode    KV-cached decode vs full recompute vs transformers generate()      (model.benchmark_decode)
    gptoss    gpt-oss-20b on this machine: load, peak RSS, prefill/decode tok/s  (model.benchmark_gptoss)
    compare   the GPT-OSS vs GPT-2 study written to docs/results.md              (model.benchmark_compare)
    extras    multi-token prediction, speculative decoding, context memory       (model.benchmark_extras)

Each prints a markdown table; `NAME --help` lists its options.
"""

from __future__ import annotations

import importlib
import sys

SCRIPTS = {"model": "benchmark_model", "train": "benchmark_train", "decode": "benchmark_decode",
           "gptoss": "benchmark_gptoss", "compare": "benchmark_compare", "extras": "benchmark_extras"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SCRIPTS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown benchmark {argv[0]!r}: choose one of {', '.join(SCRIPTS)}")
        return
    module = importlib.import_module(f"model.{SCRIPTS[argv[0]]}")
    sys.argv = [f"python -m model.benchmark {argv[0]}", *argv[1:]]
    module.main(argv[1:])


if __name__ == "__main__":
    main()
