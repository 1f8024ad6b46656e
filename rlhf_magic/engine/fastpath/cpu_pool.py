"""A memory pool for CPU tensors during a training step: a freed tensor's block is kept and handed to the next
tensor of its size class, instead of going back to glibc.

A PPO update on a CPU runs its minibatch in chunks, and each chunk's forward pass allocates the activations that
backward frees. With glibc's malloc the freed blocks either stay in its heap, where the next chunk (other sizes,
another order) reuses them only in part, so the process grows; or malloc_trim hands them back to the OS, and every
page faults again in the next chunk. Inside `pooled()`, tensors of POOL_MIN_BYTES and more are rounded up to one of
16 size classes per octave, and freed blocks wait on a free list per class: the next chunk reuses the last one's
blocks and pages. The rounded-up tail of a block that is never written is never faulted in. When the outermost
`pooled()` ends, the pool frees its blocks.

The pool is a c10 CPU allocator, compiled (C++, against torch's own headers and libc10) into the cache folder on
first use and installed as torch's CPU allocator then. Outside `pooled()` it passes every allocation straight to
c10::alloc_cpu / free_cpu, as torch's default allocator does. Where there is no C++ compiler, the pool fails its
check, or the cache folder fails native_cache.py's owner, mode and SHA-256 checks, `pooled()` does nothing.
RLHF_MAGIC_NATIVE=0 turns it off. Figures: bench/README.md."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..patching import PROCESS
from .native_cache import load_library

log = logging.getLogger(__name__)

POOL_MIN_BYTES = 1 << 16  # smaller tensors go straight to malloc (its small-block bins serve them well)
POOL_CAP_BYTES = 2 << 30  # at most this much freed memory waits in the pool; beyond it, blocks are freed

SOURCE = r"""
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {
std::mutex mu;
bool pooling = false;
size_t min_bytes = 1 << 16, cap_bytes = 0;
std::unordered_map<void*, size_t> handed;              // pooled blocks in use: pointer -> class bytes
std::unordered_map<size_t, std::vector<void*>> spare;  // freed pooled blocks, by class bytes
size_t spare_bytes = 0, hits = 0, misses = 0;

size_t size_class(size_t n) {  // n rounded up to a multiple of 1/16 of the power of two at or above it
  size_t p = 4096;
  while (p < n) p <<= 1;
  size_t g = p >> 4 < 4096 ? 4096 : p >> 4;
  return (n + g - 1) / g * g;
}

void release(void* p) {
  if (!p) return;
  c10::profiledCPUMemoryReporter().Delete(p);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = handed.find(p);
    if (it != handed.end()) {
      size_t s = it->second;
      handed.erase(it);
      if (pooling && spare_bytes + s <= cap_bytes) {
        spare[s].push_back(p);
        spare_bytes += s;
        return;
      }
    }
  }
  c10::free_cpu(p);
}

void* take(size_t n) {  // a pooled block for n bytes: a spare one of its class or the next two, else a new one
  size_t s = size_class(n);
  for (size_t c = s, i = 0; i < 3; c = size_class(c + 1), i++) {
    auto it = spare.find(c);
    if (it != spare.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      spare_bytes -= c;
      hits++;
      handed[p] = c;
      return p;
    }
  }
  void* p = c10::alloc_cpu(s);
  misses++;
  handed[p] = s;
  return p;
}

struct Pool final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n >= min_bytes) {
      std::lock_guard<std::mutex> lock(mu);
      if (pooling) p = take(n);
    }
    if (!p) p = c10::alloc_cpu(n);
    c10::profiledCPUMemoryReporter().New(p, n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
Pool pool;
}  // namespace

