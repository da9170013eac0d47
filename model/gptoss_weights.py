"""Reading OpenAI's published gpt-oss checkpoints (spec sections 2.2-2.5) into `Transformer`.

Both layouts are memory-mapped: tensors are views of the files until used. Experts stored as MXFP4 either stay
packed (`PackedExperts`: each expert decoded when a token routes to it, decoded experts kept in an LRU cache under
a byte budget) or are decoded once at load time (`experts="dense"`, for small checkpoints and big GPUs).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections import OrderedDict
from pathlib import Path
from threading import Lock

import torch
from torch import nn

from .checkpoint import _ST_DTYPES, CheckpointError, read_safetensors_header
from .config import ModelConfig
from .layers import swiglu
from .mxfp4 import dequantize_mxfp4

# ---- config ------------------------------------------------------------------------------------------------


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers GptOss config.json (4.x `rope_scaling` or 5.x `rope_parameters`)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope and rope.get("rope_type", "yarn") != "yarn":
        raise CheckpointError(f"{source}: rope type {rope.get('rope_type')!r} is not gpt-oss's YaRN")
    n = d["num_hidden_layers"]
    window = d.get("sliding_window") or 0
    types = d.get("layer_types")
    if types is not None:
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if types != expected:
            raise CheckpointError(f"{source}: layer_types must alternate sliding/full starting with sliding "
                                  "(gpt-oss); other patterns are not supported")
    return ModelConfig(
        arch="gptoss", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=n,
        num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
        head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
        num_experts=d.get("num_local_experts", d.get("num_experts")),
        experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token")),
        intermediate_size=d["intermediate_size"], swiglu_limit=d.get("swiglu_limit", 7.0), sliding_window=window,
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 150000.0)),
        rope_scaling_factor=rope.get("factor", 1.0), rope_ntk_alpha=rope.get("beta_slow", 1.0),
        rope_ntk_beta=rope.get("beta_fast", 32.0),
        initial_context_length=rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096)),
        max_context=d.get("max_position_embeddings", 131072), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        extra={"source_format": "hf"})


def config_from_original(d: dict) -> ModelConfig:
    """ModelConfig from `original/config.json` (exactly the reference's 16 fields)."""
    return ModelConfig(
        arch="gptoss", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"], head_dim=d["head_dim"], num_experts=d["num_experts"],
        experts_per_token=d["experts_per_token"], intermediate_size=d["intermediate_size"],
        swiglu_limit=d.get("swiglu_limit", 7.0), sliding_window=d["sliding_window"], rope_theta=d["rope_theta"],
        rope_scaling_factor=d["rope_scaling_factor"], rope_ntk_alpha=d["rope_ntk_alpha"],
        rope_ntk_beta=d["rope_ntk_beta"], initial_context_length=d["initial_context_length"],
        max_context=d["initial_context_length"] * int(d["rope_scaling_factor"]), extra={"source_format": "original"})


# ---- memory-mapped safetensors ------------------------------------------------------------------------------
class MappedSafetensors:
    """Zero-copy tensors over a safetensors file (copy-on-write mapping: pages are read on first touch)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        parsed = read_safetensors_header(self.path)
        self.header, self._start = parsed.tensors, parsed.data_start
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        count = (b - a) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + a)
        return t.view(info["shape"])


def _open_dir(directory: Path) -> dict[str, tuple[MappedSafetensors, str]]:
    """name -> (file, name) over every safetensors file of a directory (sharded or not)."""
    index = directory / "model.safetensors.index.json"
    files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()}) \
        if index.exists() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory}")
    table: dict[str, tuple[MappedSafetensors, str]] = {}
    for f in files:
        st = MappedSafetensors(f)
        for k in st.keys():
            table[k] = (st, k)
    return table


# ---- name mapping -------------------------------------------------------------------------------------------
_HF_RENAMES = [
    (r"model\.embed_tokens\.weight", "embedding.weight"),
    (r"model\.norm\.weight", "norm.scale"),
    (r"lm_head\.weight", "unembedding.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"block.\1.attn.norm.scale"),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", r"block.\1.attn.sinks"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"block.\1.attn.out.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"block.\1.mlp.norm.scale"),
    (r"model\.layers\.(\d+)\.mlp\.router\.(weight|bias)", r"block.\1.mlp.gate.\2"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj_bias", r"block.\1.mlp.experts.mlp1_bias"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj_bias", r"block.\1.mlp.experts.mlp2_bias"),
]
_ORIG_RENAMES = [
    (r"block\.(\d+)\.mlp\.mlp1_bias", r"block.\1.mlp.experts.mlp1_bias"),
    (r"block\.(\d+)\.mlp\.mlp2_bias", r"block.\1.mlp.experts.mlp2_bias"),
]


class _Source:
    """Uniform access to one layout: plain tensors under our names, and experts as packed or plain tensors."""

    def __init__(self, directory: Path, fmt: str):
        self.dir, self.fmt = directory, fmt
        self.table = _open_dir(directory)
        self.used: set[str] = set()

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.table:
            raise CheckpointError(f"{self.dir}: missing tensor {name}")
        self.used.add(name)
        st, key = self.table[name]
        return st.get(key)

    def plain(self) -> dict[str, torch.Tensor]:
        """Every non-expert-weight tensor under our names (qkv fused for HF)."""
        out: dict[str, torch.Tensor] = {}
        renames = _HF_RENAMES if self.fmt == "hf" else _ORIG_RENAMES
        for name in self.table:
            if re.search(r"(mlp1_weight|mlp2_weight|gate_up_proj|down_proj)(_blocks|_scales|\.blocks|\.scales)?$",
                         name) and not name.endswith("_bias"):
                continue
            if self.fmt == "hf" and re.search(r"self_attn\.[qkv]_proj", name):
                continue
            new = name
            for pat, rep in renames:
                if re.fullmatch(pat, name):
                    new = re.sub(pat, rep, name)
                    break
            out[new] = self.raw(name)
        if self.fmt == "hf":
            n = 1 + max(int(m.group(1)) for k in self.table if (m := re.match(r"model\.layers\.(\d+)\.", k)))
            for i in range(n):
                for kind in ("weight", "bias"):
                    parts = [self.raw(f"model.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                    out[f"block.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
        return out

    def expert(self, layer: int, which: str):
        """('packed', blocks, scales) or ('plain', weight in our out x in layout) for mlp1/mlp2 of a layer."""
        if self.fmt == "hf":
            base = f"model.layers.{layer}.mlp.experts.{'gate_up_proj' if which == 'mlp1' else 'down_proj'}"
            if base + "_blocks" in self.table:
                return "packed", self.raw(base + "_blocks"), self.raw(base + "_scales")
            return "plain", self.raw(base).transpose(1, 2)  # HF stores [E, in, out]
        base = f"block.{layer}.mlp.{which}_weight"
        if base + ".blocks" in self.table:
            return "packed", self.raw(base + ".blocks"), self.raw(base + ".scales")
        return "plain", self.raw(base)


# ---- packed experts -----------------------------------------------------------------------------------------
class DecodedExpertCache:
    """LRU of decoded experts shared by all layers, bounded in bytes. A budget of 0 stores nothing."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self.hits = self.misses = 0
        self.kernel_calls = 0  # expert evaluations done from packed bytes by the native kernel (no cache use)
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple, make):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return item
        self.misses += 1
        item = make()
        size = sum(t.numel() * t.element_size() for t in item)
        if size <= self.budget:
            with self._lock:
                while self.used + size > self.budget and self._items:
                    _, old = self._items.popitem(last=False)
                    self.used -= sum(t.numel() * t.element_size() for t in old)
                self._items[key] = item
                self.used += size
        return item

    def peek(self, key: tuple):
        """The cached item (counted as a hit and marked recently used) or None; never decodes."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return item

    def clear(self) -> None:
        """Drop every decoded expert (their device changed: `PackedExperts` moved with `Module.to`)."""
        with self._lock:
            self._items.clear()
            self.used = 0

    def stats(self) -> dict:
        return {"budget_bytes": self.budget, "used_bytes": self.used, "entries": len(self._items),
                "hits": self.hits, "misses": self.misses, "kernel_calls": self.kernel_calls}


# Up to this many tokens per expert the MXFP4 kernel computes straight from the packed bytes; above it the expert
# is decoded once (through the LRU cache) and run as a bf16/fp32 matmul, which amortises the decode over the chunk.
# Measured on 2 shared cores: kernel ~0.06 ns/weight/token at C=16; decode (~0.5-1 ns/weight) + bf16 matmul wins
# beyond that. At C == 1 the kernel (0.53 bytes/weight read) also beats a cached bf16 copy (2 bytes/weight).
KERNEL_MAX_TOKENS = 16


class PackedExperts(nn.Module):
    """Experts kept MXFP4-packed (memory-mapped); same call as `layers.Experts`.

    forward(x [n, C, D], expert_ids [n]) runs each selected expert on its C tokens. On CPU with the native kernel
    (model/kernels) and C <= KERNEL_MAX_TOKENS the experts are computed directly from the packed bytes (no
    decoded copy is made): always for C == 1 (a decode step), and for 1 < C <= KERNEL_MAX_TOKENS for experts
    that are not already in the LRU cache (cached ones run as a matmul on the decoded weights). Larger groups
    (prefill) decode each expert once, through the shared LRU cache, and run a matmul. Calling it without
    expert_ids means all E experts. On a GPU the packed bytes are moved to the device and decoded there."""

    def __init__(self, layer: int, cfg: ModelConfig, mlp1, mlp2, mlp1_bias, mlp2_bias, cache: DecodedExpertCache,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.layer, self.limit, self.dtype, self.dev = layer, cfg.swiglu_limit, dtype, torch.device(device)
        self.num_experts = cfg.num_experts
        on_cpu = self.dev.type == "cpu"
        # On CPU the packed bytes stay memory-mapped views of the checkpoint; elsewhere they are copied over once.
        self.mlp1_blocks, self.mlp1_scales = (t if on_cpu else t.to(self.dev) for t in mlp1)
        self.mlp2_blocks, self.mlp2_scales = (t if on_cpu else t.to(self.dev) for t in mlp2)
        self.register_buffer("mlp1_bias", mlp1_bias.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("mlp2_bias", mlp2_bias.to(device=device, dtype=dtype), persistent=False)
        self.cache = cache
        self._bias_f32: tuple[torch.Tensor, torch.Tensor] | None = None
        self.use_kernel = on_cpu  # the kernel is looked up (and built) on first use

    def _apply(self, fn, recurse=True):
        """`Module.to/.cuda/.cpu` also move the packed bytes (plain attributes, kept out of the state dict), so a
        model loaded on one device and moved to another does not mix devices in `_matmul`. Decoded experts
        cached on the old device are dropped."""
        super()._apply(fn, recurse)
        packed = (self.mlp1_blocks, self.mlp1_scales, self.mlp2_blocks, self.mlp2_scales)
        self.mlp1_blocks, self.mlp1_scales, self.mlp2_blocks, self.mlp2_scales = (fn(t) for t in packed)
        self._bias_f32 = None
        dev = self.mlp1_bias.device
        if dev != self.dev:
            self.dev, self.use_kernel = dev, dev.type == "cpu"
            self.cache.clear()
        return self

    def _decode(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        def make():
            k = _kernel() if self.dtype == torch.bfloat16 and self.mlp1_blocks.device.type == "cpu" else None
            if k is not None:  # bit-identical to dequantize_mxfp4, ~10x faster
                w1 = k.decode_bf16(self.mlp1_blocks[e], self.mlp1_scales[e])
                w2 = k.decode_bf16(self.mlp2_blocks[e], self.mlp2_scales[e])
            else:
                w1 = dequantize_mxfp4(self.mlp1_blocks[e], self.mlp1_scales[e], self.dtype)
                w2 = dequantize_mxfp4(self.mlp2_blocks[e], self.mlp2_scales[e], self.dtype)
            return w1.to(self.dev), w2.to(self.dev)

        return self.cache.get((self.layer, e), make)

    def _run_kernel(self, kernel, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self._bias_f32 is None:
            self._bias_f32 = (self.mlp1_bias.float().contiguous(), self.mlp2_bias.float().contiguous())
        b1, b2 = self._bias_f32
        out = kernel.experts(x.float().contiguous(), ids, self.mlp1_blocks, self.mlp1_scales, b1,
                             self.mlp2_blocks, self.mlp2_scales, b2, self.limit)
        self.cache.kernel_calls += ids.numel()
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        n, C = x.shape[0], x.shape[1]
        ids = list(range(self.num_experts)) if expert_ids is None else expert_ids.tolist()
        out = torch.empty_like(x)
        todo = list(range(n))  # positions i in ids still to compute
        kernel = _kernel() if self.use_kernel and x.device.type == "cpu" and C <= KERNEL_MAX_TOKENS else None
        if kernel is not None:
            if C > 1:  # a decoded copy already in the cache is as fast as the kernel for several tokens
                cached = [i for i in todo if self.cache.peek((self.layer, ids[i])) is not None]
                for i in cached:
                    out[i] = self._matmul(x[i], ids[i])
                todo = [i for i in todo if i not in set(cached)]
            if todo:
                sel = torch.tensor(todo)
                out[sel] = self._run_kernel(kernel, x[sel], torch.tensor([ids[i] for i in todo]))
            return out
        for i in todo:
            out[i] = self._matmul(x[i], ids[i])
        return out

    def _matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on x [C, D] with its decoded weights (from the cache, decoded now on a miss)."""
        w1, w2 = self._decode(e)
        h = torch.addmm(self.mlp1_bias[e].to(x.dtype), x, w1.t().to(x.dtype))
        return torch.addmm(self.mlp2_bias[e].to(x.dtype), swiglu(h, self.limit), w2.t().to(x.dtype))


