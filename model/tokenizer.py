"""One tokenizer interface over three kinds of tokenizers.

Kinds:

* ``sentencepiece``: a small BPE vocabulary trained here on the story corpus (:func:`train_sentencepiece`).
  Saved as ``tokenizer.model``.
* ``tiktoken:gpt2``: GPT-2's 50,257-token BPE (for the GPT-2 baseline comparisons).
* ``tiktoken:o200k_harmony``: gpt-oss's tokenizer, either from tiktoken (needs its BPE file, cached under
  ``TIKTOKEN_CACHE_DIR`` for offline use) or rebuilt from the Hugging Face ``tokenizer.json`` that ships with the
  gpt-oss weights (no network needed).

Every kind encodes *ordinary text only*: a user typing ``<|endoftext|>`` or ``<|end|>`` gets the ordinary tokens
for those characters, never the control token. Control ids are inserted by the caller (``bos_id``, ``eos_id``,
``special_id(...)``).

CLI::

    python -m model.tokenizer train --data FILE_OR_DIR --vocab-size 4096 --out DIR
    python -m model.tokenizer encode --tokenizer DIR_OR_SPEC --text "Once upon a time"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

SENTENCEPIECE_FILE = "tokenizer.model"
TIKTOKEN_INFO_FILE = "tokenizer_info.json"
HF_TOKENIZER_FILE = "tokenizer.json"

TIKTOKEN_PREFIX = "tiktoken:"
STORY_SEPARATOR = "<|endoftext|>"

# gpt-oss (o200k_harmony) control tokens, spec §3.1.
HARMONY_SPECIAL_IDS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
HARMONY_VOCAB_SIZE = 201088  # ids 0..201087, as tiktoken and the model's embedding rows
HARMONY_FIRST_SPECIAL = 199998


class TokenizerError(RuntimeError):
    """A tokenizer could not be found, built or loaded; the message says what to do."""


class Tokenizer:
    """Interface shared by all tokenizer kinds.

    Attributes:
        name: kind and identity, e.g. ``"sentencepiece"``, ``"tiktoken:gpt2"``, ``"tiktoken:o200k_harmony"``.
        vocab_size: number of ids the model must have rows for (all ids returned are ``< vocab_size``).
        bos_id / eos_id: begin/end-of-text control ids (``None`` if the kind has none).
        stop_ids: ids that end a generation.
    """

    name: str = "abstract"
    vocab_size: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text (special-token strings are treated as plain characters)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; kinds override this with a faster multi-threaded version."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text. Never raises on partial UTF-8 sequences (they become U+FFFD)."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write the files :func:`load_tokenizer` needs to rebuild this tokenizer from ``directory``."""
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """Id of a control token by its string, e.g. ``"<|end|>"``. Raises KeyError if unknown."""
        raise KeyError(f"{self.name} has no special token {name!r}")

    @property
    def fingerprint(self) -> str:
        """A short stable string that changes whenever the id mapping could change (used for cache keys)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab_size={self.vocab_size}>"


# --------------------------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE with byte fallback, trained by :func:`train_sentencepiece`)."""

    def __init__(self, model_proto: bytes, source: str | None = None) -> None:
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError
            raise TokenizerError(f"Not a valid SentencePiece model ({source or 'bytes'}): {exc}") from exc
        self.name = "sentencepiece"
        self.vocab_size = int(self._sp.GetPieceSize())
        bos, eos = int(self._sp.bos_id()), int(self._sp.eos_id())
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.stop_ids = frozenset({self.eos_id} if self.eos_id is not None else set())
        self._num_threads = max(1, min(4, os.cpu_count() or 1))

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        return cls(path.read_bytes(), source=str(path))

    def encode(self, text: str) -> list[int]:
        # Control pieces (<s>, </s>, <unk>) are never produced from text by SentencePiece, and the story
        # separator is not a user-defined symbol, so "<|endoftext|>" typed by a user encodes as ordinary pieces.
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.Encode(list(texts), out_type=int, num_threads=self._num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._sp.DecodeIds(valid)

    def special_id(self, name: str) -> int:
        aliases = {"<s>": self.bos_id, "</s>": self.eos_id, "<unk>": int(self._sp.unk_id())}
        aliases["<|startoftext|>"] = self.bos_id
        aliases["<|endoftext|>"] = self.eos_id
        value = aliases.get(name)
        if value is None or value < 0:
            raise KeyError(f"sentencepiece tokenizer has no special token {name!r}")
        return value

    def piece(self, token_id: int) -> str:
        """The vocabulary piece for an id (for inspection and tests)."""
        return self._sp.IdToPiece(int(token_id))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SENTENCEPIECE_FILE).write_bytes(self._proto)


