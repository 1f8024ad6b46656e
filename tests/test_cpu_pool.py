"""The CPU memory pool of training steps (engine/fastpath/cpu_pool.py): blocks are reused, memory stays flat,
results do not change, and everything is freed at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_magic.engine.fastpath import cpu_pool

CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.fastpath,
    pytest.mark.skipif(shutil.which("g++") is None or not Path("/proc/self/statm").exists(), reason="needs g++, Linux"),
]


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_freed_block_serves_the_next_tensor_of_its_size_class_until_the_pool_ends():
    with cpu_pool.pooled(CPU) as on:
        assert on and cpu_pool.active()
        first = torch.ones(300_000)
        where = first.data_ptr()
        del first
        second = torch.full((299_000,), 2.0)  # 1.196 vs 1.2 MB: the same class
        assert second.data_ptr() == where and float(second.sum()) == 598_000.0
        other = torch.ones(30_000)  # another class: a new block
        assert other.data_ptr() != where
        stats = cpu_pool.stats()
        assert stats["hits"] == 1 and stats["misses"] == 2
    assert not cpu_pool.active() and cpu_pool.stats()["spare_bytes"] == 0
    before = cpu_pool.stats()["live_bytes"]
    del second, other  # allocated in the pool, freed after it: straight back to malloc
    freed = before - cpu_pool.stats()["live_bytes"]
    assert 1_316_000 <= freed <= 1_316_000 * 1.125  # their two blocks, each rounded up by at most 1/16 of an octave


def test_an_inner_pooled_block_joins_the_outer_one():
    with cpu_pool.pooled(CPU):
        with cpu_pool.pooled(CPU) as inner:
            assert inner
            block = torch.ones(100_000)
            where = block.data_ptr()
            del block
        assert cpu_pool.active()  # the inner block's end did not end the pool
        assert torch.ones(100_000).data_ptr() == where
    assert not cpu_pool.active()


def test_rounds_of_chunks_reuse_the_first_rounds_memory():
    """What a chunked PPO update does: every round frees ~240 MB of activations of slightly different sizes and
    allocates them again. In the pool the process does not grow after the first round, and every page is
    reused."""
    with cpu_pool.pooled(CPU):
        sizes = [60_000 + 5_000 * (i % 7) for i in range(800)]
        for round_ in range(6):
            held = [torch.ones(n - 500 * round_) for n in sizes]
            total = sum(t.numel() for t in held) * 4 / 2**20
            del held
            if round_ == 0:
                after_first = rss_mib()
        grown = rss_mib() - after_first
        assert cpu_pool.stats()["misses"] <= len(sizes) * 1.02
    assert total > 200 and grown < 10, (total, grown)


def test_the_pool_is_off_with_native_code_off(monkeypatch):
    monkeypatch.setenv("RLHF_MAGIC_NATIVE", "0")
    cpu_pool._library.cache_clear()
    try:
        with cpu_pool.pooled(CPU) as on:
            assert not on and not cpu_pool.active()
    finally:
        monkeypatch.undo()
        cpu_pool._library.cache_clear()
    with cpu_pool.pooled(torch.device("meta")) as on:
        assert not on


def test_the_pool_loads_only_a_verified_build_from_a_private_cache_folder():
    """The pool library comes through native_cache: a build recorded in the manifest, private to this user."""
    import stat

    from rlhf_magic.engine.fastpath import native_cache

    assert cpu_pool._library() is not None
    folder = native_cache.folder()
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o022 == 0
    builds = [folder / n for n in native_cache.read_manifest(folder) if n.startswith("cpu_pool-")]
    assert any(native_cache.verified(path) for path in builds), builds
