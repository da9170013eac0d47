"""download_weights.py / model/hub.py against a local stand-in for the Hugging Face Hub.

The stand-in is a threaded http.server on 127.0.0.1 implementing what huggingface_hub 2.4's
snapshot_download calls: ``GET /api/{models,datasets}/{repo}/revision/{rev}`` (repo info with the commit sha),
``GET /api/.../tree/{commit}?recursive=...`` (file listing with sizes) and ``HEAD``/``GET
/[datasets/]{repo}/resolve/{commit}/{path}`` (X-Repo-Commit, ETag, Content-Length; Range for resumes). The CLI
runs in a subprocess with HF_ENDPOINT pointing at it (huggingface_hub reads it at import time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from model import hub

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_123"
TINY = {
    "num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
    "sliding_window": 8,
}  # fmt: skip
TINY_COUNTS = {"original": 2 * 15 + 3, "hf": 2 * 19 + 3}


# --------------------------------------------------------------------------------------------------------
# the stand-in hub


class FakeHub:
    """Serves repo directories; records every request; can lie about sizes in the listing."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Path] = {}  # (repo_type, repo_id) -> directory
        self.size_overrides: dict[str, int] = {}  # path in repo -> size reported by the tree listing
        self.drop_after: dict[str, int] = {}  # path in repo -> bytes sent before the connection drops (once)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.ranges: list[str] = []  # Range headers received
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub_.handle(self, head=True)

            def do_GET(self) -> None:
                hub_.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- responses
    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def send_json(self, h: BaseHTTPRequestHandler, data: object, head: bool) -> None:
        self.send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

    def not_found(self, h: BaseHTTPRequestHandler, code: str, head: bool) -> None:
        self.send(h, 404, b'{"error": "not found"}', {"X-Error-Code": code, "Content-Type": "application/json"},
                  head)  # fmt: skip

    def files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo_id = "/".join(parts[2:4])
            root = self.repos.get((repo_type, repo_id))
            if root is None:
                return self.not_found(h, "RepoNotFound", head)
            if len(parts) == 4 or parts[4] == "revision":  # repo info, default branch or a given revision
                siblings = [{"rfilename": p.relative_to(root).as_posix()} for p in self.files(root)]
                return self.send_json(h, {"id": repo_id, "sha": COMMIT, "siblings": siblings, "private": False}, head)
            if parts[4] == "tree" and len(parts) >= 6:
                entries: list[dict[str, object]] = []
                for d in sorted({p.parent for p in self.files(root)} - {root}):
                    entries.append({"type": "directory", "path": d.relative_to(root).as_posix(), "oid": "0" * 40,
                                    "size": 0})  # fmt: skip
                for p in self.files(root):
                    rel = p.relative_to(root).as_posix()
                    size = self.size_overrides.get(rel, p.stat().st_size)
                    oid = hashlib.sha1(rel.encode()).hexdigest()
                    entries.append({"type": "file", "path": rel, "size": size, "oid": oid})
                return self.send_json(h, entries, head)
            return self.not_found(h, "RepoNotFound", head)
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            root = self.repos.get((repo_type, "/".join(parts[:2])))
            if root is None:
                return self.not_found(h, "RepoNotFound", head)
            file = root / "/".join(parts[4:])
            if not file.is_file():
                return self.not_found(h, "EntryNotFound", head)
            data = file.read_bytes()
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            rng = h.headers.get("Range")
            if rng:
                self.ranges.append(rng)
            if rng and rng.startswith("bytes=") and not head:
                start = int(rng[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self.send(h, 206, data[start:], headers, head)
            headers["Content-Length"] = str(len(data))
            cut = self.drop_after.pop("/".join(parts[4:]), None) if not head else None
            if cut is not None:  # announce the whole file, send part of it, hang up
                h.close_connection = True
                h.send_response(200)
                for k, v in headers.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data[:cut])
                h.wfile.flush()
                return None
            return self.send(h, 200, data, headers, head)
        return self.not_found(h, "RepoNotFound", head)

    def fetched(self) -> list[str]:
        """Paths of files whose content was requested (GET on resolve)."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests
                if m == "GET" and "/resolve/" in p]  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny openai/gpt-oss-20b look-alike with both weight layouts, tokenizer files and metal/."""
    repo = tmp_path_factory.mktemp("repo") / "gpt-oss-20b"
    hub.write_random_gpt_oss_checkpoint(repo, TINY, "original", seed=0, experts="quantize")
    hub.write_random_gpt_oss_checkpoint(repo, TINY, "hf", seed=0, experts="quantize")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        (repo / name).write_text(json.dumps({"name": name}))
    (repo / "chat_template.jinja").write_text("{{ messages }}")
    (repo / "README.md").write_text("tiny stand-in\n")
    (repo / "metal").mkdir()
    (repo / "metal" / "model.bin").write_bytes(os.urandom(4096))
    return repo


@pytest.fixture
def fake_hub(model_repo: Path):
    with FakeHub() as server:
        server.repos[("model", "openai/gpt-oss-20b")] = model_repo
        yield server


def run_cli(args: list[str], endpoint: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=TOKEN,
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="5",
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, str(ROOT / "download_weights.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def local_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
            and ".cache" not in p.parts}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# end-to-end downloads through the CLI


def test_download_original_format(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "weights" / "gpt-oss-20b"
    proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], fake_hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{TINY_COUNTS['original']}/{TINY_COUNTS['original']} tensors" in proc.stdout
    files = local_files(out)
    assert {"original/model.safetensors", "original/config.json", "original/dtypes.json", "config.json",
            "tokenizer.json", "chat_template.jinja", hub.MARKER_NAME} <= files  # fmt: skip
    assert not any(f.startswith("metal/") for f in files)
    assert not any(f.startswith("model-") for f in files)  # the HF shards are not wanted here
    assert "README.md" not in files
    assert not any("metal" in p for _, p, _ in fake_hub.requests)  # never even asked for
    # HF_TOKEN reached the server
    assert {auth for _, p, auth in fake_hub.requests if "/resolve/" in p} == {f"Bearer {TOKEN}"}
    assert hub.is_download_complete(out, "original") and not hub.is_download_complete(out, "hf")
    marker = hub.read_download_marker(out)
    assert marker["formats"]["original"]["commit"] == COMMIT
    assert marker["formats"]["original"]["num_tensors"] == TINY_COUNTS["original"]
    # downloaded bytes are exactly the served ones
    assert (out / "original/model.safetensors").read_bytes() == (fake_hub.repos[("model", "openai/gpt-oss-20b")]
                                                                  / "original/model.safetensors").read_bytes()

    # a second run finds everything in place and fetches no file content again
    n_get = len(fake_hub.fetched())
    proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], fake_hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(fake_hub.fetched()) == n_get
    assert "(0 B to fetch)" in proc.stdout


def test_dropped_connection_resumes_with_a_range_request(model_repo: Path, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB pieces and resumes from the last whole piece, so the dropped file
    # must be larger than that: a 12 MiB tokenizer.json, cut after 11 MiB
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    big = repo / "tokenizer.json"
    big.write_bytes(b"[" + b"0," * (6 * 1024 * 1024 - 1) + b"0]")
    out = tmp_path / "out"
    with FakeHub() as server:
        server.repos[("model", "openai/gpt-oss-20b")] = repo
        server.drop_after["tokenizer.json"] = 11 * 1024 * 1024
        proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], server.url, tmp_path)
        assert server.drop_after == {}  # the connection was dropped once
        assert server.ranges == [f"bytes={10 * 1024 * 1024}-"]  # and only the rest was asked for again
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokenizer.json").read_bytes() == big.read_bytes()
    assert hub.is_download_complete(out, "original")


