"""Small native kernels for CPU decode steps (x86-64 with AVX2 and FMA): y = x W^T + b for a few rows x, and a
LoRA layer's product with its adapters' term (x A^T) B^T in the same pass.

A decode step multiplies every weight matrix by a handful of rows (one per answer): a matrix-vector product bound
by reading the weights once, which MKL's GEMM runs far below memory speed. The kernel reads each weight row once
and keeps the few input rows in L1; a LoRA layer is one call (x A^T, then the product with the adapters' term in
the same accumulators) instead of a product and two tiny MKL products. It is compiled once with the system C
compiler into the cache folder and loaded with ctypes. Where there is no compiler, no AVX2/FMA, or the compiled
kernel disagrees with torch on a check product, `skinny_kernel()` returns None and callers use torch; so does a
cache folder or cached library that fails native_cache.py's owner, mode and SHA-256 checks.
RLHF_MAGIC_NATIVE=0 turns it off. Figures: bench/README.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .native_cache import load_library

log = logging.getLogger(__name__)

MAX_ROWS = 12  # above this MKL's GEMM is as fast

SOURCE = r"""
#include <immintrin.h>
static inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo);
}
/* acc[b] (b < nb <= 8) += the 8-lane products of w [n] and the rows xb + b * stride, for the n8 = n - n % 8 first
   elements (the caller adds the tail) */
static inline void lanes(__m256* acc, const float* w, const float* xb, long stride, long n8, long nb) {
  if (nb == 8) {
    for (long k = 0; k < n8; k += 8) {
      __m256 wv = _mm256_loadu_ps(w + k);
      #pragma GCC unroll 8
      for (int b = 0; b < 8; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + b * stride + k), acc[b]);
    }
  } else {
    for (long k = 0; k < n8; k += 8) {
      __m256 wv = _mm256_loadu_ps(w + k);
      for (int b = 0; b < nb; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + b * stride + k), acc[b]);
    }
  }
}
/* out[b * ostride] = w . x[b] + bias (+ l . u[b]) for every row b of x [B, K] (u [B, R]) */
static inline void row(const float* w, const float* x, long K, long B, float bias, float* out, long ostride,
                       const float* l, const float* u, long R) {
  long K8 = K - K % 8, R8 = R - R % 8;
  for (long b0 = 0; b0 < B; b0 += 8) {
    long nb = B - b0 < 8 ? B - b0 : 8;
    const float* xb = x + b0 * K;
    __m256 acc[8];
    for (int b = 0; b < 8; b++) acc[b] = _mm256_setzero_ps();
    lanes(acc, w, xb, K, K8, nb);
    if (R) lanes(acc, l, u + b0 * R, R, R8, nb);
    for (int b = 0; b < nb; b++) {
      float s = hsum(acc[b]) + bias;
      for (long k = K8; k < K; k++) s += w[k] * xb[b * K + k];
      for (long r = R8; r < R; r++) s += l[r] * u[(b0 + b) * R + r];
      out[(b0 + b) * ostride] = s;
    }
  }
}
/* y[b, o] = sum_k W[o, k] x[b, k] (+ bias[o]) (+ sum_r L[o, r] u[b, r], u = x A^T); W [O, K], x [B, K], y [B, O],
   A [R, K], L [O, R], u [B, R] scratch, row-major float32. The L u term is a LoRA layer's (L = lora_B times its
   scaling): it joins the product's accumulators, so the layer costs one pass over W and one thread team. */
