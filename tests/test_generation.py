"""Generation engine: KV-cached decoding equals full recomputation, stop conditions, streaming text, seeds,
context limit, threads, the seeds' API and the CLI. Tiny random models (weights spread so outputs vary)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.generation import (
    GenerationResult,
    Generator,
    IncrementalDetokenizer,
    StopStringMatcher,
    TokenGenerator,
    generate_text,
    load_model_and_generate,
)
from model.gptoss import build_model
from model.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


class ByteTokenizer:
    """Bytes as ids 0..255, BOS 256, EOS 257 (a stand-in tokenizer; decode replaces bad UTF-8 like real ones)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def __init__(self, stop_ids: frozenset[int] = frozenset({257})):
        self.stop_ids = frozenset(stop_ids)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_config(arch: str = "gptoss", vocab: int = 258, **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=4, experts_per_token=2, intermediate_size=32,
                sliding_window=8, max_context=128, init_std=0.3)
    if arch == "gpt2":
        base.update(num_key_value_heads=4, head_dim=8, intermediate_size=64, sliding_window=0,
                    tie_word_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(arch: str = "gptoss", vocab: int = 258, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_config(arch, vocab, **kw)).eval()
    with torch.no_grad():  # non-zero sinks and biases so every part of the computation matters
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a busy shared machine two OpenMP threads can be many times
    slower; restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_tok():
    from model.tokenizer import load_tokenizer

    return load_tokenizer("tiktoken:gpt2")


@pytest.fixture(scope="module")
def byte_gen():
    return Generator(tiny_model(), ByteTokenizer())


@pytest.fixture(scope="module")
def word_gen(gpt2_tok):
    """A GPT-OSS model over the gpt2 vocabulary, so generated text is words (for stop-string tests)."""
    return Generator(tiny_model(vocab=gpt2_tok.vocab_size, seed=3), gpt2_tok)


def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The seeds' way: a forward over the whole sequence for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- KV cache correctness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_cached_logits_equal_full_forward_past_the_window(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        # prefill 5, a chunk of 6 that crosses the window (8), then one token at a time to 40
        chunks = [model(ids[:, :5], cache), model(ids[:, 5:11], cache)]
        chunks += [model(ids[:, t:t + 1], cache) for t in range(11, 40)]
    cached = torch.cat(chunks, dim=1)
    assert cache.length == 40
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert full[0, -1].std() > 0.1  # the model's outputs vary: the comparison means something
    if arch == "gptoss":  # sliding layers stay at `window` slots; the full layer holds all 40
        assert cache.layers[0].k.shape[2] == 8 and cache.layers[2].k.shape[2] == 8
        assert cache.layers[1].filled == 40


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_greedy_generation_with_cache_equals_recompute(arch):
    model = tiny_model(arch, seed=2) if arch == "gptoss" else tiny_model(arch, seed=4, init_std=0.5)
    gen = Generator(model, ByteTokenizer(stop_ids=frozenset()))
    prompt = [256, 72, 105, 33]
    res = gen.stream_tokens(prompt, SamplingParams(temperature=0.0, max_new_tokens=30), stop_ids=())
    got = list(res)
    assert got == greedy_by_recompute(model, prompt, 30)
    assert len(set(got)) > 3  # not a degenerate constant output
    assert res.result.stop_reason == "max_tokens" and res.result.token_ids == got


# ---- sampling: seeds ------------------------------------------------------------------------------------------
def test_same_seed_same_story_and_random_seed_is_reported(byte_gen):
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=1234)
    a, b = byte_gen.generate("Hi", params, stop_ids=()), byte_gen.generate("Hi", params, stop_ids=())
    assert a.seed == 1234 and a.token_ids == b.token_ids
    c = byte_gen.generate("Hi", SamplingParams(temperature=1.0, max_new_tokens=20, seed=99), stop_ids=())
    assert c.token_ids != a.token_ids
    r = byte_gen.generate("Hi", SamplingParams(temperature=1.0, max_new_tokens=20, seed=-1), stop_ids=())
    assert isinstance(r.seed, int) and r.seed >= 0
    again = byte_gen.generate("Hi", SamplingParams(temperature=1.0, max_new_tokens=20, seed=r.seed), stop_ids=())
    assert again.token_ids == r.token_ids


