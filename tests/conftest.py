"""Shared fixtures: an offline environment, a real InteractiveShell with the extension, tiny data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# The tiny test models are far too small for two threads to help; one thread avoids OpenMP spin-waiting, which
# makes each tiny matmul ~100x slower when other processes share the two cores. Tests on the embedded model
# raise it again with the `two_threads` fixture.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests of a fast-path specialisation skip, with a reason, when the fast path is off; all others run in both
    modes (CI runs the suite once with RLHF_MAGIC_FASTPATH=0)."""
    from rlhf_magic.engine import fastpath

    if fastpath.enabled_by_env():
        return
    skip = pytest.mark.skip(reason="tests a CPU fast-path specialisation, and RLHF_MAGIC_FASTPATH=0 turns it off")
    for item in items:
        if item.get_closest_marker("fastpath"):
            item.add_marker(skip)


@pytest.fixture
def native_kernels():
    """Skips where the compiled kernels cannot run (no compiler, no AVX2/FMA, RLHF_MAGIC_NATIVE=0)."""
    from rlhf_magic.engine.fastpath import native

    if native.skinny_kernel() is None:
        pytest.skip("the native kernels need Linux x86-64 with AVX2/FMA, a C compiler and RLHF_MAGIC_NATIVE != 0")


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _shell():
    from IPython.testing.globalipapp import start_ipython

    return start_ipython()  # returns the shell only on its first call, hence session scope


@pytest.fixture
def ip(_shell):
    """A real InteractiveShell with rlhf_magic loaded; unloaded again after the test."""
    _shell.run_line_magic("load_ext", "rlhf_magic")
    yield _shell
    _shell.run_line_magic("unload_ext", "rlhf_magic")


@pytest.fixture
def pairs():
    """Forty prompt/response pairs with one fixed answer pattern (easy to learn)."""
    return [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(40)]


@pytest.fixture(scope="session")
def runtime():
    from rlhf_magic.engine.runtime import Runtime

    return Runtime("cpu")


# ------------------------------------------------------------------------------------------------ two processes
# The launched runs (tests/launches.py), shared by test_distributed.py (DDP) and test_sharded.py (FSDP2 vs DDP).
@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    from launches import write_data

    root = tmp_path_factory.mktemp("dist")
    write_data(root)
    return root


@pytest.fixture(scope="session")
def sft_run(runs):
    from launches import CONFIGS, launch

    return launch(runs, "sft", CONFIGS["sft"])


@pytest.fixture(scope="session")
def reward_run(runs, sft_run):
    from launches import CONFIGS, launch

    return launch(runs, "reward", CONFIGS["reward"])


@pytest.fixture(scope="session")
def ppo_run(runs, sft_run, reward_run):
    from launches import CONFIGS, launch

    return launch(runs, "ppo", CONFIGS["ppo"])


@pytest.fixture(scope="session")
def dpo_run(runs, sft_run):
    from launches import CONFIGS, launch

    return launch(runs, "dpo", CONFIGS["dpo"])


@pytest.fixture(scope="session")
def grpo_run(runs, sft_run, reward_run):
    from launches import CONFIGS, launch

    return launch(runs, "grpo", CONFIGS["grpo"])


@pytest.fixture(scope="session")
def fsdp2_runs(tmp_path_factory):
    from launches import CONFIGS, launch, write_data

    root = tmp_path_factory.mktemp("fsdp2")
    write_data(root)
    return root, {stage: launch(root, stage, CONFIGS[stage], fsdp2=True) for stage in CONFIGS}
