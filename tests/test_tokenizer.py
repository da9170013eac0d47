"""Tokenizers: SentencePiece trained here, tiktoken gpt2 / o200k_harmony, o200k_harmony from a HF tokenizer.json."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".." / "shared"
                                                  / "tiktoken_cache"))


from model.tokenizer import (  # noqa: E402
    HARMONY_SPECIAL_IDS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    _main,
    load_tokenizer,
    train_sentencepiece,
)
from tests.conftest import SHARED_DATA  # noqa: E402

VALID_TXT = SHARED_DATA / "valid.txt"

VARIED = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom said, \"Let's play!\"\nThey ran to the park.\n\nThe end.",
    "  two leading spaces, trailing space ",
    "tabs\tand\r\nwindows newlines\n",
    "café naïve résumé Über straße",
    "emoji 😀🐉👩‍👩‍👧 and a dragon",
    "日本語の文章と中文句子，还有한국어.",
    "numbers 1234567 3.14159 -42 1e10",
    "<|endoftext|> <|end|> <|start|> <|return|> <|message|>",
    "",
    "\n",
]

# Known ids from gpt-oss spec §3.2 (Harmony tests/docs).
HARMONY_KNOWN = {
    "hello": [24912],
    "Hello World": [13225, 5922],
    "analysis": [35644],
    "assistant": [173781],
    "final": [17196],
    "2 + 2 = 4.": [17, 659, 220, 17, 314, 220, 19, 13],
    'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.':
        [1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842, 12295, 81645, 13, 51441, 6052, 13],
}


def _valid_stories(limit: int | None = None) -> list[str]:
    text = VALID_TXT.read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return stories[:limit] if limit else stories


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    train_sentencepiece([VALID_TXT], out, vocab_size=512, max_bytes=150_000, num_threads=1)
    return out


@pytest.fixture(scope="module")
def sp(sp_dir: Path) -> SentencePieceTokenizer:
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return load_tokenizer("tiktoken:gpt2")


@pytest.fixture(scope="module")
def harmony() -> Tokenizer:
    return load_tokenizer("tiktoken:o200k_harmony")


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory: pytest.TempPathFactory, harmony: TiktokenTokenizer) -> Path:
    """A gpt-oss-style tokenizer.json produced by transformers' own TikTokenConverter from tiktoken's ranks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = harmony._enc
    d = tmp_path_factory.mktemp("gptoss_download")
    bpe_file = d / "o200k_base.tiktoken"
    with open(bpe_file, "wb") as f:
        for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    # As the HF GptOssConverter: specials 199998..200018 appended in id order after the 199998 ranks.
    by_id = {v: k for k, v in enc._special_tokens.items() if v <= 200018}
    by_id[200018] = "<|endofprompt|>"
    specials = [by_id[i] for i in range(199998, 200019)]
    converted = TikTokenConverter(vocab_file=str(bpe_file), pattern=enc._pat_str,
                                  extra_special_tokens=specials).converted()
    converted.save(str(d / "tokenizer.json"))
    bpe_file.unlink()
    return d


@pytest.fixture(scope="module")
def hf_json(hf_json_dir: Path) -> Tokenizer:
    return load_tokenizer(hf_json_dir)


# ------------------------------------------------------------------------------------------ SentencePiece


def test_sentencepiece_ids_and_special_tokens(sp: SentencePieceTokenizer) -> None:
    assert sp.name == "sentencepiece"
    assert sp.vocab_size == 512
    assert (sp.piece(0), sp.piece(1), sp.piece(2)) == ("<unk>", "<s>", "</s>")
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    assert sp.stop_ids == frozenset({2})
    assert sp.special_id("<|endoftext|>") == 2
    # newline is one piece of its own, so paragraphs survive and are cheap
    nl = sp.encode("a\nb")
    assert any(sp.piece(i) == "\n" for i in nl)


@pytest.mark.parametrize("text", VARIED)
def test_sentencepiece_round_trips_exactly(sp: SentencePieceTokenizer, text: str) -> None:
    ids = sp.encode(text)
    assert all(0 <= i < sp.vocab_size for i in ids)
    assert sp.decode(ids) == text