def test_temperature_zero_is_greedy(byte_gen):
    prompt = byte_gen.encode_prompt("Hi")
    res = byte_gen.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=10, seed=-1), stop_ids=())
    assert res.token_ids == greedy_by_recompute(byte_gen.model, prompt, 10)


# ---- stop conditions ------------------------------------------------------------------------------------------
def test_stops_on_stop_id_which_is_not_emitted(byte_gen):
    first = byte_gen.generate("Hi", GREEDY, stop_ids=())
    stop = first.token_ids[3]
    k = first.token_ids.index(stop)
    gen = Generator(byte_gen.model, ByteTokenizer(stop_ids=frozenset({stop})))  # the tokenizer's default stops
    res = gen.generate("Hi", GREEDY)
    assert res.stop_reason == "eos" and res.stop_id == stop
    assert res.token_ids == first.token_ids[:k]
    ts = gen.stream_tokens(gen.encode_prompt("Hi"), GREEDY)
    assert list(ts) == first.token_ids[:k] and ts.stop_id == stop
    assert res.text == ByteTokenizer().decode(first.token_ids[:k])


def test_stops_at_max_tokens(byte_gen):
    res = byte_gen.generate("Hi", SamplingParams(temperature=1.0, max_new_tokens=7, seed=1), stop_ids=())
    assert res.stop_reason == "max_tokens" and len(res.token_ids) == 7
    assert res.prompt_tokens == 3  # BOS + "Hi"
    assert res.elapsed_s > 0 and res.tokens_per_s > 0 and 0 < res.time_to_first_token_s <= res.elapsed_s


def test_stop_string_is_never_emitted(word_gen):
    params = SamplingParams(temperature=0.0, max_new_tokens=20)
    full = word_gen.generate("Once upon a time", params, stop_ids=()).text
    assert len(full) > 30
    stop = full[10:16]  # spans at least one token boundary most of the time; never at the start
    cut = full.find(stop)
    stream = word_gen.stream("Once upon a time", SamplingParams(temperature=0.0, max_new_tokens=20, stop=(stop,)),
                             stop_ids=())
    pieces = list(stream)
    assert "".join(pieces) == full[:cut] == stream.result.text
    assert stream.result.stop_reason == "stop_string"
    assert all(stop not in p for p in pieces)


def test_stop_string_matcher_holds_back_possible_starts():
    m = StopStringMatcher(["<end>", "THE END"])
    assert m.feed("Once upon <") == ("Once upon ", False)
    assert m.feed("e") == ("", False)
    assert m.feed("x") == ("<ex", False)  # turned out not to be a stop string: released
    assert m.feed(" and THE") == (" and ", False)
    assert m.feed(" EN") == ("", False)
    assert m.feed("D. more") == ("", True)
    assert StopStringMatcher([]).feed("anything") == ("anything", False)
    m2 = StopStringMatcher(["ab"])
    assert m2.feed("xxa") == ("xx", False)
    assert m2.flush() == "a"


# ---- streaming text ------------------------------------------------------------------------------------------
def test_multibyte_characters_are_never_split(gpt2_tok):
    text = "The unicorn 🦄 said café, 👩‍🚀 and 日本!"
    ids = gpt2_tok.encode(text)
    assert len(ids) > len(text.split())  # the emoji really span several byte-level tokens
    assert any("\ufffd" in gpt2_tok.decode([i]) for i in ids)
    context = gpt2_tok.encode("Once upon a time")
    detok = IncrementalDetokenizer(gpt2_tok, context)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any("🦄" in p for p in pieces) and any("👩‍🚀" in p or "🚀" in p for p in pieces)


