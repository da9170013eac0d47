"""gpt-oss weights and TinyStories from the Hugging Face Hub: download, verify, and random look-alikes.

* :func:`download_gpt_oss` / :func:`download_dataset` fetch through ``huggingface_hub.snapshot_download``
  (its own progress bars, resumable per file, ``HF_TOKEN`` honoured), after a listing of the repo that
  doubles as a connectivity check and gives the sizes for a free-disk-space check. ``metal/*`` is never
  fetched. Success is recorded in ``<dir>/.download_complete.json`` only after verification passes; the app
  treats a download as present only when that marker exists (:func:`is_download_complete`).
* :func:`verify_gpt_oss_checkpoint` checks a checkpoint directory (``original/`` or HF layout) from the
  safetensors headers only: tensor names, shapes and dtypes against the table derived from the
  directory's own ``config.json`` (spec §2.3/§2.4), and that every file is exactly header + data long.
* :func:`write_random_gpt_oss_checkpoint` writes a random checkpoint with the real names/dtypes/layout at any
  size (tensor by tensor, so memory stays bounded even for the full 20B).

No torch import at module level (the CLI and verification do not need it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MARKER_NAME = ".download_complete.json"
FORMATS = ("original", "hf")

MODEL_REPOS: dict[str, str] = {
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
ALLOW_PATTERNS: dict[str, list[str]] = {
    "original": ["original/*", *_TOKENIZER_FILES, "generation_config.json", "config.json"],
    "hf": [
        "config.json", "generation_config.json", "model-*.safetensors", "model.safetensors.index.json",
        *_TOKENIZER_FILES,
    ],
}  # fmt: skip
IGNORE_PATTERNS = ["metal/*"]  # the Apple-Metal copy of the weights (13.8 GB for 20b) is never wanted


@dataclass(frozen=True)
class DatasetSpec:
    repo_id: str
    files: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "tinystories": DatasetSpec(
        "roneneldan/TinyStories", ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
    ),
}

# original/config.json holds exactly these 16 keys (the reference does ModelConfig(**json)).
ORIGINAL_CONFIG_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
    "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
    "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
)  # fmt: skip
_SIZE_KEYS = (
    "num_hidden_layers", "num_experts", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
    "num_attention_heads", "num_key_value_heads",
)  # fmt: skip
_DEFAULTS: dict[str, Any] = {
    "experts_per_token": 4, "swiglu_limit": 7.0, "sliding_window": 128, "initial_context_length": 4096,
    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}  # fmt: skip
GPT_OSS_20B_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 24, "num_experts": 32, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8, **_DEFAULTS,
}  # fmt: skip
GPT_OSS_120B_CONFIG: dict[str, Any] = {**GPT_OSS_20B_CONFIG, "num_hidden_layers": 36, "num_experts": 128}


class HubError(RuntimeError):
    """A download could not be done; the message says what to do."""


class HubUnreachableError(HubError):
    pass


class NotEnoughDiskSpaceError(HubError):
    pass


class CheckpointVerificationError(HubError):
    def __init__(self, message: str, report: CheckpointReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------------------
# configs and the expected tensor table


def original_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The 16-key ``original/config.json`` dict from a config in either layout (HF keys are translated).

    Size keys must be present; the others default to the gpt-oss values.
    """
    c = dict(cfg)
    if "num_local_experts" in c or "model_type" in c:  # HF layout
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        c.setdefault("num_experts", c.get("num_local_experts"))
        c.setdefault("experts_per_token", c.get("num_experts_per_tok", c.get("experts_per_token")))
        if rope:
            c.setdefault("rope_scaling_factor", rope.get("factor"))
            c.setdefault("rope_ntk_alpha", rope.get("beta_slow"))
            c.setdefault("rope_ntk_beta", rope.get("beta_fast"))
            c.setdefault("initial_context_length", rope.get("original_max_position_embeddings"))
            if "rope_theta" not in c and "rope_theta" in rope:
                c["rope_theta"] = rope["rope_theta"]
    missing = [k for k in _SIZE_KEYS if c.get(k) is None]
    if missing:
        raise ValueError(f"gpt-oss config is missing {', '.join(missing)}")
    out = {k: (c[k] if c.get(k) is not None else _DEFAULTS[k]) for k in ORIGINAL_CONFIG_KEYS}
    for k in _SIZE_KEYS:
        if not isinstance(out[k], int) or out[k] <= 0:
            raise ValueError(f"gpt-oss config: {k} must be a positive integer, got {out[k]!r}")
    for k in ("hidden_size", "intermediate_size"):
        if out[k] % 32:
            raise ValueError(f"gpt-oss config: {k}={out[k]} must be a multiple of 32 (MXFP4 block size)")
    return out