extern "C" {
/* Start pooling; 1 when this pool is torch's CPU allocator (installed on first call), else 0 (nothing changes). */
int pool_begin(size_t min, size_t cap) {
  if (c10::GetCPUAllocator() != &pool) c10::SetCPUAllocator(&pool, 0);
  if (c10::GetCPUAllocator() != &pool) return 0;
  std::lock_guard<std::mutex> lock(mu);
  pooling = true;
  min_bytes = min;
  cap_bytes = cap;
  hits = misses = 0;
  return 1;
}
/* Stop pooling and free the spare blocks; blocks still in use are freed when their tensors are. */
void pool_end() {
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(mu);
    pooling = false;
    for (auto& kv : spare)
      for (void* p : kv.second) drop.push_back(p);
    spare.clear();
    spare_bytes = 0;
  }
  for (void* p : drop) c10::free_cpu(p);
}
/* handed-out bytes, spare bytes, hits, misses */
void pool_stats(size_t* out) {
  std::lock_guard<std::mutex> lock(mu);
  size_t live = 0;
  for (auto& kv : handed) live += kv.second;
  out[0] = live;
  out[1] = spare_bytes;
  out[2] = hits;
  out[3] = misses;
}
}
"""


@contextlib.contextmanager
def pooled(device: Any) -> Iterator[bool]:
    """Inside, on a CPU, freed tensors of POOL_MIN_BYTES or more are kept for reuse (see the module docstring);
    yields whether the pool is active. Re-entrant: an inner pooled() joins the outer one."""
    if PROCESS.pool_depth > 0:
        PROCESS.pool_depth += 1
        try:
            yield True
        finally:
            PROCESS.pool_depth -= 1
        return
    lib = _library() if getattr(device, "type", str(device)) == "cpu" else None
    if lib is None or not lib.pool_begin(POOL_MIN_BYTES, POOL_CAP_BYTES):
        yield False
        return
    PROCESS.pool_depth = 1
    try:
        yield True
    finally:
        PROCESS.pool_depth = 0
        lib.pool_end()


def active() -> bool:
    """Whether a pooled() block is running."""
    return PROCESS.pool_depth > 0


def stats() -> dict[str, int]:
    """The pool's bytes in use and spare, and its hits and misses since the outermost pooled() began."""
    lib = _library()
    if lib is None:
        return {}
    out = (ctypes.c_size_t * 4)()
    lib.pool_stats(out)
    return dict(zip(("live_bytes", "spare_bytes", "hits", "misses"), out))


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("RLHF_MAGIC_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    try:
        lib = _build()
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        log.info("CPU memory pool unavailable (%s)", err)
        return None
    lib.pool_begin.argtypes, lib.pool_begin.restype = [ctypes.c_size_t, ctypes.c_size_t], ctypes.c_int
    lib.pool_end.argtypes, lib.pool_end.restype = [], None
    lib.pool_stats.argtypes, lib.pool_stats.restype = [ctypes.POINTER(ctypes.c_size_t)], None
    return lib if _reuses(lib) else None


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler")
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}"]
    libs = [f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    return load_library("cpu_pool", SOURCE, flags, "cpp", libs, key=torch.__version__)


def _reuses(lib: ctypes.CDLL) -> bool:
    """The check: inside the pool, a tensor freed and one of a slightly other size in its class get the same
    block; after it, tensors come and go as usual."""
    if not lib.pool_begin(POOL_MIN_BYTES, POOL_CAP_BYTES):
        return False
    try:
        first = torch.empty(1 << 18)
        where = first.data_ptr()
        del first
        again = torch.empty((1 << 18) - 1000)
        ok = again.data_ptr() == where
        del again
    finally:
        lib.pool_end()
    after = torch.ones(1 << 18)
    ok = ok and float(after.sum()) == float(1 << 18)
    if not ok:
        log.warning("CPU memory pool failed its check; not pooling")
    return ok


def release_free_memory() -> None:
    """Outside the pool, with glibc: hand the pages of freed tensors back to the OS (`malloc_trim`), so that the
    holes the last chunk's activations left do not add to the next chunk's peak."""
    if active():  # the pool keeps its blocks for reuse
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None