def test_detokenizer_keeps_leading_spaces_of_sentencepiece_like_decoders():
    class StrippingTokenizer(ByteTokenizer):  # decode drops one leading space, as SentencePiece does
        def decode(self, ids) -> str:
            s = super().decode(ids)
            return s[1:] if s.startswith(" ") else s

    tok = StrippingTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("Hello"))
    assert "".join(detok.add(i) for i in tok.encode(" big world")) == " big world"


def test_stream_text_equals_decoded_tokens(word_gen, gpt2_tok):
    stream = word_gen.stream("The dog", SamplingParams(temperature=1.0, max_new_tokens=25, seed=5), stop_ids=())
    pieces = list(stream)
    assert stream.result.text == "".join(pieces) == gpt2_tok.decode(stream.result.token_ids)
    assert not stream.result.text.startswith("The dog")  # the continuation, not the prompt


def test_close_early_keeps_partial_text(word_gen):
    stream = word_gen.stream("The dog", SamplingParams(temperature=1.0, max_new_tokens=50, seed=5), stop_ids=())
    taken = [next(stream) for _ in range(3)]
    stream.close()
    r = stream.result
    assert isinstance(r, GenerationResult)
    assert r.stop_reason == "cancelled" and r.text == "".join(taken)
    assert 3 <= len(r.token_ids) < 50
    assert list(stream) == []  # a closed stream yields nothing more


def test_close_before_start_and_cancel_event(byte_gen):
    s = byte_gen.stream("Hi", GREEDY)
    s.close()
    assert s.result.stop_reason == "cancelled" and s.result.token_ids == [] and s.result.text == ""
    cancel = threading.Event()
    ts = byte_gen.stream_tokens(byte_gen.encode_prompt("Hi"), SamplingParams(temperature=0.0, max_new_tokens=50),
                                stop_ids=(), cancel=cancel)
    got = [next(ts), next(ts)]
    cancel.set()
    assert list(ts) == [] and ts.result.stop_reason == "cancelled" and ts.result.token_ids == got


# ---- context limit -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_context_limit_trims_and_goes_on(arch):
    model = tiny_model(arch, max_context=16)
    gen = Generator(model, ByteTokenizer(stop_ids=frozenset()))
    res = gen.generate("Hello", SamplingParams(temperature=1.0, max_new_tokens=40, seed=3))
    assert res.stop_reason == "max_tokens" and len(res.token_ids) == 40
    assert res.context_trimmed
    short = gen.generate("Hello", SamplingParams(temperature=1.0, max_new_tokens=5, seed=3))
    assert not short.context_trimmed and short.token_ids == res.token_ids[:5]
    long_prompt = gen.generate("x" * 40, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert long_prompt.context_trimmed and len(long_prompt.token_ids) == 3


def test_after_trimming_decoding_continues_from_the_recent_window():
    model = tiny_model(max_context=16)
    gen = Generator(model, ByteTokenizer(stop_ids=frozenset()))
    prompt = gen.encode_prompt("Hello")  # 6 ids; position 15 is the last that fits
    res = gen.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=14))
    ids = prompt + res.token_ids  # 20 ids: once 16 are in the cache, it restarts from the last 12 of 17
    assert res.context_trimmed
    assert res.token_ids[:11] == greedy_by_recompute(model, prompt, 11)
    assert ids[17] == greedy_by_recompute(model, ids[17 - 12:17], 1)[0]
    assert ids[18] == greedy_by_recompute(model, ids[17 - 12:18], 1)[0]


# ---- threads ---------------------------------------------------------------------------------------------------
def test_two_threads_on_one_model_match_sequential(byte_gen):
    jobs = {"a": ("Once", 11), "b": ("Twice upon", 22)}
    params = {k: SamplingParams(temperature=1.0, top_k=50, max_new_tokens=30, seed=s) for k, (_, s) in jobs.items()}
    sequential = {k: byte_gen.generate(p, params[k], stop_ids=()).token_ids for k, (p, _) in jobs.items()}
    results: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def work(k: str) -> None:
        barrier.wait()
        stream = byte_gen.stream(jobs[k][0], params[k], stop_ids=())
        for _ in stream:
            pass
        results[k] = stream.result.token_ids

    threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == sequential
    assert sequential["a"] != sequential["b"]