def test_sentencepiece_round_trips_every_real_story(sp: SentencePieceTokenizer) -> None:
    stories = _valid_stories()
    assert len(stories) == 400
    multi_paragraph = [s for s in stories if "\n" in s]
    assert multi_paragraph, "fixture should contain multi-paragraph stories"
    encoded = sp.encode_batch(stories)
    assert encoded[0] == sp.encode(stories[0])
    bad = [s for s, ids in zip(stories, encoded) if sp.decode(ids) != s]
    assert not bad


def test_sentencepiece_compresses_stories(sp: SentencePieceTokenizer) -> None:
    # even 512 pieces (256 of them byte fallbacks) should do far better than one token per byte
    story = _valid_stories(1)[0]
    assert len(sp.encode(story)) < len(story.encode()) / 1.8


def test_sentencepiece_save_and_reload(sp: SentencePieceTokenizer, tmp_path: Path) -> None:
    sp.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.model").is_file()
    for spec in (tmp_path / "ckpt", str(tmp_path / "ckpt" / "tokenizer.model"),
                 f"sentencepiece:{tmp_path / 'ckpt' / 'tokenizer.model'}"):
        again = load_tokenizer(spec)
        assert again.fingerprint == sp.fingerprint
        assert again.encode(VARIED[1]) == sp.encode(VARIED[1])


def test_sentencepiece_training_respects_max_bytes(tmp_path: Path) -> None:
    from model.tokenizer import _iter_training_sentences

    got = list(_iter_training_sentences([VALID_TXT], max_bytes=5_000))
    size = sum(len(s.encode()) for s in got)
    assert 5_000 <= size < 5_000 + max(len(s.encode()) for s in got) + 1
    assert len(got) < 400


def test_sentencepiece_training_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(TokenizerError, match="too small"):
        train_sentencepiece([VALID_TXT], tmp_path / "out", vocab_size=100)
    # sentencepiece's own failures (here: more characters than pieces) become TokenizerError with a hint
    with pytest.raises(TokenizerError, match="vocab"):
        train_sentencepiece([VALID_TXT], tmp_path / "out", vocab_size=270, max_bytes=20_000)


# ------------------------------------------------------------------------------------------ tiktoken


def test_gpt2_ids(gpt2: Tokenizer) -> None:
    assert gpt2.name == "tiktoken:gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.bos_id == gpt2.eos_id == 50256
    assert gpt2.stop_ids == frozenset({50256})
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.special_id("<|endoftext|>") == 50256


def test_harmony_ids(harmony: Tokenizer) -> None:
    assert harmony.name == "tiktoken:o200k_harmony"
    assert harmony.vocab_size == 201088
    assert (harmony.bos_id, harmony.eos_id) == (199998, 199999)
    assert harmony.stop_ids == frozenset({200002, 200012, 199999})
    for name, idx in HARMONY_SPECIAL_IDS.items():
        assert harmony.special_id(name) == idx
    assert harmony.special_id("<|start|>") == 200006
    assert harmony.special_id("<|end|>") == 200007
    with pytest.raises(KeyError):
        harmony.special_id("<|nope|>")
    for text, ids in HARMONY_KNOWN.items():
        assert harmony.encode(text) == ids, text
    # assembled with control ids by the caller, it matches the spec's rendered example
    rendered = ([harmony.bos_id, harmony.special_id("<|start|>"), harmony.special_id("<|message|>")]
                + harmony.encode("Hello World") + [harmony.special_id("<|end|>"), harmony.eos_id])
    assert rendered == [199998, 200006, 200008, 13225, 5922, 200007, 199999]


@pytest.mark.parametrize("kind", ["sp", "gpt2", "harmony", "hf_json"])
def test_control_token_text_is_ordinary(kind: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    controls = {tok.bos_id, tok.eos_id, *tok.stop_ids} - {None}
    if kind in ("harmony", "hf_json"):
        controls |= set(range(199998, 201088))
    for text in ("<|endoftext|>", "<|end|>", "<|start|>assistant<|message|>hi<|return|>", "</s><s>",
                 "story <|endoftext|>\n"):
        ids = tok.encode(text)
        assert not controls & set(ids), (kind, text, ids)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["sp", "gpt2", "harmony"])