def _iter_training_sentences(
    input_files: Sequence[str | Path], max_bytes: int | None
) -> Iterator[str]:
    """Stories (documents) from the input files, stopping once ``max_bytes`` UTF-8 bytes were yielded."""
    from model.data import iter_documents  # local import: data.py imports this module too

    seen = 0
    for path in input_files:
        for doc in iter_documents(path):
            yield doc
            seen += len(doc.encode("utf-8"))
            if max_bytes is not None and seen >= max_bytes:
                return


def train_sentencepiece(
    input_files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 4096,
    *,
    max_bytes: int | None = 4_000_000,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    max_sentence_length: int = 1 << 20,
    verbose: bool = False,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE tokenizer on stories and write ``out_dir/tokenizer.model``.

    Each story (text between ``<|endoftext|>`` separator lines, or one ``.jsonl`` record) is one training
    "sentence", so newlines inside a story are kept and learnt (``"\\n"`` is a user-defined piece).
    Byte fallback makes any text (emoji, CJK, ...) round-trip exactly, and the identity normalization with
    ``remove_extra_whitespaces=False`` keeps spaces as typed. Ids: ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS).

    Only the first ``max_bytes`` of text are used (TinyStories is already shuffled, so the head of the file
    is a fair sample); ``None`` uses everything.
    """
    import io

    import sentencepiece as spm

    if isinstance(input_files, (str, Path)):
        input_files = [input_files]
    files = [Path(p) for p in input_files]
    for p in files:
        if not p.exists():
            raise TokenizerError(f"Training data not found: {p}. Pass --data with a .txt/.jsonl file or folder.")
    if vocab_size < 256 + 4:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback needs 256 byte pieces + 4")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentences = _iter_training_sentences(files, max_bytes)
    options: dict[str, Any] = dict(
        sentence_iterator=sentences,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        train_extremely_large_corpus=False,
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=0 if verbose else 2,
    )
    try:
        spm.SentencePieceTrainer.Train(**options)
    except RuntimeError as exc:
        raise TokenizerError(
            f"SentencePiece training failed: {exc}. With byte fallback the vocab needs 260 pieces plus one per "
            "distinct character kept; a small corpus cannot support a large vocab (lower --vocab-size or give "
            "more text)."
        ) from exc
    tok = SentencePieceTokenizer(model.getvalue(), source="training")
    tok.save(out_dir)
    return tok


# --------------------------------------------------------------------------------------------- tiktoken


def _tiktoken_special_table(encoding_name: str, enc: Any) -> tuple[int | None, int | None, frozenset[int]]:
    """bos, eos and stop ids for a tiktoken encoding."""
    specials: dict[str, int] = dict(enc._special_tokens)
    if encoding_name == "o200k_harmony":
        stop = frozenset({HARMONY_SPECIAL_IDS["<|return|>"], HARMONY_SPECIAL_IDS["<|call|>"],
                          HARMONY_SPECIAL_IDS["<|endoftext|>"]})
        return HARMONY_SPECIAL_IDS["<|startoftext|>"], HARMONY_SPECIAL_IDS["<|endoftext|>"], stop
    eot = specials.get("<|endoftext|>")
    bos = specials.get("<|startoftext|>", eot)  # GPT-2 uses <|endoftext|> for both
    return bos, eot, frozenset({eot} if eot is not None else set())


class TiktokenTokenizer(Tokenizer):
    """A tiktoken ``Encoding`` (gpt2, o200k_harmony, ...)."""

    def __init__(self, encoding: Any, encoding_name: str, hf_json: Path | None = None) -> None:
        self._enc = encoding
        self.encoding_name = encoding_name
        self.name = TIKTOKEN_PREFIX + encoding_name
        self.vocab_size = int(encoding.n_vocab)
        self.bos_id, self.eos_id, self.stop_ids = _tiktoken_special_table(encoding_name, encoding)
        # Where the encoding came from, if it was rebuilt from a HF tokenizer.json (copied on save so the
        # saved directory also loads offline).
        self._hf_json = hf_json

    @classmethod
    def from_name(cls, encoding_name: str) -> TiktokenTokenizer:
        import tiktoken

        try:
            enc = tiktoken.get_encoding(encoding_name)
        except ValueError as exc:  # unknown name
            raise TokenizerError(f"Unknown tiktoken encoding {encoding_name!r}: {exc}") from exc
        except Exception as exc:  # network / cache failures surface as requests/OSError/etc.
            raise TokenizerError(
                f"Could not load tiktoken encoding {encoding_name!r} ({type(exc).__name__}: {exc}). tiktoken "
                "downloads its BPE file on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding that "
                "download (this project: ../shared/tiktoken_cache), or for o200k_harmony point at a gpt-oss "
                "download folder containing tokenizer.json."
            ) from exc
        return cls(enc, encoding_name)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=max(1, min(4, os.cpu_count() or 1)))

    def decode(self, ids: Iterable[int]) -> str:
        # Drop ids the encoding cannot decode (e.g. unused model rows) instead of raising mid-stream.
        valid = [int(i) for i in ids]
        try:
            return self._enc.decode(valid, errors="replace")
        except KeyError:
            known = [i for i in valid if self._decodable(i)]
            return self._enc.decode(known, errors="replace")

    def _decodable(self, token_id: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(token_id)
            return True
        except KeyError:
            return False

    def special_id(self, name: str) -> int:
        specials: dict[str, int] = self._enc._special_tokens
        if name not in specials:
            raise KeyError(f"{self.name} has no special token {name!r}")
        return int(specials[name])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"kind": "tiktoken", "encoding": self.encoding_name, "vocab_size": self.vocab_size}
        if self._hf_json is not None:
            target = directory / HF_TOKENIZER_FILE
            if self._hf_json.resolve() != target.resolve():
                shutil.copyfile(self._hf_json, target)
            info["hf_tokenizer_json"] = HF_TOKENIZER_FILE
        (directory / TIKTOKEN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# ------------------------------------------------------------------------- HF tokenizer.json -> tiktoken


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (used for byte-level BPE vocab keys)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _find_split_regex(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """The regex of the first ``Split`` pre-tokenizer (possibly nested in a ``Sequence``)."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return pattern.get("Regex") if isinstance(pattern, dict) else None
    for child in pre_tokenizer.get("pretokenizers", []) or []:
        found = _find_split_regex(child)
        if found:
            return found
    return None


