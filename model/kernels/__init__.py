"""Native CPU kernels, compiled on first use with the system C++ compiler and loaded through ctypes.

`mxfp4_kernel()` returns an `Mxfp4Kernel` (or None when it cannot be built: no compiler, a failed build, or
`STORYFORGE_MXFP4_KERNEL=0`), in which case callers fall back to the pure-torch path; the reason is logged
once. The library is built with ``g++ -O3 -march=native`` into a cache directory
(``$STORYFORGE_KERNEL_CACHE`` or ``~/.cache/storyforge/kernels``) keyed by the source, the flags and the CPU's
feature flags, so a build takes ~2 s once per machine. No torch headers, no ninja: the functions take raw
pointers of contiguous tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from threading import Lock

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mxfp4_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17"]

_lock = Lock()
_loaded: Mxfp4Kernel | None = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    env = os.environ.get("STORYFORGE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "storyforge" / "kernels"


def _build() -> Path:
    """Compile the library (or reuse a cached build) and return its path; raises RuntimeError on failure."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"mxfp4_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


class Mxfp4Kernel:
    """ctypes wrapper; every method checks dtypes/contiguity so a wrong call raises instead of crashing."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        P, i, f, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_longlong
        self.lib.mxfp4_linear.argtypes = [P, i, i, P, P, P, i, P, i]
        self.lib.mxfp4_experts.argtypes = [P, i, i, i, i, P, P, P, P, P, P, P, f, f, P, P, P, i]
        self.lib.mxfp4_decode_bf16.argtypes = [P, P, ll, P, i]
        self.avx2 = bool(self.lib.mxfp4_has_avx2())

    @staticmethod
    def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {t.dtype} "
                             f"(contiguous={t.is_contiguous()}, device={t.device})")

    def linear(self, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] fp32, blocks [R, K/32, 16], scales [R, K/32], bias [R] fp32 -> [M, R] fp32."""
        M, K = x.shape
        R = blocks.shape[0]
        self._check("x", x, torch.float32)
        self._check("blocks", blocks, torch.uint8)
        self._check("scales", scales, torch.uint8)
        if tuple(blocks.shape) != (R, K // 32, 16) or tuple(scales.shape) != (R, K // 32) or K % 32:
            raise ValueError(f"shapes do not match: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}, "
                             f"scales {tuple(scales.shape)}")
        if bias is not None:
            self._check("bias", bias, torch.float32)
        y = torch.empty(M, R, dtype=torch.float32)
        self.lib.mxfp4_linear(_ptr(x), M, K, _ptr(blocks), _ptr(scales), _ptr(bias), R, _ptr(y),
                              torch.get_num_threads())
        return y

    def experts(self, x: torch.Tensor, ids: torch.Tensor, b1: torch.Tensor, s1: torch.Tensor, bias1: torch.Tensor,
                b2: torch.Tensor, s2: torch.Tensor, bias2: torch.Tensor, limit: float,
                alpha: float = 1.702) -> torch.Tensor:
        """gpt-oss experts straight from MXFP4: x [n, C, D] fp32 for experts ids [n] -> [n, C, D] fp32.
        b1 [E, 2I, D/32, 16], s1 [E, 2I, D/32], bias1 [E, 2I] fp32; b2 [E, D, I/32, 16], s2, bias2 [E, D]."""
        n, C, D = x.shape
        E, R1 = b1.shape[0], b1.shape[1]
        I = R1 // 2
        self._check("x", x, torch.float32)
        for name, t, dt in (("mlp1 blocks", b1, torch.uint8), ("mlp1 scales", s1, torch.uint8),
                            ("mlp2 blocks", b2, torch.uint8), ("mlp2 scales", s2, torch.uint8),
                            ("mlp1 bias", bias1, torch.float32), ("mlp2 bias", bias2, torch.float32)):
            self._check(name, t, dt)
        if (tuple(b1.shape) != (E, R1, D // 32, 16) or tuple(b2.shape) != (E, D, I // 32, 16)
                or tuple(s1.shape) != (E, R1, D // 32) or tuple(s2.shape) != (E, D, I // 32)
                or tuple(bias1.shape) != (E, R1) or tuple(bias2.shape) != (E, D) or D % 32 or I % 32):
            raise ValueError("MXFP4 expert tensors do not match x's hidden size")
        ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
        if ids.numel() != n or (n and (int(ids.min()) < 0 or int(ids.max()) >= E)):
            raise IndexError(f"expert ids must be {n} values in [0, {E})")
        h = torch.empty(n, C, R1, dtype=torch.float32)
        a = torch.empty(n, C, I, dtype=torch.float32)
        out = torch.empty(n, C, D, dtype=torch.float32)
        self.lib.mxfp4_experts(_ptr(x), n, C, D, I, _ptr(ids), _ptr(b1), _ptr(s1), _ptr(bias1), _ptr(b2),
                               _ptr(s2), _ptr(bias2), float(limit), float(alpha), _ptr(h), _ptr(a), _ptr(out),
                               torch.get_num_threads())
        return out

    def decode_bf16(self, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Bit-identical to `model.mxfp4.dequantize_mxfp4(blocks, scales, torch.bfloat16)`, ~10x faster."""
        self._check("blocks", blocks, torch.uint8)
        self._check("scales", scales, torch.uint8)
        if blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
            raise ValueError(f"blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} are not MXFP4")
        out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=torch.bfloat16)
        self.lib.mxfp4_decode_bf16(_ptr(blocks), _ptr(scales), scales.numel(), _ptr(out), torch.get_num_threads())
        return out


def mxfp4_kernel() -> Mxfp4Kernel | None:
    """The compiled kernel, or None (reason logged once) when disabled or impossible to build."""
    global _loaded, _failed
    if os.environ.get("STORYFORGE_MXFP4_KERNEL", "1").lower() in ("0", "false", "no", "off"):
        return None
    if _loaded is not None or _failed is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failed is None:
            try:
                _loaded = Mxfp4Kernel(_build())
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _failed = str(e)
                log.warning("MXFP4 CPU kernel unavailable, using the slower pure-torch expert path: %s", e)
    return _loaded
