"""Data: story sources, the on-disk token cache (dtype round trip, reuse, atomic build) and batching."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from model import data as D
from model.data import (
    IGNORE_INDEX,
    DataError,
    DataSourceUnavailable,
    TokenCache,
    build_token_cache,
    document_chunks,
    eval_batches,
    iter_documents,
    load_token_cache,
    random_batches,
    resolve_data_source,
)
from model.tokenizer import Tokenizer
from tests.conftest import SHARED_DATA


class CharTokenizer(Tokenizer):
    """One id per character: ``offset + ord(c)``. Counts encode calls (to prove cache reuse)."""

    def __init__(self, offset: int = 3, vocab_size: int = 400, bos: int | None = 1, eos: int = 2,
                 fail_after: int | None = None) -> None:
        self.offset, self.vocab_size, self.bos_id, self.eos_id = offset, vocab_size, bos, eos
        self.stop_ids = frozenset({eos})
        self.name = f"char{offset}"
        self.calls = 0
        self.fail_after = fail_after

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return [self.offset + (ord(c) % 256) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(chr(i - self.offset) for i in ids if i >= self.offset)


STORIES = ["Once upon a time there was a cat.\nThe cat sat.", "Tom ran.", "A much longer story " * 5 + "end."]


def write_txt(path: Path, stories: Sequence[str]) -> Path:
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_txt(tmp_path / "train.txt", STORIES)


def layout(tok: CharTokenizer, stories: Sequence[str]) -> list[int]:
    out: list[int] = []
    for s in stories:
        out += ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(s) + [tok.eos_id]
    return out


# ------------------------------------------------------------------------------------------- sources


def test_iter_documents_txt_formats(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"First story.\r\nSecond paragraph.\r\n<|endoftext|>\r\n\n<|endoftext|>\n"
                  b"  Inline one.<|endoftext|>Inline two.\n<|endoftext|>\nNo separator at the end\n")
    assert list(iter_documents(f)) == ["First story.\nSecond paragraph.", "Inline one.", "Inline two.",
                                       "No separator at the end"]


def test_iter_documents_jsonl_and_directory(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "From text."}\n\n{"story": " From story. "}\n"plain string"\n')
    write_txt(tmp_path / "a.txt", ["From txt."])
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(tmp_path / "b.jsonl")) == ["From text.", "From story.", "plain string"]
    assert list(iter_documents(tmp_path)) == ["From txt.", "From text.", "From story.", "plain string"]


def test_iter_documents_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a 'text' or 'story'"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:1: not valid JSON"):
        list(iter_documents(tmp_path / "broken.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="Unsupported data file"):
        list(iter_documents(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No .txt or .jsonl"):
        list(iter_documents(tmp_path / "empty"))


def test_real_valid_split_has_400_stories() -> None:
    stories = list(iter_documents(SHARED_DATA / "valid.txt"))
    assert len(stories) == 400
    assert stories[0].startswith("Once upon a time, there was a little girl named Lily.")
    assert not any("<|endoftext|>" in s for s in stories)
    assert all(s == s.strip() and s for s in stories)
    assert sum("\n" in s for s in stories) > 50  # paragraphs kept


def test_resolve_tinystories_from_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("train", "valid", "test"):
        write_txt(tmp_path / f"{name}.txt", [name])
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_source("tinystories", "train") == tmp_path / "train.txt"
    assert resolve_data_source("TinyStories", "validation") == tmp_path / "valid.txt"
    assert resolve_data_source("tinystories", "test") == tmp_path / "test.txt"
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="has no test.txt"):
        resolve_data_source("tinystories", "test")
    with pytest.raises(DataError, match="Unknown split"):
        resolve_data_source("tinystories", "holdout")


def test_resolve_paths(tmp_path: Path, corpus: Path) -> None:
    assert resolve_data_source(corpus, "valid") == corpus  # an explicit file is used as given
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    write_txt(split_dir / "TinyStoriesV2-GPT4-valid.txt", ["v"])
    write_txt(split_dir / "train.txt", ["t"])
    assert resolve_data_source(split_dir, "val") == split_dir / "TinyStoriesV2-GPT4-valid.txt"
    shards = tmp_path / "shards"
    shards.mkdir()
    write_txt(shards / "part1.txt", ["a"])
    assert resolve_data_source(shards, "train") == shards
    with pytest.raises(DataError, match="has no valid file"):
        resolve_data_source(shards, "valid")
    with pytest.raises(DataError, match="Data not found"):
        resolve_data_source(tmp_path / "nope.txt")


def _offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_offline_fails_at_once_naming_local_alternative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_hub(monkeypatch, tmp_path / "hub")
    t0 = time.perf_counter()
    with pytest.raises(DataSourceUnavailable) as err:
        resolve_data_source("tinystories", "train")
    assert time.perf_counter() - t0 < 2
    msg = str(err.value)
    assert "--data path/to/train.txt" in msg and D.DATA_DIR_ENV in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(DataError, match="no 'test' split"):
        resolve_data_source("tinystories", "test")


def test_hub_unreachable_fails_without_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(D, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataSourceUnavailable, match="cannot be reached.*--data"):
        resolve_data_source("tinystories", "valid")


def test_hub_offline_uses_cached_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = cache / "datasets--roneneldan--TinyStories"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    write_txt(snap / "TinyStoriesV2-GPT4-valid.txt", ["cached story"])
    _offline_hub(monkeypatch, cache)
    path = resolve_data_source("tinystories", "valid")
    assert list(iter_documents(path)) == ["cached story"]


# ------------------------------------------------------------------------------------------- token cache


def test_cache_layout_and_meta(tmp_path: Path, corpus: Path) -> None:
    tok = CharTokenizer()
    cache = load_token_cache(corpus, tok, tmp_path / "cache", progress=False)
    expected = layout(CharTokenizer(), STORIES)
    assert cache.tokens.dtype == np.uint16
    assert cache.tokens.tolist() == expected
    assert len(cache) == len(expected)
    assert cache.num_documents == 3
    for i, story in enumerate(STORIES):
        doc = cache.document(i).tolist()
        assert doc[0] == 1 and doc[-1] == 2
        assert tok.decode(doc[1:-1]) == story
    m = cache.meta
    assert (m["dtype"], m["token_count"], m["document_count"]) == ("uint16", len(expected), 3)
    assert m["text_bytes"] == sum(len(s.encode()) for s in STORIES)
    assert m["tokenizer"] == "char3" and m["tokenizer_fingerprint"] == tok.fingerprint
    assert m["source"] == str(corpus.resolve())
    assert (m["bos_id"], m["eos_id"]) == (1, 2)


def test_cache_without_bos(tmp_path: Path, corpus: Path) -> None:
    tok = CharTokenizer(bos=None)
    cache = load_token_cache(corpus, tok, tmp_path, progress=False)
    assert cache.tokens.tolist() == layout(CharTokenizer(bos=None), STORIES)
    assert cache.document(1).tolist() == CharTokenizer().encode("Tom ran.") + [2]


def test_cache_reused_and_invalidated(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = CharTokenizer()
    first = build_token_cache(corpus, tok, tmp_path / "c", progress=False, docs_per_chunk=2)
    assert tok.calls == 3
    second = build_token_cache(corpus, tok, tmp_path / "c", progress=False)
    assert second == first and tok.calls == 3  # reused, nothing retokenized
    # default location from the environment
    monkeypatch.setenv(D.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert build_token_cache(corpus, tok, progress=False) == first and tok.calls == 3
    # another tokenizer -> another cache
    other = build_token_cache(corpus, CharTokenizer(offset=5), tmp_path / "c", progress=False)
    assert other != first
    # the data changes -> rebuilt
    write_txt(corpus, STORIES[:2])
    os.utime(corpus, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = build_token_cache(corpus, tok, tmp_path / "c", progress=False)
    assert third != first and tok.calls == 5
    assert TokenCache.open(third).num_documents == 2
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")]


def test_uint32_ids_round_trip_exactly(tmp_path: Path, corpus: Path) -> None:
    """The seed's bug: uint32 written, read back as uint16. Ids above 65535 must survive unchanged."""
    tok = CharTokenizer(offset=65536, vocab_size=70000, bos=69998, eos=69999)
    path = build_token_cache(corpus, tok, tmp_path, progress=False)
    cache = TokenCache.open(path)
    assert cache.meta["dtype"] == "uint32" and cache.tokens.dtype == np.uint32
    expected = layout(CharTokenizer(offset=65536, bos=69998, eos=69999), STORIES)
    assert max(expected) > 65535
    assert cache.tokens.tolist() == expected
    x, y = next(eval_batches(cache, 2, 8))
    assert x[0].tolist() == expected[:8] and y[0].tolist() == expected[1:9]
    # a meta.json claiming the wrong width is caught by the size check, not silently misread
    meta = json.loads((path / "meta.json").read_text())
    meta["dtype"] = "uint16"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"tokens.bin has \d+ bytes, expected .*uint16"):
        TokenCache.open(path)