def tiktoken_from_hf_json(path: str | Path) -> TiktokenTokenizer:
    """Rebuild gpt-oss's o200k_harmony as a tiktoken ``Encoding`` from a HF ``tokenizer.json`` (spec §3.2).

    Vocab keys are byte-level strings (GPT-2 ``bytes_to_unicode``); inverting that mapping gives the token
    bytes, and the id is the tiktoken rank. The pre-tokenizer regex comes from the JSON's ``Split`` step.
    Special tokens come from ``added_tokens``; the ids the JSON leaves undefined up to 201087 become
    ``<|reserved_N|>`` as in tiktoken, so the vocabulary matches the model's 201,088 embedding rows.
    """
    import tiktoken

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"Could not read {path}: {exc}") from exc
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path} is not a byte-level BPE tokenizer.json (model.type={model.get('type')!r})")

    # str.translate maps each byte-level character back to the code point of its byte; latin-1 then turns
    # code points 0-255 into those bytes (much faster than a per-character loop over 200k entries).
    to_byte_char = {ord(ch): b for b, ch in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for piece, idx in model["vocab"].items():
        raw = piece.translate(to_byte_char)
        try:
            ranks[raw.encode("latin-1")] = int(idx)
        except UnicodeEncodeError as exc:
            raise TokenizerError(f"{path}: vocab entry {piece!r} is not byte-level BPE") from exc

    pat_str = _find_split_regex(data.get("pre_tokenizer"))
    if pat_str is None:
        raise TokenizerError(f"{path}: no Split pre-tokenizer regex found; cannot rebuild the encoding")

    rank_ids = set(ranks.values())
    specials: dict[str, int] = {}
    for tok in data.get("added_tokens", []) or []:
        content, idx = tok.get("content"), tok.get("id")
        if content is None or idx is None or int(idx) in rank_ids:
            continue  # an added token that is also an ordinary vocab entry needs no special handling
        specials[str(content)] = int(idx)

    harmony = all(name in specials for name in ("<|start|>", "<|message|>", "<|return|>", "<|end|>"))
    if harmony:
        for name, idx in HARMONY_SPECIAL_IDS.items():
            if specials.get(name) != idx:
                raise TokenizerError(f"{path}: {name} has id {specials.get(name)}, expected {idx} (o200k_harmony)")
        taken = set(specials.values()) | rank_ids
        for i in range(HARMONY_FIRST_SPECIAL, HARMONY_VOCAB_SIZE):
            if i not in taken:
                specials[f"<|reserved_{i}|>"] = i
        name = "o200k_harmony"
    else:
        name = "hf_json_" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    try:
        enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as exc:
        raise TokenizerError(f"{path}: could not build a tiktoken encoding: {exc}") from exc
    return TiktokenTokenizer(enc, name, hf_json=path)


# --------------------------------------------------------------------------------------------- loading


def _load_info(info_path: Path) -> Tokenizer:
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"Could not read {info_path}: {exc}") from exc
    if info.get("kind") != "tiktoken" or not info.get("encoding"):
        raise TokenizerError(f"{info_path}: unknown tokenizer kind {info.get('kind')!r}")
    hf_json = info_path.parent / info.get("hf_tokenizer_json", HF_TOKENIZER_FILE)
    if info["encoding"] == "o200k_harmony" and "hf_tokenizer_json" in info and hf_json.exists():
        return tiktoken_from_hf_json(hf_json)
    try:
        return TiktokenTokenizer.from_name(info["encoding"])
    except TokenizerError:
        if info["encoding"] == "o200k_harmony" and hf_json.exists():
            return tiktoken_from_hf_json(hf_json)
        raise


