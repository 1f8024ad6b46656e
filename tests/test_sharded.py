"""Sharded training: each stage (SFT, reward, PPO, DPO, GRPO) under FSDP2 on two CPU processes ends where DDP ends,
and saves whole weights.

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
def test_fsdp2_trains_what_ddp_trains_and_saves_whole_weights(stage, request, runs, fsdp2_runs):
    """Each stage under FSDP2 (sharded weights, gradients and optimizer state) ends with DDP's metrics and weights,
    and its one save holds the whole weights: sampling, evaluation, reference log-probs and scoring ran on the
    gathered weights. After the run the handle is a plain model again: the main process alone generates (or
    scores) with it, as after DDP."""
    from safetensors.torch import load_file

    root, sharded = fsdp2_runs
    ddp, run, out = request.getfixturevalue(f"{stage}_run"), sharded[stage], OUT[stage]
    assert [log["fsdp2"] for log in run["logs"]] == [True, True] and not ddp["logs"][0]["fsdp2"]
    assert run["logs"][0]["fsdp2_groups"] == 3  # one shard group per block of the tiny model, the root for the rest
    check_common(run, root / out)
    mine, theirs = ({k: v for k, v in r["summary"]["metrics"].items() if k != "seconds"} for r in (run, ddp))
    numbers = {k for k, v in theirs.items() if isinstance(v, (int, float))}
    assert mine.keys() == theirs.keys() and {k: mine[k] for k in numbers} == pytest.approx(
        {k: theirs[k] for k in numbers}, rel=1e-5, abs=1e-6
    )
    assert {k: mine[k] for k in theirs.keys() - numbers} == {k: theirs[k] for k in theirs.keys() - numbers}
    assert run["summary"]["param_checksums"] == pytest.approx(ddp["summary"]["param_checksums"], rel=1e-6)
    files = [sorted(f.name for f in (r / out).iterdir() if f.suffix in (".safetensors", ".pt")) for r in (root, runs)]
    assert files[0] == files[1] and "model.safetensors" in files[0]
    for name in files[0]:  # the weights, and a reward model's head wherever its format keeps it
        read = load_file if name.endswith(".safetensors") else lambda f: torch.load(f, weights_only=True)
        a, b = read(root / out / name), read(runs / out / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    for sharded_log, ddp_log in zip(run["logs"], ddp["logs"]):  # each process trained on, and sampled, as under DDP
        assert sharded_log["rows"] == ddp_log["rows"] and sharded_log["rollouts"] == ddp_log["rollouts"]
    assert bool(run["logs"][0]["rows"]) != bool(run["logs"][0]["rollouts"])  # one or the other, per stage
    after, before = run["logs"][0]["after"], ddp["logs"][0]["after"]
    assert "after" not in run["logs"][1] and len(after) == 3
    if stage == "reward":
        assert after == pytest.approx(before, rel=1e-4, abs=1e-5)
    else:
        assert after == before and all(isinstance(text, str) for text in after)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CONFIGS))
def test_under_fsdp2_the_divergence_watch_checks_the_weights_that_train(stage, fsdp2_runs):
    """Under FSDP2 the optimizer steps the sharded parameters, and the model's own Parameter objects are stale until
    `release`: the watch must check (and roll back) the sharded ones, or a diverged run would keep its last weights."""
    assert [log["watched_sharded"] for log in fsdp2_runs[1][stage]["logs"]] == [True, True]


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