def test_damaged_cache_is_detected_and_rebuilt(tmp_path: Path, corpus: Path) -> None:
    tok = CharTokenizer()
    path = build_token_cache(corpus, tok, tmp_path, progress=False)
    with open(path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="inconsistent"):
        TokenCache.open(path)
    again = build_token_cache(corpus, tok, tmp_path, progress=False)
    assert again == path and tok.calls == 6
    assert TokenCache.open(again).tokens.tolist() == layout(CharTokenizer(), STORIES)
    (path / "meta.json").unlink()
    with pytest.raises(DataError, match="not a token cache"):
        TokenCache.open(path)


def test_interrupted_build_leaves_no_cache(tmp_path: Path, corpus: Path) -> None:
    tok = CharTokenizer(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(corpus, tok, tmp_path / "c", progress=False, docs_per_chunk=1)
    assert list((tmp_path / "c").iterdir()) == []  # no final folder, no temp leftovers
    path = build_token_cache(corpus, CharTokenizer(), tmp_path / "c", progress=False)
    assert TokenCache.open(path).num_documents == 3


def test_real_valid_with_gpt2(tmp_path: Path) -> None:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA.parents[1] / "tiktoken_cache"))
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer("tiktoken:gpt2")
    cache = load_token_cache(SHARED_DATA / "valid.txt", tok, tmp_path, progress=False)
    assert cache.num_documents == 400
    assert cache.meta["dtype"] == "uint16"
    assert int((cache.tokens == 50256).sum()) == 800  # BOS (= EOS for GPT-2) before and EOS after each story
    first = cache.document(0)
    assert first[0] == first[-1] == 50256
    assert tok.decode(first[1:-1].tolist()) == next(iter_documents(SHARED_DATA / "valid.txt"))
    assert cache.text_bytes == sum(len(s.encode()) for s in iter_documents(SHARED_DATA / "valid.txt"))