def load_tokenizer(spec_or_dir: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory, a file, or a spec string.

    Accepted:
      * a directory with ``tokenizer.model`` (ours, SentencePiece), ``tokenizer_info.json`` (ours, tiktoken),
        or a HF ``tokenizer.json`` (a gpt-oss download folder; also looked for in ``original/``);
      * a ``.model`` file, a ``tokenizer.json`` file or a ``tokenizer_info.json`` file;
      * ``"tiktoken:gpt2"``, ``"tiktoken:o200k_harmony"`` (any tiktoken encoding name after the prefix).
    """
    if isinstance(spec_or_dir, str) and spec_or_dir.startswith(TIKTOKEN_PREFIX):
        return TiktokenTokenizer.from_name(spec_or_dir[len(TIKTOKEN_PREFIX):])
    if isinstance(spec_or_dir, str) and spec_or_dir.startswith("sentencepiece:"):
        spec_or_dir = spec_or_dir[len("sentencepiece:"):]
    path = Path(spec_or_dir).expanduser()
    if path.is_dir():
        for folder in (path, path / "original"):
            if (folder / SENTENCEPIECE_FILE).is_file():
                return SentencePieceTokenizer.from_file(folder / SENTENCEPIECE_FILE)
            if (folder / TIKTOKEN_INFO_FILE).is_file():
                return _load_info(folder / TIKTOKEN_INFO_FILE)
            if (folder / HF_TOKENIZER_FILE).is_file():
                return tiktoken_from_hf_json(folder / HF_TOKENIZER_FILE)
        raise TokenizerError(
            f"No tokenizer in {path}: expected {SENTENCEPIECE_FILE}, {TIKTOKEN_INFO_FILE} or {HF_TOKENIZER_FILE}. "
            "Train one with `python -m model.tokenizer train --data ... --out DIR`, or use tiktoken:gpt2 / "
            "tiktoken:o200k_harmony."
        )
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer.from_file(path)
        if path.name == TIKTOKEN_INFO_FILE:
            return _load_info(path)
        if path.suffix == ".json":
            return tiktoken_from_hf_json(path)
        raise TokenizerError(f"Don't know how to load a tokenizer from {path} (expected .model or .json)")
    raise TokenizerError(
        f"Tokenizer {str(spec_or_dir)!r} not found: give a checkpoint or download folder, a .model file, "
        "or a spec such as tiktoken:gpt2 or tiktoken:o200k_harmony."
    )


# --------------------------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece BPE tokenizer on stories")
    tr.add_argument("--data", required=True, nargs="+", help=".txt/.jsonl file(s) or folder(s) of stories")
    tr.add_argument("--vocab-size", type=int, default=4096)
    tr.add_argument("--out", required=True, help="output folder (gets tokenizer.model)")
    tr.add_argument("--max-mb", type=float, default=4.0, help="train on at most this many MB of text (0 = all)")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    en = sub.add_parser("encode", help="encode text and show ids and pieces")
    en.add_argument("--tokenizer", required=True, help="folder, .model file or spec like tiktoken:gpt2")
    en.add_argument("--text", required=True)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "train":
            max_bytes = int(args.max_mb * 1e6) if args.max_mb > 0 else None
            t0 = time.perf_counter()
            tok = train_sentencepiece(args.data, args.out, args.vocab_size, max_bytes=max_bytes,
                                      num_threads=args.threads, verbose=args.verbose)
            print(f"trained {tok.vocab_size}-piece BPE in {time.perf_counter() - t0:.1f}s -> "
                  f"{Path(args.out) / SENTENCEPIECE_FILE}")
        else:
            tok = load_tokenizer(args.tokenizer)
            ids = tok.encode(args.text)
            print(f"{tok.name}: {len(ids)} tokens")
            print(ids)
            print([tok.decode([i]) for i in ids])
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