# ---- the seeds' API ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, gpt2_tok):
    from model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(tiny_model(vocab=gpt2_tok.vocab_size, seed=3), d, tokenizer=gpt2_tok, card={"name": "tiny"})
    return d


def test_generate_text_returns_the_continuation(word_gen, gpt2_tok):
    text = generate_text(word_gen.model, "Once upon a time", max_tokens=10, temperature=0.0, tokenizer=gpt2_tok)
    ids = word_gen.encode_prompt("Once upon a time")
    assert text == gpt2_tok.decode(greedy_by_recompute(word_gen.model, ids, 10))
    assert text == generate_text(word_gen, "Once upon a time", max_tokens=10, temperature=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate_text(word_gen.model, "Once", max_tokens=2)


def test_load_model_and_generate(checkpoint_dir, word_gen):
    text = load_model_and_generate(checkpoint_dir, "The cat", max_length=8, temperature=0.0)
    assert text == word_gen.generate("The cat", SamplingParams(temperature=0.0, max_new_tokens=8)).text


def test_token_generator_yields_ids_and_resets(checkpoint_dir):
    tg = TokenGenerator(checkpoint_dir, device="cpu")
    prompt = tg.tokenizer.encode("Once upon a time")
    ids = list(tg.generate(prompt, stop_tokens=[], temperature=0.0, max_tokens=6))
    assert len(ids) == 6 and all(isinstance(i, int) for i in ids)
    assert ids == greedy_by_recompute(tg.model, prompt, 6)
    # The stop token is yielded last, as in OpenAI's reference loop.
    tg.reset()
    stopped = list(tg.generate(prompt, stop_tokens=[ids[2]], temperature=0.0, max_tokens=6))
    assert stopped == ids[:ids.index(ids[2]) + 1]
    # A prompt extending the previous call reuses its cache and gives the same tokens as a fresh start.
    tg.reset()
    list(tg.generate(prompt, stop_tokens=[], temperature=0.0, max_tokens=6))
    assert tg._cache is not None
    follow = prompt + ids + tg.tokenizer.encode(" The end.")
    continued = list(tg.generate(follow, stop_tokens=[], temperature=0.0, max_tokens=5))
    tg.reset()
    assert tg._cache is None
    assert continued == list(tg.generate(follow, stop_tokens=[], temperature=0.0, max_tokens=5))
    assert continued == greedy_by_recompute(tg.model, follow, 5)


# ---- CLI ---------------------------------------------------------------------------------------------------------
def _cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # TIKTOKEN_CACHE_DIR comes from conftest
    return subprocess.run([sys.executable, "-m", "model.generate", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def test_cli_num_samples_and_interactive(checkpoint_dir):
    p = _cli(["--model", str(checkpoint_dir), "--prompt", "Once upon a time", "--max-tokens", "5",
              "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01",
              "--repetition-penalty", "1.1", "--seed", "7", "--num-samples", "2", "--interactive"],
             stdin="The dog\n\nA cat\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Once upon a time") == 2
    assert "sample 1/2" in p.stdout and "sample 2/2" in p.stdout
    summaries = [ln for ln in p.stderr.splitlines() if ln.startswith("[")]
    assert len(summaries) == 6  # 2 samples for --prompt, then 2 for each of the two interactive prompts
    assert "seed=7 " in summaries[0] and "seed=8 " in summaries[1]
    assert all("stop=max_tokens" in s or "stop=eos" in s for s in summaries)


def test_cli_reports_missing_checkpoint_and_missing_prompt(tmp_path, capsys):
    from model.generate import main

    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "error: cannot load" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "--prompt" in capsys.readouterr().err