def hf_config(cfg: dict[str, Any], *, mxfp4: bool = True) -> dict[str, Any]:
    """An HF ``config.json`` (GptOss, spec §2.2) for a config given in either layout."""
    o = original_config(cfg)
    big_vocab = o["vocab_size"] > 200002
    out: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002 if big_vocab else o["vocab_size"] - 1,
        "experts_per_token": o["experts_per_token"],
        "head_dim": o["head_dim"],
        "hidden_act": "silu",
        "hidden_size": o["hidden_size"],
        "initial_context_length": o["initial_context_length"],
        "initializer_range": 0.02,
        "intermediate_size": o["intermediate_size"],
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(o["num_hidden_layers"])
        ],
        "max_position_embeddings": int(o["initial_context_length"] * o["rope_scaling_factor"]),
        "model_type": "gpt_oss",
        "num_attention_heads": o["num_attention_heads"],
        "num_experts_per_tok": o["experts_per_token"],
        "num_hidden_layers": o["num_hidden_layers"],
        "num_key_value_heads": o["num_key_value_heads"],
        "num_local_experts": o["num_experts"],
        "output_router_logits": False,
        "pad_token_id": 199999 if big_vocab else o["vocab_size"] - 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": float(o["rope_ntk_beta"]),
            "beta_slow": float(o["rope_ntk_alpha"]),
            "factor": float(o["rope_scaling_factor"]),
            "original_max_position_embeddings": o["initial_context_length"],
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": o["rope_theta"],
        "router_aux_loss_coef": 0.9,
        "sliding_window": o["sliding_window"],
        "swiglu_limit": o["swiglu_limit"],
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": o["vocab_size"],
    }
    if mxfp4:
        out["quantization_config"] = {
            "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
            ],
            "quant_method": "mxfp4",
        }  # fmt: skip
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]  # allowed safetensors dtypes; the first is what the writer uses

    @property
    def dtype(self) -> str:
        return self.dtypes[0]


_NORM_DTYPES = ("BF16", "F32")  # gains and sinks: BF16 on the Hub; F32 accepted (loaders upcast anyway)