# ------------------------------------------------------------------------------------------- batches


def test_random_batches_shapes_shift_and_determinism() -> None:
    tokens = np.arange(60000, 60000 + 500, dtype=np.uint16)  # values near the top of uint16 stay positive
    g = torch.Generator().manual_seed(7)
    x, y = random_batches(tokens, 4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one: consecutive windows of the stream
    assert bool((x >= 60000).all()) and bool((y < 60500).all())
    # deterministic from the generator state (what the trainer saves and restores)
    state = g.get_state()
    a = random_batches(tokens, 4, 16, g)
    b = random_batches(tokens, 4, 16, g)
    g.set_state(state)
    assert torch.equal(random_batches(tokens, 4, 16, g)[0], a[0])
    assert torch.equal(random_batches(tokens, 4, 16, g)[0], b[0])
    g2 = torch.Generator().manual_seed(7)
    assert torch.equal(random_batches(tokens, 4, 16, g2)[0], x)
    assert not torch.equal(random_batches(tokens, 4, 16, torch.Generator().manual_seed(8))[0], x)
    # every start is reachable and no window runs off the end
    starts = torch.cat([random_batches(tokens[:20], 64, 16, g)[0][:, 0] for _ in range(5)]) - 60000
    assert set(starts.tolist()) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="need at least"):
        random_batches(tokens[:16], 1, 16, g)


