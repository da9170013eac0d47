"""`python -m model.chat`: harmony rendering, streaming, channel parsing, stop ids and history.

The session logic is checked with a scripted token source (so the channels and the stop are known), the whole
CLI end to end in a subprocess on a tiny random gpt-oss checkpoint in the original layout with the real
o200k_harmony tokenizer (its output is gibberish; the plumbing is what is tested)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.chat import NOT_DOWNLOADED, ChatSession
from model.harmony import CALL, CHANNEL, END, MESSAGE, RETURN, START

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 201088, "hidden_size": 64,
        "intermediate_size": 64, "swiglu_limit": 7.0, "head_dim": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": 8, "initial_context_length": 4096, "rope_theta": 150000,
        "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}


@pytest.fixture(scope="module")
def harmony_tok():
    from model.tokenizer import load_tokenizer

    return load_tokenizer("tiktoken:o200k_harmony")


def _reply(tok, analysis: str, final: str, stop: int = RETURN) -> list[int]:
    return ([CHANNEL, *tok.encode("analysis"), MESSAGE, *tok.encode(analysis), END, START,
             *tok.encode("assistant"), CHANNEL, *tok.encode("final"), MESSAGE, *tok.encode(final), stop])


class Scripted:
    """A token source that replays canned replies and records the prompts it was given."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def __call__(self, ids, params):
        self.prompts.append(list(ids))
        yield from self.replies.pop(0)
        yield 999  # never reached when the session stops at the stop id


def test_session_prints_final_hides_reasoning_and_keeps_history(harmony_tok):
    tok = harmony_tok
    src = Scripted([_reply(tok, "User greets. Reply.", "Hello there!"), _reply(tok, "Math.", "4")])
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tok, src, params=None, reasoning="low", developer="Be brief.", out=out, err=err)
    r1 = s.ask("Hi")
    assert (r1.answer, r1.reasoning, r1.stop) == ("Hello there!", "User greets. Reply.", "return")
    assert out.getvalue() == "Hello there!\n"
    assert "User greets" not in err.getvalue() and "stop: return" in err.getvalue()
    s.ask("2+2?")
    second = tok.decode(src.prompts[1])
    assert "Reasoning: low" in second and "# Instructions\n\nBe brief." in second
    # history holds the final answer, not the analysis, and the prompt ends ready for the assistant
    assert "<|start|>assistant<|channel|>final<|message|>Hello there!<|end|>" in second
    assert "User greets" not in second
    assert second.endswith("<|start|>user<|message|>2+2?<|end|><|start|>assistant")
    assert out.getvalue() == "Hello there!\n4\n"


def test_session_shows_reasoning_dimmed_and_drops_unanswered_questions(harmony_tok):
    tok = harmony_tok
    cut_off = [CHANNEL, *tok.encode("analysis"), MESSAGE, *tok.encode("thinking for ever")]
    src = Scripted([_reply(tok, "Plan.", "Done", stop=CALL), cut_off])
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tok, src, params=None, show_reasoning=True, out=out, err=err, color=True)
    assert s.ask("go").stop == "call"
    assert "\033[2m" in err.getvalue() and "Plan." in err.getvalue().replace("\033[2m", "").replace("\033[0m", "")
    assert out.getvalue() == "Done\n"
    r = s.ask("and?")
    assert r.answer == "" and r.stop == "max_tokens" and "no final answer" in err.getvalue()
    assert [m.role for m in s.chat.history] == ["user", "assistant"]  # the unanswered question was dropped


def _cli(args, tmp_path, stdin=None, timeout=240):
    env = dict(os.environ, STORYFORGE_KERNEL_CACHE=os.environ.get("STORYFORGE_KERNEL_CACHE",
                                                                  str(tmp_path / "kernels")))
    return subprocess.run([sys.executable, "-m", "model.chat", *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)


def test_missing_model_says_how_to_download(tmp_path):
    proc = _cli(["--model", str(tmp_path / "nope"), "--prompt", "hi"], tmp_path)
    assert proc.returncode != 0
    assert NOT_DOWNLOADED in proc.stderr


@pytest.fixture(scope="module")
def tiny_gptoss(tmp_path_factory, harmony_tok):
    from model.hub import write_random_gpt_oss_checkpoint

    root = tmp_path_factory.mktemp("gptoss-tiny")
    write_random_gpt_oss_checkpoint(root, TINY, "original", seed=0)
    harmony_tok.save(root)
    return root


def test_cli_end_to_end_on_a_tiny_random_checkpoint(tiny_gptoss, tmp_path):
    proc = _cli(["--model", str(tiny_gptoss), "--max-tokens", "6", "--temperature", "0", "--expert-cache-gb",
                 "0", "--device", "cpu"], tmp_path, stdin="Hello\n/reset\nTell me a story\n")
    assert proc.returncode == 0, proc.stderr
    turns = [line for line in proc.stderr.splitlines() if line.startswith("[") and "tokens/s" in line]
    assert len(turns) == 2, proc.stderr
    assert "[conversation cleared]" in proc.stderr and "[loaded" in proc.stderr
    for line in turns:  # each turn generated until a stop id or the 6-token limit
        n = int(line[1:].split()[0])
        assert 0 <= n <= 6 and ("stop: max_tokens" in line) == (n == 6)
