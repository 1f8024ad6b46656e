"""Sharded training: each stage under FSDP2 on two CPU processes ends where DDP ends, and saves whole weights.

`accelerate launch --config_file examples/accelerate/fsdp2.yaml` with FSDP2 made to run on gloo (see
`tests/launched.py: _as_fsdp2`); the DDP runs are the session fixtures that tests/test_distributed.py checks.
DeepSpeed needs CUDA: here only its example configs and the engine's rules for it are checked.
"""

from __future__ import annotations

import pytest
import torch
from launches import CONFIGS, OUT, ROOT, check_common


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CONFIGS))
def test_fsdp2_trains_what_ddp_trains_and_saves_whole_weights(stage, runs, sft_run, reward_run, ppo_run, fsdp2_runs):
    """Each stage under FSDP2 (sharded weights, gradients and optimizer state) ends with DDP's metrics and weights,
    and its one save holds the whole weights: sampling, evaluation and scoring ran on the gathered weights."""
    from safetensors.torch import load_file

    root, sharded = fsdp2_runs
    ddp, run, out = {"sft": sft_run, "reward": reward_run, "ppo": ppo_run}[stage], sharded[stage], OUT[stage]
    assert [log["fsdp2"] for log in run["logs"]] == [True, True] and not ddp["logs"][0]["fsdp2"]
    assert run["logs"][0]["fsdp2_groups"] == 3  # one shard group per block of the tiny model, the root for the rest
    check_common(run, root / out)
    mine, theirs = run["summary"]["metrics"], ddp["summary"]["metrics"]
    assert {k: v for k, v in mine.items() if k != "seconds"} == pytest.approx(
        {k: v for k, v in theirs.items() if k != "seconds"}, rel=1e-5, abs=1e-6
    )
    assert run["summary"]["param_checksums"] == pytest.approx(ddp["summary"]["param_checksums"], rel=1e-6)
    a, b = load_file(root / out / "model.safetensors"), load_file(runs / out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    if stage == "reward":
        heads = [torch.load(r / out / "reward_head.pt", weights_only=True) for r in (root, runs)]
        torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_the_example_accelerate_configs_read_as_what_they_are_named(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    kind = {"ddp": "MULTI_GPU", "fsdp2": "FSDP"}.get(name, "DEEPSPEED")
    assert cfg.distributed_type.value == kind and cfg.num_processes == 2
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])


def test_under_deepspeed_a_ppo_minibatch_is_one_backward_pass(monkeypatch):
    """DeepSpeed steps at the end of every backward pass (accelerate's sync), so a split minibatch is refused."""
    from rlhf_magic.config import PPOConfig
    from rlhf_magic.engine.loop import step_skipped
    from rlhf_magic.engine.ranks import same_chunks
    from rlhf_magic.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="micro_batch_size = 2: under DeepSpeed"):
        same_chunks(PPOConfig(batch_size=8, mini_batch_size=4, micro_batch_size=2))
    assert same_chunks(PPOConfig(batch_size=8, mini_batch_size=4)).micro_batch_size in (None, 4)
    assert not step_skipped(None)  # DeepSpeed clips inside its engine: no norm comes back, and no step was skipped