def expected_tensors(cfg: dict[str, Any], fmt: str, *, mxfp4: bool = True) -> dict[str, TensorSpec]:
    """Name -> shape/dtype of every tensor of a gpt-oss checkpoint in ``fmt`` ("original" or "hf").

    Counts: original 15 per layer + 3 (363 for 20b), HF 19 per layer + 3 (459 for 20b); without MXFP4 the
    expert weights are single BF16 tensors (original ``mlp1_weight [E, 2I, D]``; HF ``gate_up_proj
    [E, D, 2I]``, i.e. in x out), 13 / 17 per layer.
    """
    _check_fmt(fmt)
    o = original_config(cfg)
    n_layers, n_exp, vocab = o["num_hidden_layers"], o["num_experts"], o["vocab_size"]
    d, inter, hd = o["hidden_size"], o["intermediate_size"], o["head_dim"]
    hq, hkv = o["num_attention_heads"], o["num_key_value_heads"]
    bf, u8 = ("BF16",), ("U8",)
    t: dict[str, TensorSpec] = {}

    def add(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = bf) -> None:
        t[name] = TensorSpec(tuple(shape), dtypes)

    if fmt == "original":
        add("embedding.weight", (vocab, d))
        for i in range(n_layers):
            p = f"block.{i}."
            add(p + "attn.norm.scale", (d,), _NORM_DTYPES)
            add(p + "attn.qkv.weight", ((hq + 2 * hkv) * hd, d))
            add(p + "attn.qkv.bias", ((hq + 2 * hkv) * hd,))
            add(p + "attn.sinks", (hq,), _NORM_DTYPES)
            add(p + "attn.out.weight", (d, hq * hd))
            add(p + "attn.out.bias", (d,))
            add(p + "mlp.norm.scale", (d,), _NORM_DTYPES)
            add(p + "mlp.gate.weight", (n_exp, d))
            add(p + "mlp.gate.bias", (n_exp,))
            for w, rows, k, bias in (("mlp1", 2 * inter, d, 2 * inter), ("mlp2", d, inter, d)):
                if mxfp4:
                    add(p + f"mlp.{w}_weight.blocks", (n_exp, rows, k // 32, 16), u8)
                    add(p + f"mlp.{w}_weight.scales", (n_exp, rows, k // 32), u8)
                else:
                    add(p + f"mlp.{w}_weight", (n_exp, rows, k))
                add(p + f"mlp.{w}_bias", (n_exp, bias))
        add("norm.scale", (d,), _NORM_DTYPES)
        add("unembedding.weight", (vocab, d))
    else:
        add("model.embed_tokens.weight", (vocab, d))
        for i in range(n_layers):
            p = f"model.layers.{i}."
            add(p + "input_layernorm.weight", (d,), _NORM_DTYPES)
            for proj, out_dim in (("q_proj", hq * hd), ("k_proj", hkv * hd), ("v_proj", hkv * hd)):
                add(p + f"self_attn.{proj}.weight", (out_dim, d))
                add(p + f"self_attn.{proj}.bias", (out_dim,))
            add(p + "self_attn.o_proj.weight", (d, hq * hd))
            add(p + "self_attn.o_proj.bias", (d,))
            add(p + "self_attn.sinks", (hq,), _NORM_DTYPES)
            add(p + "post_attention_layernorm.weight", (d,), _NORM_DTYPES)
            add(p + "mlp.router.weight", (n_exp, d))
            add(p + "mlp.router.bias", (n_exp,))
            for w, rows, k in (("gate_up_proj", 2 * inter, d), ("down_proj", d, inter)):
                if mxfp4:
                    add(p + f"mlp.experts.{w}_blocks", (n_exp, rows, k // 32, 16), u8)
                    add(p + f"mlp.experts.{w}_scales", (n_exp, rows, k // 32), u8)
                else:
                    add(p + f"mlp.experts.{w}", (n_exp, k, rows))
                add(p + f"mlp.experts.{w}_bias", (n_exp, rows))
        add("model.norm.weight", (d,), _NORM_DTYPES)
        add("lm_head.weight", (vocab, d))
    return t


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------------------
# safetensors headers

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section
    data_length: int  # bytes the header says the data section has
    file_size: int


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse a safetensors header without reading tensor data; raise ValueError on any inconsistency.

    Checks each entry's byte range against its shape/dtype, that ranges do not overlap, and that the file is
    exactly 8 + header + data bytes long (so a truncated or padded file is caught).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path.name}: header length {n} does not fit in the file ({size} bytes): truncated?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: malformed header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= start <= end) or end - start != nbytes:
            raise ValueError(
                f"{path.name}: tensor {name!r} {dtype}{shape} needs {nbytes} bytes but its data_offsets are "
                f"[{start}, {end}]"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"{path.name}: tensors {a!r} and {b!r} overlap")
    data_length = spans[-1][1] if spans else 0
    expected = 8 + n + data_length
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(
            f"{path.name}: file is {size} bytes but header + data need {expected} bytes ({what}); "
            "delete it and download again"
        )
    return SafetensorsHeader(path, header, metadata, 8 + n, data_length, size)


# --------------------------------------------------------------------------------------------------------
# verification


@dataclass
class CheckpointReport:
    """Result of :func:`verify_gpt_oss_checkpoint`. ``ok`` is True when ``errors`` is empty."""

    directory: str  # the checkpoint directory that was checked (``<root>/original`` for the original format)
    fmt: str
    config: dict[str, Any] = field(default_factory=dict)  # 16-key original-style config
    mxfp4: bool = True
    files: dict[str, int] = field(default_factory=dict)  # safetensors file name -> size in bytes
    num_tensors: int = 0
    expected_num_tensors: int = 0
    tensor_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = (
            f"{self.fmt} checkpoint in {self.directory}: {self.num_tensors}/{self.expected_num_tensors} tensors, "
            f"{format_bytes(self.tensor_bytes)} in {len(self.files)} file(s)"
        )
        if self.ok:
            return head + ": OK"
        shown = "\n  ".join(self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        return f"{head}: {len(self.errors)} problem(s)\n  {shown}{more}"

    def raise_if_failed(self) -> CheckpointReport:
        if not self.ok:
            raise CheckpointVerificationError(self.summary(), self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory, "fmt": self.fmt, "ok": self.ok, "mxfp4": self.mxfp4,
            "num_tensors": self.num_tensors, "expected_num_tensors": self.expected_num_tensors,
            "tensor_bytes": self.tensor_bytes, "files": dict(self.files), "config": dict(self.config),
            "errors": list(self.errors),
        }  # fmt: skip


def checkpoint_dir(directory: str | Path, fmt: str) -> Path:
    """Where the weights of ``fmt`` live under a download root (``<root>/original`` for the original format).

    A directory that already is an ``original/`` folder (its config.json has ``num_experts``) is returned as is.
    """
    _check_fmt(fmt)
    directory = Path(directory)
    if fmt == "hf" or (directory / "original" / "config.json").is_file():
        return directory / "original" if fmt == "original" else directory
    cfg = _read_json_or_empty(directory / "config.json")
    if cfg and "num_experts" in cfg and "model_type" not in cfg:
        return directory
    return directory / "original"


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verify_gpt_oss_checkpoint(directory: str | Path, fmt: str = "original") -> CheckpointReport:
    """Check a gpt-oss checkpoint from its config.json and safetensors headers only (no tensor data read).

    ``directory`` is a download root (``original/`` is looked up inside it for ``fmt="original"``) or the
    checkpoint folder itself. Checked: config.json readable and complete; every expected tensor present once,
    nothing unexpected, shapes and dtypes as in the table derived from that config; every safetensors file
    exactly header + data long; for HF, ``model.safetensors.index.json`` (when present) maps each tensor to
    the file that holds it; for original, ``dtypes.json`` (when present) names the same tensors.
    """
    _check_fmt(fmt)
    ckpt = checkpoint_dir(directory, fmt)
    report = CheckpointReport(directory=str(ckpt), fmt=fmt)
    errors = report.errors
    if not ckpt.is_dir():
        errors.append(f"directory {ckpt} does not exist")
        return report
    cfg_path = ckpt / "config.json"
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        report.config = original_config(raw_cfg)
    except FileNotFoundError:
        errors.append(f"{cfg_path} is missing")
        return report
    except (ValueError, TypeError, AttributeError) as e:
        errors.append(f"{cfg_path} is not a usable gpt-oss config: {e}")
        return report

    # which safetensors files make up the checkpoint
    index: dict[str, str] | None = None
    if fmt == "hf" and (ckpt / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            errors.append(f"model.safetensors.index.json is unreadable: {e}")
            return report
        names = sorted(set(index.values()))
    else:
        names = sorted(p.name for p in ckpt.glob("*.safetensors"))
    if not names:
        errors.append(f"no .safetensors files in {ckpt}")
        return report

    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        path = ckpt / name
        if not path.is_file():
            errors.append(f"{name} is missing (listed in model.safetensors.index.json)")
            continue
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError) as e:
            errors.append(str(e))
            continue
        report.files[name] = header.file_size
        report.tensor_bytes += header.data_length
        for tname, info in header.tensors.items():
            if tname in found:
                errors.append(f"tensor {tname} is in both {found[tname][0]} and {name}")
            found[tname] = (name, info)
    report.num_tensors = len(found)

    if fmt == "hf":
        report.mxfp4 = (raw_cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    else:
        dtypes = _read_json_or_empty(ckpt / "dtypes.json")
        if dtypes:
            report.mxfp4 = "FP4" in dtypes.values()
        else:
            report.mxfp4 = any(n.endswith(".blocks") for n in found) or not found
    expected = expected_tensors(report.config, fmt, mxfp4=report.mxfp4)
    report.expected_num_tensors = len(expected)
    if errors and not found:
        return report

    missing = [n for n in expected if n not in found]
    unexpected = sorted(n for n in found if n not in expected)
    if missing:
        errors.append(f"{len(missing)} expected tensor(s) missing, e.g. {', '.join(missing[:5])}")
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}")
    for tname, spec in expected.items():
        if tname not in found:
            continue
        fname, info = found[tname]
        shape = tuple(info["shape"])
        if shape != spec.shape or info["dtype"] not in spec.dtypes:
            errors.append(
                f"{tname} in {fname} is {info['dtype']}{list(shape)}, expected "
                f"{'/'.join(spec.dtypes)}{list(spec.shape)}"
            )
    if index is not None:
        wrong = [n for n, (fname, _) in found.items() if index.get(n) != fname]
        not_there = [n for n in index if n not in found]
        if wrong or not_there:
            errors.append(
                f"model.safetensors.index.json disagrees with the files for {len(wrong) + len(not_there)} "
                f"tensor(s), e.g. {', '.join((wrong + not_there)[:5])}"
            )
    if fmt == "original" and (ckpt / "dtypes.json").is_file():
        dtypes = _read_json_or_empty(ckpt / "dtypes.json")
        if set(dtypes) != set(found):
            errors.append("original/dtypes.json does not list the same tensors as the safetensors files")
    return report


# --------------------------------------------------------------------------------------------------------
# download marker


def read_download_marker(directory: str | Path) -> dict[str, Any] | None:
    """The ``.download_complete.json`` content of a download directory, or None if absent or unreadable."""
    data = _read_json_or_empty(Path(directory) / MARKER_NAME)
    return data or None


def is_download_complete(directory: str | Path, fmt: str | None = None) -> bool:
    """True when a verified download (of ``fmt``, if given; any format or a dataset otherwise) is recorded."""
    marker = read_download_marker(directory)
    if marker is None:
        return False
    if marker.get("kind") == "dataset":
        return fmt is None
    formats = marker.get("formats") or {}
    return bool(formats) if fmt is None else fmt in formats


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _invalidate_marker(directory: Path, fmt: str | None) -> None:
    """Forget ``fmt`` (or everything) in the marker before touching the files it vouches for."""
    marker = read_download_marker(directory)
    path = directory / MARKER_NAME
    if marker is None:
        path.unlink(missing_ok=True)
        return
    formats = marker.get("formats") or {}
    if fmt is not None and marker.get("kind") == "model" and set(formats) - {fmt}:
        formats.pop(fmt, None)
        marker["formats"] = formats
        _write_json_atomic(path, marker)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# downloading


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


@dataclass
class DownloadResult:
    directory: Path
    repo_id: str
    commit: str
    files: list[RemoteFile]
    downloaded_bytes: int  # bytes that were missing before this run
    report: CheckpointReport | None = None
    seconds: float = 0.0


def _hub_unreachable(endpoint: str, error: BaseException) -> HubUnreachableError:
    return HubUnreachableError(
        f"cannot reach the Hugging Face Hub at {endpoint} ({type(error).__name__}: {error}). "
        "Check your internet connection, or set HF_ENDPOINT to a reachable mirror; nothing was written."
    )


def list_remote_files(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[str, list[RemoteFile]]:
    """(commit sha, files matching the patterns with their sizes) of a Hub repo; raises HubError subclasses."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=30)
        commit = info.sha
        if not commit:
            raise HubError(f"the Hub at {endpoint} returned no commit for {repo_id}")
        entries = [
            f for f in api.list_repo_tree(repo_id, repo_type=repo_type, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled) as e:
        raise _hub_unreachable(endpoint, e) from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} does not exist in {repo_id}; nothing was written") from None
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN; nothing was written"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_type} repo {repo_id} was not found at {endpoint} (or it is private: set HF_TOKEN); "
            "nothing was written"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(f"the Hub at {endpoint} answered with an error: {e}; nothing was written") from None
    except httpx2.HTTPError as e:
        raise _hub_unreachable(endpoint, e) from None
    sizes = {f.path: (f.lfs.size if f.lfs is not None else f.size) for f in entries}
    chosen = filter_repo_objects(list(sizes), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    return commit, [RemoteFile(p, int(sizes[p])) for p in sorted(chosen)]


def format_bytes(n: float) -> str:
    """Human-readable decimal size: 512 B, 1.5 KB, 13.76 GB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit in ("GB", "TB") else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(
    directory: Path, files: list[RemoteFile], free_space_fn: Callable[[Path], int] | None = None
) -> int:
    """Bytes still to download into ``directory``; raise NotEnoughDiskSpaceError if they do not fit.

    Files already present with the right size count as done (a re-run only fetches what is missing).
    """
    needed = 0
    for f in files:
        local = directory / f.path
        if not (local.is_file() and local.stat().st_size == f.size):
            needed += f.size
    where = _existing_parent(directory)
    free = (free_space_fn or _disk_free)(where)
    if needed > free:
        raise NotEnoughDiskSpaceError(
            f"not enough disk space for {directory}: {format_bytes(needed)} to download but only "
            f"{format_bytes(free)} free on the disk holding {where}. Free some space or pass --output-dir "
            "on a larger disk; nothing was written."
        )
    return needed


def _verify_listing(directory: Path, files: list[RemoteFile]) -> list[str]:
    problems = []
    for f in files:
        local = directory / f.path
        if not local.is_file():
            problems.append(f"{f.path} is missing")
        elif local.stat().st_size != f.size:
            problems.append(f"{f.path} is {local.stat().st_size} bytes, the Hub lists {f.size}")
    return problems


def _snapshot(
    repo_id: str, repo_type: str, commit: str, directory: Path, allow: list[str], token: str | None,
    endpoint: str | None, max_workers: int,
) -> None:  # fmt: skip
    import httpx2
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    endpoint = endpoint or constants.ENDPOINT
    directory.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            repo_id, repo_type=repo_type, revision=commit, local_dir=directory, allow_patterns=allow,
            ignore_patterns=IGNORE_PATTERNS, token=token, endpoint=endpoint, max_workers=max_workers,
        )  # fmt: skip
    except (httpx2.HTTPError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise HubError(
            f"download from {endpoint} stopped: {type(e).__name__}: {e}. Files finished so far are kept; "
            "run the same command again to fetch the rest."
        ) from None


def _resolve_output(output_dir: str | Path | None, default: Path) -> Path:
    return Path(output_dir).expanduser().resolve() if output_dir else default


def download_gpt_oss(
    model: str = "gpt-oss-20b",
    fmt: str = "original",
    output_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    max_workers: int = 8,
    free_space_fn: Callable[[Path], int] | None = None,
    log: Callable[[str], None] = print,
) -> DownloadResult:
    """Download ``openai/<model>`` in ``fmt`` to ``output_dir`` (default ``weights/<model>``), verify, mark done.

    Raises HubUnreachableError (nothing written), NotEnoughDiskSpaceError (nothing written), HubError
    (download failed; completed files kept for a re-run) or CheckpointVerificationError (files fetched but
    wrong; no marker). ``free_space_fn(path) -> bytes`` replaces ``shutil.disk_usage`` (tests).
    """
    _check_fmt(fmt)
    if model not in MODEL_REPOS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_REPOS)}")
    repo_id = MODEL_REPOS[model]
    directory = _resolve_output(output_dir, PROJECT_ROOT / "weights" / model)
    token = token or os.environ.get("HF_TOKEN") or None
    t0 = time.perf_counter()
    allow = ALLOW_PATTERNS[fmt]
    commit, files = list_remote_files(
        repo_id, revision=revision, allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS, token=token,
        endpoint=endpoint,
    )  # fmt: skip
    weights_prefix = "original/" if fmt == "original" else "model-"
    if not any(f.path.startswith(weights_prefix) and f.path.endswith(".safetensors") for f in files):
        raise HubError(f"{repo_id}@{commit[:12]} has no {fmt}-format safetensors files; nothing was written")
    total = sum(f.size for f in files)
    needed = check_disk_space(directory, files, free_space_fn)
    log(
        f"{repo_id} ({fmt} format) at commit {commit[:12]}: {len(files)} files, {format_bytes(total)} "
        f"({format_bytes(needed)} to fetch) -> {directory}"
    )
    if directory.exists():
        _invalidate_marker(directory, fmt)
    _snapshot(repo_id, "model", commit, directory, allow, token, endpoint, max_workers)

    problems = _verify_listing(directory, files)
    if problems:
        raise CheckpointVerificationError(
            f"download of {repo_id} is incomplete: {'; '.join(problems[:5])}. Run the same command again."
        )
    report = verify_gpt_oss_checkpoint(directory, fmt)
    if not report.ok:
        raise CheckpointVerificationError(
            f"downloaded files failed verification, so the download is not marked complete.\n{report.summary()}",
            report,
        )
    marker = read_download_marker(directory) or {}
    if marker.get("kind") != "model" or marker.get("repo_id") != repo_id:
        marker = {"kind": "model", "model": model, "repo_id": repo_id, "formats": {}}
    marker["formats"][fmt] = {
        "commit": commit,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {f.path: f.size for f in files},
        "num_tensors": report.num_tensors,
        "tensor_bytes": report.tensor_bytes,
        "checkpoint_dir": os.path.relpath(report.directory, directory),
    }
    _write_json_atomic(directory / MARKER_NAME, marker)
    return DownloadResult(directory, repo_id, commit, files, needed, report, time.perf_counter() - t0)


def download_dataset(
    name: str = "tinystories",
    output_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    max_workers: int = 8,
    free_space_fn: Callable[[Path], int] | None = None,
    log: Callable[[str], None] = print,
) -> DownloadResult:
    """Download a dataset's text files (TinyStoriesV2-GPT4 train/valid) to ``output_dir``, check sizes, mark done.

    Default directory: ``data_cache/<name>`` in the project (git-ignored).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    directory = _resolve_output(output_dir, PROJECT_ROOT / "data_cache" / name)
    token = token or os.environ.get("HF_TOKEN") or None
    t0 = time.perf_counter()
    allow = list(spec.files)
    commit, files = list_remote_files(
        spec.repo_id, repo_type="dataset", revision=revision, allow_patterns=allow, token=token, endpoint=endpoint
    )
    absent = sorted(set(spec.files) - {f.path for f in files})
    if absent:
        raise HubError(f"dataset {spec.repo_id}@{commit[:12]} has no {', '.join(absent)}; nothing was written")
    needed = check_disk_space(directory, files, free_space_fn)
    log(
        f"{spec.repo_id} at commit {commit[:12]}: {len(files)} files, "
        f"{format_bytes(sum(f.size for f in files))} ({format_bytes(needed)} to fetch) -> {directory}"
    )
    if directory.exists():
        _invalidate_marker(directory, None)
    _snapshot(spec.repo_id, "dataset", commit, directory, allow, token, endpoint, max_workers)
    problems = _verify_listing(directory, files)
    problems += [f"{f.path} is empty" for f in files if f.size == 0]
    if problems:
        raise CheckpointVerificationError(f"dataset download failed verification: {'; '.join(problems[:5])}")
    _write_json_atomic(
        directory / MARKER_NAME,
        {
            "kind": "dataset", "dataset": name, "repo_id": spec.repo_id, "commit": commit,
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": {f.path: f.size for f in files},
        },
    )  # fmt: skip
    return DownloadResult(directory, spec.repo_id, commit, files, needed, None, time.perf_counter() - t0)


def mark_verified_checkpoint(directory: str | Path, fmt: str, *, model: str | None = None) -> CheckpointReport:
    """Verify weights obtained some other way (e.g. ``hf download``) and write the marker if they pass."""
    directory = Path(directory)
    report = verify_gpt_oss_checkpoint(directory, fmt).raise_if_failed()
    marker = read_download_marker(directory) or {}
    if marker.get("kind") != "model":
        marker = {"kind": "model", "model": model, "repo_id": MODEL_REPOS.get(model or ""), "formats": {}}
    marker.setdefault("formats", {})[fmt] = {
        "commit": None,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {
            os.path.relpath(Path(report.directory) / n, directory): s for n, s in report.files.items()
        },
        "num_tensors": report.num_tensors,
        "tensor_bytes": report.tensor_bytes,
        "checkpoint_dir": os.path.relpath(report.directory, directory),
        "source": "verified local files",
    }
    _write_json_atomic(directory / MARKER_NAME, marker)
    return report


# --------------------------------------------------------------------------------------------------------
# random checkpoints with the real layout

_CHUNK_ELEMENTS = 1 << 24  # bound on values generated at once (64 MiB of fp32)
_QUANTIZE_LIMIT = 1 << 27  # "auto": quantize real random weights up to this many expert weights in total


def _seeded(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _dense_chunks(name: str, shape: tuple[int, ...], seed: int, kind: str) -> Iterator[Any]:
    """Rows (chunks along dim 0) of a BF16 tensor, reproducible per (seed, name) regardless of layout."""
    import torch

    gen = _seeded(seed, name)
    rows = shape[0]
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // per_row)
    fan_in = shape[-1] if len(shape) > 1 else 1
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = torch.randn((n, *shape[1:]), generator=gen)
        if kind == "norm":
            x = 1.0 + 0.05 * x
        elif kind == "bias":
            x = 0.02 * x
        elif kind == "embed":
            x = 0.02 * x
        elif kind == "sinks":
            x = 0.5 * x
        else:
            x = x * fan_in**-0.5
        yield x.to(torch.bfloat16)


def _expert_chunks(name: str, n_exp: int, rows: int, k: int, seed: int, how: str) -> Iterator[tuple[Any, Any]]:
    """Per expert: (weight [rows, k] bf16, None) for dense, or (blocks, scales) for MXFP4."""
    import torch

    from model.mxfp4 import quantize_mxfp4

    gen = _seeded(seed, name)
    std = k**-0.5
    # uniformly random codes have an rms of sqrt(8.5625) ~= 2.93; pick the exponent that gives ~std
    u_random = min(253, max(1, int(round(127 + math.log2(std / 2.93)))))
    for _ in range(n_exp):
        if how == "random":
            # 8 random bytes per int64 draw: ~3x faster than drawing uint8 one by one
            words = torch.randint(-(2**63), 2**63 - 1, (rows * k // 16,), dtype=torch.int64, generator=gen)
            blocks = words.view(torch.uint8).view(rows, k // 32, 16)
            scales = torch.randint(0, 3, (rows, k // 32), dtype=torch.uint8, generator=gen).add_(u_random - 1)
            yield blocks, scales
            continue
        w = torch.randn((rows, k), generator=gen) * std
        if how == "dense":
            yield w.to(torch.bfloat16), None
        else:
            yield quantize_mxfp4(w)


def _tensor_bytes(t: Any) -> memoryview:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


class _SafetensorsWriter:
    """Lays out tensors in one or more safetensors files, writes headers, then accepts data in any order."""

    def __init__(self, plan: list[tuple[str, str, TensorSpec]]) -> None:  # (file, name, spec)
        self.files: dict[str, dict[str, Any]] = {}
        self.where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute offset, nbytes)
        for fname, name, spec in plan:
            entry = self.files.setdefault(fname, {"tensors": {}, "cursor": 0})
            nbytes = math.prod(spec.shape) * DTYPE_SIZES[spec.dtype]
            start = entry["cursor"]
            offsets = [start, start + nbytes]
            entry["tensors"][name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": offsets}
            entry["cursor"] += nbytes
        self.handles: dict[str, Any] = {}

    def open(self, directory: Path) -> None:
        for fname, entry in self.files.items():
            header = {"__metadata__": {"format": "pt"}, **entry["tensors"]}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = (directory / fname).open("wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            start = 8 + len(raw)
            f.truncate(start + entry["cursor"])
            self.handles[fname] = f
            for name, info in entry["tensors"].items():
                s, e = info["data_offsets"]
                self.where[name] = (fname, start + s, e - s)

    def write(self, name: str, offset: int, tensor: Any) -> int:
        fname, base, nbytes = self.where[name]
        data = _tensor_bytes(tensor)
        if offset + len(data) > nbytes:
            raise ValueError(f"writing past the end of {name}")
        f = self.handles[fname]
        f.seek(base + offset)
        f.write(data)
        return len(data)

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def write_random_gpt_oss_checkpoint(
    directory: str | Path,
    config_dict: dict[str, Any],
    fmt: str = "original",
    seed: int = 0,
    mxfp4: bool = True,
    *,
    experts: str = "auto",
    max_shard_bytes: int = 4_800_000_000,
) -> Path:
    """Write a random gpt-oss checkpoint with the published names, dtypes and layout; return the weights dir.

    ``fmt="original"``: ``<dir>/original/{config.json (16 keys), dtypes.json, model.safetensors}`` plus the HF
    ``<dir>/config.json``, like a download root. ``fmt="hf"``: ``<dir>/config.json`` (with
    ``quantization_config`` when ``mxfp4``), ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` and ``model.safetensors.index.json``.

    Values depend only on (seed, tensor) — both layouts written with the same seed hold the same model
    (HF q/k/v are the row slices of ``qkv``; MXFP4 bytes are identical). ``experts``: "quantize" (random
    normal weights through :func:`model.mxfp4.quantize_mxfp4`, ~50 ns/weight), "random" (uniform random
    FP4 codes, fast enough for the full 20B), or "auto" (quantize when the model has at most 2**27 expert
    weights). Tensors are produced one expert / one row-chunk at a time, so memory stays bounded.
    """
    import torch

    _check_fmt(fmt)
    o = original_config(config_dict)
    n_layers, n_exp = o["num_hidden_layers"], o["num_experts"]
    d, inter, hd = o["hidden_size"], o["intermediate_size"], o["head_dim"]
    hq, hkv = o["num_attention_heads"], o["num_key_value_heads"]
    if experts not in ("auto", "quantize", "random"):
        raise ValueError(f"experts must be 'auto', 'quantize' or 'random', got {experts!r}")
    if not mxfp4:
        how = "dense"
    elif experts == "auto":
        how = "quantize" if n_layers * n_exp * 3 * inter * d <= _QUANTIZE_LIMIT else "random"
    else:
        how = experts

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(hf_config(o, mxfp4=mxfp4), indent=2) + "\n")
    spec = expected_tensors(o, fmt, mxfp4=mxfp4)
    if fmt == "original":
        out_dir = root / "original"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(o, indent=2) + "\n")
        kinds = {"blocks": "FP4", "scales": "UE8"}
        dtypes = {n: kinds.get(n.rsplit(".", 1)[-1], "BF16") for n in spec}
        (out_dir / "dtypes.json").write_text(json.dumps(dtypes) + "\n")
        plan = [("model.safetensors", n, s) for n, s in spec.items()]
    else:
        out_dir = root
        shards: list[list[tuple[str, TensorSpec]]] = [[]]
        used = 0
        for n, s in spec.items():
            nbytes = math.prod(s.shape) * DTYPE_SIZES[s.dtype]
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((n, s))
            used += nbytes
        total = len(shards)
        plan = [
            (f"model-{i + 1:05d}-of-{total:05d}.safetensors", n, s)
            for i, shard in enumerate(shards)
            for n, s in shard
        ]
        index = {
            "metadata": {"total_size": sum(math.prod(s.shape) * DTYPE_SIZES[s.dtype] for s in spec.values())},
            "weight_map": {n: f for f, n, _ in plan},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    writer = _SafetensorsWriter(plan)
    writer.open(out_dir)
    try:
        def dense(name: str, canonical: str, kind: str) -> None:
            offset = 0
            for chunk in _dense_chunks(canonical, spec[name].shape, seed, kind):
                offset += writer.write(name, offset, chunk)

        def split_rows(names: list[str], canonical: str, shape: tuple[int, ...], kind: str) -> None:
            full = torch.cat(list(_dense_chunks(canonical, shape, seed, kind)))
            start = 0
            for name in names:
                rows = spec[name].shape[0]
                writer.write(name, 0, full[start : start + rows])
                start += rows

        def experts_of(canonical: str, names: tuple[str, str] | str, rows: int, k: int) -> None:
            off_a = off_b = 0
            for a, b in _expert_chunks(canonical, n_exp, rows, k, seed, how):
                if b is None:  # dense: HF stores experts as in x out
                    a = a if fmt == "original" else a.t()
                    off_a += writer.write(names, off_a, a)  # type: ignore[arg-type]
                else:
                    off_a += writer.write(names[0], off_a, a)
                    off_b += writer.write(names[1], off_b, b)

        qkv_rows = (hq + 2 * hkv) * hd
        if fmt == "original":
            dense("embedding.weight", "embedding.weight", "embed")
        else:
            dense("model.embed_tokens.weight", "embedding.weight", "embed")
        for i in range(n_layers):
            c = f"block.{i}."
            if fmt == "original":
                names = {
                    "attn.norm.scale": "norm", "attn.qkv.weight": "w", "attn.qkv.bias": "bias",
                    "attn.sinks": "sinks", "attn.out.weight": "w", "attn.out.bias": "bias",
                    "mlp.norm.scale": "norm", "mlp.gate.weight": "w", "mlp.gate.bias": "bias",
                    "mlp.mlp1_bias": "bias", "mlp.mlp2_bias": "bias",
                }  # fmt: skip
                for n, kind in names.items():
                    dense(c + n, c + n, kind)
                for w, rows, k in (("mlp1", 2 * inter, d), ("mlp2", d, inter)):
                    base = c + f"mlp.{w}_weight"
                    experts_of(base, (base + ".blocks", base + ".scales") if mxfp4 else base, rows, k)
            else:
                h = f"model.layers.{i}."
                a = h + "self_attn."
                split_rows([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], c + "attn.qkv.weight",
                           (qkv_rows, d), "w")  # fmt: skip
                split_rows([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], c + "attn.qkv.bias",
                           (qkv_rows,), "bias")  # fmt: skip
                pairs = {
                    h + "input_layernorm.weight": (c + "attn.norm.scale", "norm"),
                    a + "sinks": (c + "attn.sinks", "sinks"),
                    a + "o_proj.weight": (c + "attn.out.weight", "w"),
                    a + "o_proj.bias": (c + "attn.out.bias", "bias"),
                    h + "post_attention_layernorm.weight": (c + "mlp.norm.scale", "norm"),
                    h + "mlp.router.weight": (c + "mlp.gate.weight", "w"),
                    h + "mlp.router.bias": (c + "mlp.gate.bias", "bias"),
                    h + "mlp.experts.gate_up_proj_bias": (c + "mlp.mlp1_bias", "bias"),
                    h + "mlp.experts.down_proj_bias": (c + "mlp.mlp2_bias", "bias"),
                }
                for n, (canonical, kind) in pairs.items():
                    dense(n, canonical, kind)
                e = h + "mlp.experts."
                for w, canon, rows, k in (("gate_up_proj", "mlp1", 2 * inter, d), ("down_proj", "mlp2", d, inter)):
                    tgt = (e + f"{w}_blocks", e + f"{w}_scales") if mxfp4 else e + w
                    experts_of(c + f"mlp.{canon}_weight", tgt, rows, k)
        final = ("norm.scale", "unembedding.weight") if fmt == "original" else ("model.norm.weight", "lm_head.weight")
        dense(final[0], "norm.scale", "norm")
        dense(final[1], "unembedding.weight", "embed")
    finally:
        writer.close()
    return out_dir