def test_decode_never_raises_on_partial_sequences(kind: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    ids = tok.encode("😀 日本 𓀀𓁐 🐉🦖")  # rare characters are split into byte tokens in every kind
    for cut in range(len(ids) + 1):
        out = tok.decode(ids[:cut])
        assert isinstance(out, str)
    # an emoji split between tokens decodes to the replacement character, not an exception
    partial = [tok.decode(ids[:cut]) for cut in range(1, len(ids))]
    assert any("\ufffd" in p for p in partial)
    assert tok.decode([tok.vocab_size + 5]) == ""  # ids outside the vocabulary are dropped


def test_tiktoken_save_and_reload(harmony: Tokenizer, gpt2: Tokenizer, tmp_path: Path) -> None:
    for tok in (harmony, gpt2):
        d = tmp_path / tok.name.replace(":", "_")
        tok.save(d)
        info = json.loads((d / "tokenizer_info.json").read_text())
        assert info["encoding"] == tok.name.split(":")[1]
        again = load_tokenizer(d)
        assert again.name == tok.name
        assert again.encode(VARIED[0]) == tok.encode(VARIED[0])


# ------------------------------------------------------------------------------------------ HF tokenizer.json


def test_harmony_from_hf_tokenizer_json_matches_tiktoken(hf_json_dir: Path, hf_json: Tokenizer,
                                                         harmony: Tokenizer) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    rebuilt = hf_json
    assert isinstance(rebuilt, TiktokenTokenizer)
    assert rebuilt.name == "tiktoken:o200k_harmony"
    assert rebuilt.vocab_size == 201088
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.stop_ids) == (harmony.bos_id, harmony.eos_id,
                                                                  harmony.stop_ids)
    for name, idx in HARMONY_SPECIAL_IDS.items():
        assert rebuilt.special_id(name) == idx
    assert rebuilt.fingerprint == harmony.fingerprint  # same ids -> shares token caches
    for text, ids in HARMONY_KNOWN.items():
        assert rebuilt.encode(text) == ids, text
    hf = HFTokenizer.from_file(str(hf_json_dir / "tokenizer.json"))
    sample = VARIED + _valid_stories(40) + ["x" * 300, "  \n\n\t  mixed   whitespace \r\n", "I'M HERE'S it's"]
    for text in sample:
        ids = rebuilt.encode(text)
        assert ids == harmony.encode(text), text
        if "<|" not in text:  # HF tokenizers parses added tokens inside text; ours never does
            assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert rebuilt.decode(ids) == text
    # the reserved ids the JSON does not list are filled in, as tiktoken does
    assert rebuilt.decode([201087]) == harmony.decode([201087]) == "<|reserved_201087|>"


def test_hf_json_saved_checkpoint_reloads_offline(hf_json: Tokenizer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rebuilt = hf_json
    rebuilt.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "ckpt" / "tokenizer_info.json").read_text())["encoding"] == "o200k_harmony"

    def offline(cls: type, name: str) -> None:
        raise TokenizerError("no network and no tiktoken cache")

    # tiktoken unusable (offline on a fresh machine): the saved copy of tokenizer.json is used
    monkeypatch.setattr(TiktokenTokenizer, "from_name", classmethod(offline))
    again = load_tokenizer(tmp_path / "ckpt")
    assert again.name == "tiktoken:o200k_harmony"
    assert again.encode("Hello World") == [13225, 5922]


def test_hf_json_rejects_non_bpe(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------ loading, CLI


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="No tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="Unknown tiktoken encoding"):
        load_tokenizer("tiktoken:no_such_encoding")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="Not a valid SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")


def test_cli_train_and_encode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "stories.txt"
    data.write_text("<|endoftext|>\n".join(s + "\n" for s in _valid_stories(60)) + "<|endoftext|>\n")
    assert _main(["train", "--data", str(data), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                  "--threads", "1"]) == 0
    assert "trained 400-piece BPE" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 400
    assert _main(["encode", "--tokenizer", str(tmp_path / "tok"), "--text", "Once upon a time"]) == 0
    out = capsys.readouterr().out
    assert str(tok.encode("Once upon a time")) in out
    assert _main(["encode", "--tokenizer", str(tmp_path / "missing"), "--text", "x"]) == 2