def test_random_batches_from_cache_and_tensor(tmp_path: Path, corpus: Path) -> None:
    cache = load_token_cache(corpus, CharTokenizer(), tmp_path, progress=False)
    expected = np.array(layout(CharTokenizer(), STORIES))
    x, y = random_batches(cache, 8, 10, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        starts = [s for s in range(len(expected) - 10) if expected[s:s + 10].tolist() == row_x]
        assert starts and any(expected[s + 1:s + 11].tolist() == row_y for s in starts)
    xt, _ = random_batches(torch.from_numpy(expected), 8, 10, torch.Generator().manual_seed(0))
    assert torch.equal(xt, x)


def test_eval_batches_cover_stream_once_in_order() -> None:
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(tokens, 4, 10))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # 10 windows: (103 - 1) // 10
    assert xs.flatten().tolist() == list(range(100))
    assert ys.flatten().tolist() == list(range(1, 101))
    assert len(list(eval_batches(tokens, 4, 10, max_batches=2))) == 2
    again = list(eval_batches(tokens, 4, 10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert list(eval_batches(tokens[:10], 4, 10)) == []


# ------------------------------------------------------------------------------------------- document chunks


@pytest.fixture
def doc_cache(tmp_path: Path) -> TokenCache:
    stories = ["a" * n for n in (1, 5, 12, 3, 20, 7, 9)]  # with BOS/EOS: 3, 7, 14, 5, 22, 9, 11 tokens
    path = write_txt(tmp_path / "docs.txt", stories)
    return load_token_cache(path, CharTokenizer(), tmp_path / "cache", progress=False)


def _replay(batches: list[D.DocumentBatch], batch_size: int) -> list[list[int]]:
    """Rebuild the documents each stream walked through, from x/y/reset alone."""
    docs: list[list[int]] = []
    current: list[list[int] | None] = [None] * batch_size
    for x, y, reset in batches:
        for b in range(batch_size):
            if reset[b]:
                if current[b]:
                    docs.append(current[b])
                current[b] = None
            valid = y[b] != IGNORE_INDEX
            k = int(valid.sum())
            if k == 0:
                assert reset[b], "an empty row only for a stream that has run out of documents"
                continue
            assert bool(valid[:k].all()), "targets are a prefix, padding only at the end"
            assert torch.equal(x[b, 1:k], y[b, :k - 1])  # y is x shifted by one
            if current[b] is None:
                current[b] = [int(x[b, 0])]
            current[b] += y[b, :k].tolist()
    docs += [c for c in current if c]
    return docs


def test_document_chunks_walk_each_document_once(doc_cache: TokenCache) -> None:
    batches = list(document_chunks(doc_cache, batch_size=3, block_size=4))
    for x, y, reset in batches:
        assert x.shape == y.shape == (3, 4) and reset.shape == (3,) and reset.dtype == torch.bool
    expected = [doc_cache.document(i).tolist() for i in range(doc_cache.num_documents)]
    assert sorted(_replay(batches, 3)) == sorted(expected)
    assert bool(batches[0].reset.all())  # every stream starts with a new document
    # the first document (3 tokens) fits one chunk; its stream starts the 4th document at the next step
    assert bool(batches[1].reset[0]) and not bool(batches[1].reset[2])
    # padded positions: pad id in x (EOS by default) and IGNORE_INDEX in y
    x0, y0 = batches[0].x[0], batches[0].y[0]
    assert y0.tolist() == [expected[0][1], expected[0][2], IGNORE_INDEX, IGNORE_INDEX]
    assert x0[2:].tolist() == [2, 2]


def test_document_chunks_shuffle_loop_and_resume(doc_cache: TokenCache) -> None:
    it = document_chunks(doc_cache, batch_size=2, block_size=5, seed=3)
    shuffled = list(it)
    expected = sorted(doc_cache.document(i).tolist() for i in range(doc_cache.num_documents))
    assert sorted(_replay(shuffled, 2)) == expected
    ordered = list(document_chunks(doc_cache, batch_size=2, block_size=5))
    assert _replay(shuffled, 2) != _replay(ordered, 2)

    looping = document_chunks(doc_cache, batch_size=2, block_size=5, seed=3, loop=True)
    first = [next(looping) for _ in range(40)]  # more than one epoch: never stops, epoch advances
    assert looping.epoch >= 1
    state = json.loads(json.dumps(looping.state_dict()))  # JSON-serialisable
    following = [next(looping) for _ in range(10)]
    resumed = document_chunks(doc_cache, batch_size=2, block_size=5, seed=3, loop=True)
    resumed.load_state_dict(state)
    for a, b in zip(following, [next(resumed) for _ in range(10)]):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.reset, b.reset)
    assert len(first) == 40
    with pytest.raises(DataError, match="same batch size"):
        document_chunks(doc_cache, batch_size=3, block_size=5, seed=3).load_state_dict(state)