def test_download_hf_format(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "w"
    proc = run_cli(["--model", "gpt-oss-20b", "--format", "hf", "--output-dir", str(out)], fake_hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = local_files(out)
    assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
            hub.MARKER_NAME} <= files  # fmt: skip
    assert not any(f.startswith(("original/", "metal/")) for f in files)
    assert hub.is_download_complete(out, "hf") and not hub.is_download_complete(out, "original")
    report = hub.verify_gpt_oss_checkpoint(out, "hf")
    assert report.ok and report.num_tensors == TINY_COUNTS["hf"] and report.mxfp4


def test_truncated_file_fails_verification_and_leaves_no_marker(model_repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_repo"
    shutil.copytree(model_repo, bad)
    st = bad / "original" / "model.safetensors"
    with st.open("r+b") as f:
        f.truncate(st.stat().st_size - 100)
    out = tmp_path / "out"
    with FakeHub() as server:
        server.repos[("model", "openai/gpt-oss-20b")] = bad
        proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], server.url, tmp_path)
    assert proc.returncode == 1
    assert "truncated" in proc.stderr and "not marked complete" in proc.stderr
    assert (out / "original" / "model.safetensors").is_file()  # it was fetched ...
    assert not (out / hub.MARKER_NAME).exists()  # ... but not accepted
    assert not hub.is_download_complete(out)