void skinny_lora(const float* W, const float* x, const float* bias, float* y, long O, long K, long B,
                 const float* A, const float* L, float* u, long R) {
  #pragma omp parallel
  {
    if (R) {
      #pragma omp for schedule(static)
      for (long r = 0; r < R; r++) row(A + r * K, x, K, B, 0.0f, u + r, R, 0, 0, 0);
    }
    #pragma omp for schedule(static)
    for (long o = 0; o < O; o++)
      row(W + o * K, x, K, B, bias ? bias[o] : 0.0f, y + o, O, R ? L + o * R : 0, u, R);
  }
}
void skinny(const float* W, const float* x, const float* bias, float* y, long O, long K, long B) {
  skinny_lora(W, x, bias, y, O, K, B, 0, 0, 0, 0);
}
"""
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [rows, K] @ weight.T + bias with the native kernel, or None where it does not apply (too many rows,
    not float32 on a CPU, gradients needed, or no kernel)."""
    kernel = skinny_kernel()
    if kernel is None or not _applies(x, weight, bias):
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    kernel(weight.data_ptr(), x.data_ptr(), b, out.data_ptr(), *weight.shape, x.shape[0])
    return out


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return not (
        x.shape[0] > MAX_ROWS
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or not weight.is_contiguous()
        or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, low: torch.Tensor
) -> torch.Tensor | None:
    """A LoRA layer of a decode step, x [rows, K] @ weight.T + bias + (x @ a.T) @ low.T, in one native call (instead
    of a product and two tiny MKL products). `a` [R, K] holds the active
    adapters' lora_A rows, `low` [O, R] their lora_B columns times their scaling, both float32 and contiguous.
    None where skinny_linear does not apply."""
    fn = lora_kernel()
    if fn is None or not _applies(x, weight, bias):
        return None
    x = x.contiguous()
    out, u = torch.empty(x.shape[0], weight.shape[0]), torch.empty(x.shape[0], a.shape[0])
    b = None if bias is None else bias.data_ptr()
    fn(weight.data_ptr(), x.data_ptr(), b, out.data_ptr(), *weight.shape, x.shape[0], a.data_ptr(), low.data_ptr(),
       u.data_ptr(), a.shape[0])  # fmt: skip
    return out


@functools.lru_cache(maxsize=1)
def skinny_kernel() -> Callable[..., None] | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None where it is unavailable."""
    return _load("skinny", [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3, _agrees)


def lora_kernel() -> Callable[..., None] | None:
    """The product with a LoRA term (skinny_lora in SOURCE), or None where it is unavailable or disagrees."""
    return _lora_kernel() if skinny_kernel() is not None else None


@functools.lru_cache(maxsize=1)
def _lora_kernel() -> Callable[..., None] | None:
    pointers, sizes = [ctypes.c_void_p] * 4, [ctypes.c_long] * 3
    return _load("skinny_lora", pointers + sizes + [ctypes.c_void_p] * 3 + [ctypes.c_long], _lora_agrees)


def _load(name: str, argtypes: list[Any], agrees: Callable[[Callable[..., None]], bool]) -> Callable[..., None] | None:
    """Function `name` of the compiled library, if the library loads and the function passes its check product."""
    lib = _library()
    if lib is None:
        return None
    fn = lib[name]
    fn.argtypes = argtypes
    fn.restype = None
    return fn if agrees(fn) else None


def _library() -> ctypes.CDLL | None:
    if os.environ.get("RLHF_MAGIC_NATIVE", "1") == "0" or not _cpu_supported():
        return None
    try:
        return _build()
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        log.info("native decode kernel unavailable (%s); using torch", err)
        return None


def _cpu_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler")
    return load_library("skinny", SOURCE, [cc, *FLAGS], "c")


def _agrees(fn: Callable[..., None]) -> bool:
    """A check product with an odd K (the scalar tail), 11 rows (two groups) and a bias, against torch."""
    gen = torch.Generator().manual_seed(0)
    w, x, b = (torch.randn(*shape, generator=gen) for shape in ((37, 21), (11, 21), (37,)))
    out = torch.empty(11, 37)
    fn(w.data_ptr(), x.data_ptr(), b.data_ptr(), out.data_ptr(), 37, 21, 11)
    with torch.autocast("cpu", enabled=False):  # the first use may come under a bf16 autocast
        ok = torch.allclose(out, x @ w.t() + b, atol=1e-4)
    if not ok:
        log.warning("native decode kernel disagrees with torch; using torch")
    return ok


def _lora_agrees(fn: Callable[..., None]) -> bool:
    """A product with a rank-19 term (a block of 8 and a scalar tail), odd K, 37 outputs and 11 rows (a group of 8
    and one of 3) against torch."""
    gen = torch.Generator().manual_seed(1)
    w, x, b, a, low = (torch.randn(*s, generator=gen) for s in ((37, 21), (11, 21), (37,), (19, 21), (37, 19)))
    out, u = torch.empty(11, 37), torch.empty(11, 19)
    fn(w.data_ptr(), x.data_ptr(), b.data_ptr(), out.data_ptr(), 37, 21, 11, a.data_ptr(), low.data_ptr(),
       u.data_ptr(), 19)  # fmt: skip
    with torch.autocast("cpu", enabled=False):
        ok = torch.allclose(out, x @ w.t() + b + (x @ a.t()) @ low.t(), atol=1e-4)
    if not ok:
        log.warning("native LoRA kernel disagrees with torch; using torch")
    return ok