def _kernel():
    from .kernels import mxfp4_kernel

    return mxfp4_kernel()


# ---- memory planning ----------------------------------------------------------------------------------------
GiB = 1 << 30
DEFAULT_EXPERT_CACHE_BYTES = 2 * GiB
CACHE_ENV = "STORYFORGE_EXPERT_CACHE_GB"
SKIP_CHECK_ENV = "STORYFORGE_SKIP_MEMORY_CHECK"
RUNTIME_OVERHEAD_BYTES = GiB // 2  # activations, logits, KV cache of a few thousand tokens, allocator slack


class InsufficientMemoryError(CheckpointError, MemoryError):
    """Loading would need more memory than is available; raised before anything big is read."""


def expert_cache_bytes_from_env(default: int = DEFAULT_EXPERT_CACHE_BYTES) -> int:
    """The decoded-expert cache budget: $STORYFORGE_EXPERT_CACHE_GB (GiB, may be fractional) or `default`."""
    raw = os.environ.get(CACHE_ENV)
    if raw is None or raw.strip() == "":
        return default
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"{CACHE_ENV}={raw!r} is not a number of GiB (e.g. 2 or 0.5)") from None
    if gb < 0:
        raise ValueError(f"{CACHE_ENV} must be >= 0, got {raw}")
    return int(gb * GiB)


