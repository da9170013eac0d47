"""Fetch OpenAI's gpt-oss weights (or the TinyStories text) from the Hugging Face Hub, verified.

    python download_weights.py --model gpt-oss-20b [--format original|hf] [--output-dir weights/gpt-oss-20b]
    python download_weights.py --dataset tinystories [--output-dir data_cache/tinystories]
    python download_weights.py --verify-only weights/gpt-oss-20b --format original

Downloads go through huggingface_hub (progress bars, files finished by an interrupted run are kept and a
re-run fetches only the rest; HF_TOKEN is used when set; HF_ENDPOINT selects a mirror). Free disk space is
checked before anything is written. After the download every safetensors header is checked against the
shapes derived from the downloaded config.json; only then is ``.download_complete.json`` written, which is
what the app looks for. Exit status: 0 success, 1 failure (message on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from model import hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="download_weights.py",
        description="Download gpt-oss weights or the TinyStories dataset from the Hugging Face Hub.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=sorted(hub.MODEL_REPOS), help="gpt-oss model to download")
    what.add_argument("--dataset", choices=sorted(hub.DATASETS), help="dataset text files to download")
    what.add_argument(
        "--verify-only", metavar="DIR",
        help="check weights already in DIR (e.g. fetched with `hf download`) and mark them complete if they pass",
    )  # fmt: skip
    parser.add_argument(
        "--format", dest="fmt", choices=hub.FORMATS, default="original",
        help="original: OpenAI's original/ folder (default); hf: the transformers shards",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="target directory (default weights/<model> or data_cache/<dataset>)")
    parser.add_argument("--revision", help="branch, tag or commit on the Hub (default: main)")
    parser.add_argument("--max-workers", type=int, default=8, help="parallel file downloads (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verify_only:
            report = hub.mark_verified_checkpoint(args.verify_only, args.fmt)
            print(report.summary())
            print(f"marked complete: {args.verify_only}/{hub.MARKER_NAME}")
            return 0
        if args.dataset:
            result = hub.download_dataset(
                args.dataset, args.output_dir, revision=args.revision, max_workers=args.max_workers
            )
            print(f"done: {len(result.files)} files in {result.directory} ({result.seconds:.1f} s)")
            return 0
        result = hub.download_gpt_oss(
            args.model, args.fmt, args.output_dir, revision=args.revision, max_workers=args.max_workers
        )
        assert result.report is not None
        print(result.report.summary())
        print(f"done: {args.model} ({args.fmt}) in {result.directory} ({result.seconds:.1f} s)")
        return 0
    except hub.HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: files finished so far are kept; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