def test_hub_unreachable_fails_fast_without_writing(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], f"http://127.0.0.1:{port}", tmp_path)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1
    assert "cannot reach the Hugging Face Hub" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 20
    assert not out.exists()


def test_not_enough_disk_space_refuses_before_downloading(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.size_overrides["original/model.safetensors"] = 10**16  # 10 PB: more than any test disk
    out = tmp_path / "out"
    proc = run_cli(["--model", "gpt-oss-20b", "--output-dir", str(out)], fake_hub.url, tmp_path)
    assert proc.returncode == 1
    assert "not enough disk space" in proc.stderr
    assert "10000.00 TB to download" in proc.stderr and str(tmp_path) in proc.stderr
    assert not out.exists()
    assert fake_hub.fetched() == []


def test_disk_space_check_is_injectable_in_the_api(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[Path] = []

    def tiny_disk(path: Path) -> int:
        seen.append(path)
        return 1000

    with pytest.raises(hub.NotEnoughDiskSpaceError, match="only 1.0 KB free"):
        hub.download_gpt_oss("gpt-oss-20b", "original", out, endpoint=fake_hub.url, free_space_fn=tiny_disk,
                             log=lambda _: None)  # fmt: skip
    assert seen == [tmp_path.resolve()]  # nearest existing parent of the target
    assert not out.exists()
    # with room enough the same call downloads and verifies in-process
    result = hub.download_gpt_oss("gpt-oss-20b", "original", out, endpoint=fake_hub.url,
                                  free_space_fn=lambda p: 10**12, log=lambda _: None)  # fmt: skip
    assert result.commit == COMMIT and result.report is not None and result.report.ok
    assert result.downloaded_bytes == sum(f.size for f in result.files) > 0
    assert hub.is_download_complete(out, "original")


def test_failed_redownload_withdraws_the_marker(fake_hub: FakeHub, model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hub.download_gpt_oss("gpt-oss-20b", "original", out, endpoint=fake_hub.url, log=lambda _: None)
    assert hub.is_download_complete(out, "original")
    # the local copy gets damaged; a new download of a (now different) served file fails verification
    bad = tmp_path / "bad_repo"
    shutil.copytree(model_repo, bad)
    cfg = json.loads((bad / "original" / "config.json").read_text())
    cfg["hidden_size"] = 128  # shapes in the weights no longer match the config
    (bad / "original" / "config.json").write_text(json.dumps(cfg))
    fake_hub.repos[("model", "openai/gpt-oss-20b")] = bad
    (out / "original" / "config.json").unlink()
    with pytest.raises(hub.CheckpointVerificationError, match="expected"):
        hub.download_gpt_oss("gpt-oss-20b", "original", out, endpoint=fake_hub.url, log=lambda _: None)
    assert not hub.is_download_complete(out)


def test_dataset_download(tmp_path: Path) -> None:
    repo = tmp_path / "ts"
    repo.mkdir()
    (repo / "TinyStoriesV2-GPT4-train.txt").write_text("Once upon a time there was a cat.\n<|endoftext|>\n" * 50)
    (repo / "TinyStoriesV2-GPT4-valid.txt").write_text("The dog ran home.\n<|endoftext|>\n" * 5)
    (repo / "TinyStories-train.txt").write_text("old version, not wanted\n")
    out = tmp_path / "data"
    with FakeHub() as server:
        server.repos[("dataset", "roneneldan/TinyStories")] = repo
        proc = run_cli(["--dataset", "tinystories", "--output-dir", str(out)], server.url, tmp_path)
        fetched = server.fetched()
    assert proc.returncode == 0, proc.stderr
    assert local_files(out) == {"TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", hub.MARKER_NAME}
    assert sorted(fetched) == ["TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"]
    assert (out / "TinyStoriesV2-GPT4-valid.txt").read_text() == (repo / "TinyStoriesV2-GPT4-valid.txt").read_text()
    marker = hub.read_download_marker(out)
    assert marker["kind"] == "dataset" and marker["repo_id"] == "roneneldan/TinyStories"
    assert hub.is_download_complete(out)


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = run_cli(["--model", "gpt-oss-7b"], "http://127.0.0.1:9", tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_cli([], "http://127.0.0.1:9", tmp_path)
    assert proc.returncode == 2


def test_verify_only_marks_local_weights(tmp_path: Path) -> None:
    root = tmp_path / "manual"
    hub.write_random_gpt_oss_checkpoint(root, TINY, "original", seed=3)
    proc = run_cli(["--verify-only", str(root), "--format", "original"], "http://127.0.0.1:9", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert hub.is_download_complete(root, "original")
    st = root / "original" / "model.safetensors"
    with st.open("r+b") as f:
        f.truncate(st.stat().st_size - 1)
    (root / hub.MARKER_NAME).unlink()
    proc = run_cli(["--verify-only", str(root)], "http://127.0.0.1:9", tmp_path)
    assert proc.returncode == 1 and "truncated" in proc.stderr
    assert not hub.is_download_complete(root)


# --------------------------------------------------------------------------------------------------------
# verification and the expected tables


def test_expected_tables_for_the_real_models() -> None:
    t20o = hub.expected_tensors(hub.GPT_OSS_20B_CONFIG, "original")
    t20h = hub.expected_tensors(hub.GPT_OSS_20B_CONFIG, "hf")
    assert len(t20o) == 24 * 15 + 3 == 363
    assert len(t20h) == 24 * 19 + 3 == 459
    assert len(hub.expected_tensors(hub.GPT_OSS_120B_CONFIG, "original")) == 36 * 15 + 3
    assert t20o["embedding.weight"].shape == (201088, 2880)
    assert t20o["block.3.attn.qkv.weight"].shape == (5120, 2880)
    assert t20o["block.3.attn.out.weight"].shape == (2880, 4096)
    assert t20o["block.3.mlp.mlp1_weight.blocks"] == hub.TensorSpec((32, 5760, 90, 16), ("U8",))
    assert t20o["block.3.mlp.mlp2_weight.scales"].shape == (32, 2880, 90)
    assert t20o["block.3.mlp.mlp1_bias"].shape == (32, 5760)
    assert t20h["model.layers.23.self_attn.k_proj.weight"].shape == (512, 2880)
    assert t20h["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (32, 5760, 90, 16)
    assert t20h["model.layers.0.mlp.experts.down_proj_scales"].shape == (32, 2880, 90)
    assert t20h["model.layers.0.mlp.router.weight"].dtype == "BF16"
    # sizes add up to the spec's 13.761 GB checkpoint
    nbytes = sum(hub.DTYPE_SIZES[s.dtype] * math.prod(s.shape) for s in t20o.values())
    assert 13.75e9 < nbytes < 13.77e9
    # HF config keys are translated
    hf = hub.hf_config(hub.GPT_OSS_20B_CONFIG)
    assert hub.original_config(hf) == hub.original_config(hub.GPT_OSS_20B_CONFIG)
    assert hf["rope_scaling"]["truncate"] is False and hf["quantization_config"]["quant_method"] == "mxfp4"
    assert hf["layer_types"][:2] == ["sliding_attention", "full_attention"] and len(hf["layer_types"]) == 24
    assert len(hub.original_config(hf)) == 16


def test_verification_catches_wrong_shapes_missing_and_misindexed_tensors(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    hub.write_random_gpt_oss_checkpoint(root, TINY, "hf", seed=1, max_shard_bytes=40_000)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert hub.verify_gpt_oss_checkpoint(root, "hf").ok
    # a config that does not match the weights
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    report = hub.verify_gpt_oss_checkpoint(root, "hf")
    assert not report.ok and any("mlp.router.weight" in e and "expected BF16[8, 64]" in e for e in report.errors)
    with pytest.raises(hub.CheckpointVerificationError):
        report.raise_if_failed()
    (root / "config.json").write_text(json.dumps(cfg))
    # the index pointing a tensor at the wrong shard
    name = "model.layers.0.self_attn.sinks"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    bad = {**index, "weight_map": {**index["weight_map"], name: others[0]}}
    (root / "model.safetensors.index.json").write_text(json.dumps(bad))
    report = hub.verify_gpt_oss_checkpoint(root, "hf")
    assert any("index.json disagrees" in e for e in report.errors)
    # a shard missing entirely
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    Path(root / others[-1]).unlink()
    report = hub.verify_gpt_oss_checkpoint(root, "hf")
    assert any("missing" in e for e in report.errors) and report.num_tensors < TINY_COUNTS["hf"]


def test_safetensors_header_reader(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    out = hub.write_random_gpt_oss_checkpoint(root, TINY, "original", seed=2)
    st = out / "model.safetensors"
    header = hub.read_safetensors_header(st)
    assert len(header.tensors) == TINY_COUNTS["original"]
    assert header.metadata == {"format": "pt"}
    assert header.data_start % 8 == 0 and header.file_size == header.data_start + header.data_length
    assert header.tensors["block.1.mlp.mlp2_weight.blocks"]["shape"] == [4, 64, 2, 16]
    for n_cut, message in [(1, "truncated"), (header.data_length + 1, "truncated")]:
        cut = tmp_path / f"cut{n_cut}.safetensors"
        cut.write_bytes(st.read_bytes()[:-n_cut])
        with pytest.raises(ValueError, match=message):
            hub.read_safetensors_header(cut)
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(st.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        hub.read_safetensors_header(padded)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(ValueError, match="not valid JSON"):
        hub.read_safetensors_header(garbage)


# --------------------------------------------------------------------------------------------------------
# the random checkpoint writer


def test_writer_layouts_hold_the_same_model(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from model.mxfp4 import dequantize_mxfp4

    o = hub.write_random_gpt_oss_checkpoint(tmp_path / "a", TINY, "original", seed=7)
    h = hub.write_random_gpt_oss_checkpoint(tmp_path / "b", TINY, "hf", seed=7)
    d = hub.write_random_gpt_oss_checkpoint(tmp_path / "c", TINY, "hf", seed=7, mxfp4=False)
    assert json.loads((o / "config.json").read_text()).keys() == set(hub.ORIGINAL_CONFIG_KEYS)
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    dtypes = json.loads((o / "dtypes.json").read_text())
    assert dtypes["block.0.mlp.mlp1_weight.blocks"] == "FP4" and dtypes["block.0.mlp.mlp1_weight.scales"] == "UE8"
    assert hub.verify_gpt_oss_checkpoint(tmp_path / "c", "hf").ok
    with (safe_open(o / "model.safetensors", "pt") as fo, safe_open(h / "model-00001-of-00001.safetensors", "pt") as fh,
          safe_open(d / "model-00001-of-00001.safetensors", "pt") as fd):  # fmt: skip
        qkv = fo.get_tensor("block.1.attn.qkv.weight")
        assert torch.equal(qkv[:64], fh.get_tensor("model.layers.1.self_attn.q_proj.weight"))
        assert torch.equal(qkv[64:96], fh.get_tensor("model.layers.1.self_attn.k_proj.weight"))
        assert torch.equal(qkv[96:], fh.get_tensor("model.layers.1.self_attn.v_proj.weight"))
        same = [
            ("block.0.mlp.mlp1_weight.blocks", "model.layers.0.mlp.experts.gate_up_proj_blocks"),
            ("block.1.mlp.mlp2_weight.scales", "model.layers.1.mlp.experts.down_proj_scales"),
            ("unembedding.weight", "lm_head.weight"),
            ("block.0.attn.sinks", "model.layers.0.self_attn.sinks"),
        ]
        for a, b in same:
            assert torch.equal(fo.get_tensor(a), fh.get_tensor(b)), a
        p = "block.0.mlp.mlp1_weight"
        w = dequantize_mxfp4(fo.get_tensor(p + ".blocks"), fo.get_tensor(p + ".scales"))
        assert w.abs().max() > 0 and w.float().std() > 0.05  # quantized from N(0, 1/64), not blank
        dense = fd.get_tensor("model.layers.0.mlp.experts.gate_up_proj")  # [E, in, out], unquantized
        assert dense.shape == (4, 64, 128)
        # quantization error stays within MXFP4's bound: a quarter of each block's max
        assert (dense.transpose(1, 2).float() - w.float()).abs().max() <= 0.25 * dense.abs().max()
        assert torch.equal(fo.get_tensor("norm.scale"), fd.get_tensor("model.norm.weight"))
    # different seeds give different weights
    e = hub.write_random_gpt_oss_checkpoint(tmp_path / "e", TINY, "original", seed=8)
    assert (e / "model.safetensors").read_bytes() != (o / "model.safetensors").read_bytes()


def test_transformers_loads_the_random_hf_checkpoint(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import GptOssForCausalLM

    from model.mxfp4 import dequantize_mxfp4

    out = hub.write_random_gpt_oss_checkpoint(tmp_path, TINY, "hf", seed=4)
    model, info = GptOssForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        p = "model.layers.1.mlp.experts.down_proj"
        ours = dequantize_mxfp4(f.get_tensor(p + "_blocks"), f.get_tensor(p + "_scales"))
        assert torch.equal(sd[p], ours.transpose(1, 2))
        k = "model.layers.0.self_attn.k_proj.bias"
        assert torch.equal(sd[k], f.get_tensor(k))
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()


def test_writer_random_experts_for_large_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors import safe_open

    from model.mxfp4 import dequantize_mxfp4

    # "auto" switches to random codes above the quantize limit; emulate a big model with a low limit
    monkeypatch.setattr(hub, "_QUANTIZE_LIMIT", 10)
    out = hub.write_random_gpt_oss_checkpoint(tmp_path, {**TINY, "hidden_size": 256, "intermediate_size": 256},
                                              "original", seed=0)  # fmt: skip
    assert hub.verify_gpt_oss_checkpoint(tmp_path, "original").ok
    with safe_open(out / "model.safetensors", "pt") as f:
        s = f.get_tensor("block.0.mlp.mlp1_weight.scales")
        w = dequantize_mxfp4(f.get_tensor("block.0.mlp.mlp1_weight.blocks"), s, torch.float32)
    assert int(s.min()) >= 118 and int(s.max()) <= 122
    assert 0.5 * 256**-0.5 < w.std().item() < 2 * 256**-0.5  # about 1/sqrt(fan_in)