def _checkpoint_bytes(src: _Source) -> tuple[int, int]:
    """(bytes of packed expert tensors, bytes of everything else) stored in a checkpoint, from the headers."""
    packed = other = 0
    for name, (st, key) in src.table.items():
        a, b = st.header[key]["data_offsets"]
        if re.search(r"(_blocks|_scales|\.blocks|\.scales)$", name):
            packed += b - a
        else:
            other += b - a
    return packed, other


def estimate_load_memory(path: str | Path, fmt: str, expert_cache_bytes: int | None = None,
                         experts: str = "packed", dtype: torch.dtype | None = None) -> int:
    """Bytes of RAM a loaded model needs resident: the dense weights (zero-copy mmap views when stored as bf16 and
    loaded as bf16, copies otherwise), the packed experts (memory-mapped, all touched over a long generation),
    the decoded-expert cache budget, and a fixed runtime overhead. With experts="dense" the experts are counted
    decoded instead (3 x D x I weights per expert in `dtype`)."""
    path = Path(path)
    if fmt == "original" and (path / "original" / "config.json").exists():
        path = path / "original"
    src = _Source(path, fmt)
    packed, other = _checkpoint_bytes(src)
    dtype = dtype or torch.bfloat16
    dense = other if dtype == torch.bfloat16 else other * torch.empty((), dtype=dtype).element_size() // 2
    if experts == "dense" and packed:
        cfg_d = json.loads((path / "config.json").read_text())
        cfg = config_from_hf(cfg_d) if fmt == "hf" else config_from_original(cfg_d)
        E, D, I, L = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        return dense + L * E * 3 * D * I * torch.empty((), dtype=dtype).element_size() + RUNTIME_OVERHEAD_BYTES
    cache = expert_cache_bytes_from_env() if expert_cache_bytes is None else expert_cache_bytes
    return dense + packed + (cache if packed else 0) + RUNTIME_OVERHEAD_BYTES


def free_memory_bytes(device: str | torch.device) -> int:
    """Memory free for a model on `device`: that GPU's free memory for CUDA, available RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(needed: int, expert_cache_bytes: int, available: int | None = None, where: str = "RAM") -> None:
    """Raise InsufficientMemoryError when `needed` bytes exceed `available` (default: available RAM, psutil's
    `available`; `where` names the memory in the message, e.g. "GPU memory")."""
    if os.environ.get(SKIP_CHECK_ENV, "").lower() in ("1", "true", "yes"):
        return
    if available is None:
        available = free_memory_bytes("cpu")
    if needed > available:
        raise InsufficientMemoryError(
            f"loading this model needs ~{needed / GiB:.1f} GiB of {where}, {available / GiB:.1f} GiB available "
            f"(the decoded-expert cache is {expert_cache_bytes / GiB:.1f} GiB of that); close other programs "
            f"or lower --expert-cache-gb / ${CACHE_ENV}. Set {SKIP_CHECK_ENV}=1 to load anyway.")


# ---- loading ------------------------------------------------------------------------------------------------
def load_gpt_oss(path: Path, fmt: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 experts: str = "auto", expert_cache_bytes: int | None = None, check_available_memory: bool = True):
    """Build a Transformer from an HF-layout directory or a directory holding (or being) `original/`.

    experts: "dense" decodes every expert at load; "packed" keeps MXFP4 experts packed (memory-mapped) with an
    LRU of decoded experts (`expert_cache_bytes`; default $STORYFORGE_EXPERT_CACHE_GB or 2 GiB); "auto" picks
    packed when the decoded experts would not fit comfortably in available memory. Before anything big is read,
    the memory the model will need (`estimate_load_memory`) is compared with available RAM on CPU and
    InsufficientMemoryError is raised when it does not fit (on CUDA: against free GPU memory, where the
    weights, packed experts and decoded-expert cache live; `check_available_memory=False` or
    $STORYFORGE_SKIP_MEMORY_CHECK=1 skips that)."""
    from .gptoss import Transformer

    dtype = dtype or torch.bfloat16
    device = torch.device(device)
    if fmt == "original" and (path / "original" / "config.json").exists():
        path = path / "original"
    cfg_d = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(cfg_d, str(path / "config.json")) if fmt == "hf" else config_from_original(cfg_d)
    src = _Source(path, fmt)
    cache_bytes = expert_cache_bytes_from_env() if expert_cache_bytes is None else int(expert_cache_bytes)
    if cache_bytes < 0:
        raise ValueError(f"expert_cache_bytes must be >= 0, got {cache_bytes}")

    with torch.device("meta"):
        model = Transformer(cfg)
    packed_any = src.expert(0, "mlp1")[0] == "packed"
    if experts == "auto":
        experts = "dense"
        if packed_any:
            E, D, I, L = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
            decoded = L * E * 3 * D * I * torch.empty((), dtype=dtype).element_size()
            if decoded > 0.5 * free_memory_bytes(device):
                experts = "packed"
    if check_available_memory and device.type in ("cpu", "cuda"):
        on_gpu = device.type == "cuda"
        check_memory(estimate_load_memory(path, fmt, cache_bytes, experts, dtype), cache_bytes,
                     available=free_memory_bytes(device) if on_gpu else None, where="GPU memory" if on_gpu else "RAM")
    plain = src.plain()
    cache = DecodedExpertCache(cache_bytes)

    state = model.state_dict()
    expected = {k for k in state if ".mlp.experts.mlp1_weight" not in k and ".mlp.experts.mlp2_weight" not in k}
    missing, unexpected = sorted(expected - set(plain)), sorted(set(plain) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    for k, t in plain.items():
        if tuple(t.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(state[k].shape)}")

    # Every parameter is replaced below, so the empty tensors are never touched. On a GPU they are staged on the
    # CPU (virtual memory only): to_empty on the GPU would allocate the whole model in fp32 there, dense experts
    # included (~84 GB for gpt-oss-20b), and run out of memory before a single weight is read.
    model = model.to_empty(device=device if device.type in ("cpu", "meta") else torch.device("cpu"))
    from .layers import RotaryEmbedding

    model.rope = RotaryEmbedding(cfg, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in plain:  # .to() returns the mapped view itself when dtype and device already match
                want = torch.float32 if name.endswith("norm.scale") else dtype
                p.data = plain[name].to(device=device, dtype=want)
        for i, blk in enumerate(model.block):
            m1, m2 = src.expert(i, "mlp1"), src.expert(i, "mlp2")
            E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
            for which, got, shape in (("mlp1", m1, (E, 2 * I, D)), ("mlp2", m2, (E, D, I))):
                dec_shape = (*got[1].shape[:-2], got[1].shape[-2] * 32) if got[0] == "packed" else tuple(got[1].shape)
                if tuple(dec_shape) != shape:
                    raise CheckpointError(f"{path}: layer {i} {which} experts decode to {tuple(dec_shape)}, "
                                          f"expected {shape}")
            if experts == "packed" and m1[0] == "packed" and m2[0] == "packed":
                blk.mlp.experts = PackedExperts(
                    i, cfg, (m1[1], m1[2]), (m2[1], m2[2]), plain[f"block.{i}.mlp.experts.mlp1_bias"],
                    plain[f"block.{i}.mlp.experts.mlp2_bias"], cache, dtype, device)
                continue
            ex = blk.mlp.experts
            # Decode where the weights will live: on a GPU only the packed bytes cross the bus, and the
            # gathers run there (on CPU `.to(device)` is the memory-mapped view itself, no copy).
            w1 = dequantize_mxfp4(m1[1].to(device), m1[2].to(device), dtype) if m1[0] == "packed" else m1[1]
            w2 = dequantize_mxfp4(m2[1].to(device), m2[2].to(device), dtype) if m2[0] == "packed" else m2[1]
            ex.mlp1_weight.data = w1.to(device=device, dtype=dtype).contiguous()
            ex.mlp2_weight.data = w2.to(device=device, dtype=dtype).contiguous()
    model.expert_cache = cache
    model.config.extra["checkpoint_path"] = str(path)
    return model.eval()


# ---- export to transformers' layout --------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig) -> dict:
    """transformers GptOssConfig kwargs for one of our GPT-OSS configs (YaRN with truncate False, eager attention)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, sliding_window=cfg.sliding_window, rms_norm_eps=cfg.rms_norm_eps,
        swiglu_limit=cfg.swiglu_limit, tie_word_embeddings=False, max_position_embeddings=cfg.max_context,
        layer_types=["sliding_attention" if cfg.layer_window(i) else "full_attention"
                     for i in range(cfg.num_hidden_layers)],
        rope_parameters={"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                         "beta_fast": cfg.rope_ntk_beta, "beta_slow": cfg.rope_ntk_alpha, "truncate": False,
                         "original_max_position_embeddings": cfg.initial_context_length},
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our Transformer's weights under transformers' GptOss names and layouts (experts as [E, in, out])."""
    cfg = model.config
    sd = model.state_dict()
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embedding.weight"], "model.norm.weight": sd["norm.scale"],
           "lm_head.weight": sd["unembedding.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"block.{i}."
        out[p + "input_layernorm.weight"] = sd[o + "attn.norm.scale"]
        for kind in ("weight", "bias"):
            w = sd[o + f"attn.qkv.{kind}"]
            out[p + f"self_attn.q_proj.{kind}"] = w[:q]
            out[p + f"self_attn.k_proj.{kind}"] = w[q:q + kv]
            out[p + f"self_attn.v_proj.{kind}"] = w[q + kv:]
            out[p + f"self_attn.o_proj.{kind}"] = sd[o + f"attn.out.{kind}"]
            out[p + f"mlp.router.{kind}"] = sd[o + f"mlp.gate.{kind}"]
        out[p + "self_attn.sinks"] = sd[o + "attn.sinks"]
        out[p + "post_attention_layernorm.weight"] = sd[o + "mlp.norm.scale"]
        out[p + "mlp.experts.gate_up_proj"] = sd[o + "mlp.experts.mlp1_weight"].transpose(1, 2)
        out[p + "mlp.experts.gate_up_proj_bias"] = sd[o + "mlp.experts.mlp1_bias"]
        out[p + "mlp.experts.down_proj"] = sd[o + "mlp.experts.mlp2_weight"].transpose(1, 2)
        out[p + "mlp.experts.down_proj_bias"] = sd[o + "mlp.experts.mlp2_bias"]
    return {k: v.contiguous() for k, v in out.items()}


def to_transformers(model):
    """A transformers GptOssForCausalLM (eager attention, fp32) holding exactly our model's weights.
    Needs the dev dependency `transformers`; used by parity tests and benchmarks."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf = GptOssForCausalLM(GptOssConfig(**hf_config_dict(model.config), attn_implementation="eager"))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()
