"""Leaving the notebook: PEFT adapter folders (stacked adapters included), model cards, refusing to overwrite a
folder, and push_to_hub against a stand-in Hub on 127.0.0.1 (never the network)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import threading
import urllib.parse

import pytest
import torch
from test_hub import FakeHub, Handler, Repo

from rlhf_magic import api
from rlhf_magic.engine.handles import PolicyHandle
from rlhf_magic.engine.models import LoadedModel
from rlhf_magic.errors import ConfigError, ModelError

PROMPTS = ["What is 3 plus 3?", "What is 7 plus 7?", "List letters 2", "What is 12 plus 12?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """rlhf-magic's cache in a folder of this module's own (the tiny model is written there as a checkpoint)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RLHF_MAGIC_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    rows = [
        {"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}. {rng.choice('abc')}"}
        for i in range(40)
    ]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft(cache, data_file):
    return api.sft("sft", model="tiny", data=str(data_file), max_steps=40, lr=1e-2, lora={"r": 4}, progress=False)


@pytest.fixture(scope="module")
def ppo(sft):
    """A PPO adapter (rank 2, alpha 8: another scaling than the SFT adapter's 32/4) stacked on the SFT adapter."""
    return api.ppo(
        "p.1",
        policy=sft,
        reward=lambda p, r: [x.count("a") / 4 for x in r],
        prompts=[f"List letters {i}" for i in range(8)],
        steps=3,
        batch_size=4,
        max_new_tokens=6,
        lr=1e-2,
        lora={"r": 2, "alpha": 8},
        progress=False,
    )


def _through_peft(folder):
    """The folder loaded as a user of peft would, wrapped in a handle so that it generates the way the original does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder)).eval()
    lm = LoadedModel("peft", model.base_model.model, AutoTokenizer.from_pretrained(str(folder)), str(folder))
    return PolicyHandle("peft", "base", lm, runtime=api.load_policy("tiny").runtime)


def _answers(handle):
    return [handle.logprobs(PROMPTS[:2], ["The answer is 6.", "a b c d"]), handle.generate(PROMPTS, NEW_TOKENS)]


@pytest.mark.parametrize("which", ["sft", "ppo"])
def test_an_adapter_folder_loads_in_peft_and_as_model_with_the_handles_generations(which, request, tmp_path):
    handle = request.getfixturevalue(which)
    out = handle.save(tmp_path / "adapter", merged=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == (4 if which == "sft" else 4 + 2)  # stacked: one adapter of the summed rank
    want_lp, want = _answers(handle)
    assert len(set(want)) > 1, "the trained policy should not answer every prompt alike"
    for again in (_through_peft(out), api.load_policy(str(out))):
        lp, got = _answers(again)
        assert got == want
        assert lp == pytest.approx(want_lp, abs=1e-4)
    assert not list(tmp_path.glob(".adapter-*")), "a temporary folder was left behind"


def test_the_stacked_export_carries_the_ppo_adapter_and_trains_on_as_model(ppo, sft, tmp_path):
    out = ppo.save(tmp_path / "ppo", merged=False)
    lp_ppo, lp_sft = _answers(ppo)[0], _answers(sft)[0]
    assert max(abs(a - b) for a, b in zip(lp_ppo, lp_sft)) > 1e-3  # PPO moved the policy: the top adapter counts
    again = api.sft("more", model=str(out), data=[{"prompt": "Hi", "response": "Hello."}] * 8, max_steps=2,
                    eval_fraction=0, progress=False)  # fmt: skip
    assert again.parents == (str(out),) and again.metrics.summary["steps"] == 2
    with pytest.raises(ModelError, match=r"is itself an adapter .*; save with merged=True"):
        again.save(tmp_path / "chained", merged=False)  # peft could not load it onto any checkpoint
    assert api.load_policy(str(again.save(tmp_path / "chained"))).generate(PROMPTS, 4) == again.generate(PROMPTS, 4)


def test_the_model_card_tells_stage_parents_settings_metrics_and_data_by_name_and_size(ppo, sft, data_file, tmp_path):
    card = (sft.save(tmp_path / "sft") / "README.md").read_text()
    assert card.startswith('---\nlibrary_name: "transformers"')
    assert "- **stage**: sft" in card and "- **parents**: tiny" in card
    assert "`data`: pairs.jsonl (40 records)" in card
    assert "The answer is" not in card  # the data itself never goes in
    assert f"| train/loss | {sft.metrics.summary['train/loss']:.4g} |" in card
    assert "| max_steps | 40 |" in card and "| lr | 0.01 |" in card
    card = (ppo.save(tmp_path / "ppo", merged=False) / "README.md").read_text()
    assert 'library_name: "peft"' in card and "- **stage**: ppo" in card and "- **parents**: sft, <lambda>" in card
    assert "`prompts`: list (8 records)" in card and "| ppo/objective/kl |" in card
    base = json.loads((tmp_path / "ppo" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f'base = AutoModelForCausalLM.from_pretrained("{base}")' in card
    assert "base_model:" not in card  # the Hub takes a model id there, never a local path


def test_merged_false_on_a_fully_fine_tuned_policy_names_merged_true(cache, tmp_path):
    full = api.sft("full", model="tiny", data=[{"prompt": "a", "response": "b"}] * 4, max_steps=1, lora=False,
                   eval_fraction=0, progress=False)  # fmt: skip
    with pytest.raises(ModelError, match=r"has no LoRA adapter .*; save with merged=True") as e:
        full.save(tmp_path / "x", merged=False)
    assert "\n" not in str(e.value)
    lora = api.sft("on-full", model=full, data=[{"prompt": "a", "response": "b"}] * 4, max_steps=1, lora={"r": 2},
                   eval_fraction=0, progress=False)  # fmt: skip
    with pytest.raises(ModelError, match=r"adapter on a fully fine-tuned model, .*; save with merged=True"):
        lora.save(tmp_path / "y", merged=False)  # its base weights are in no checkpoint a user could load
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_an_adapter_on_a_base_that_got_a_pad_token_carries_the_grown_embeddings(cache, data_file, tmp_path):
    """A tokenizer with no PAD candidate (Llama 3's, say) gets '<|pad|>' added and the embeddings grow by a randomly
    initialised row: the adapter must hold those rows, or the reloaded model's softmax differs."""
    from peft import PeftModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhf_magic.engine.tiny import CHATML

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(["<s>", "</s>", *alphabet])}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHATML
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, **shape)).save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    h = api.sft(
        "g", model=str(tmp_path / "b"), data=str(data_file), max_steps=5, lr=1e-2, lora={"r": 4}, progress=False
    )
    assert len(h.tokenizer) == len(tok) + 1
    out = h.save(tmp_path / "adapter", merged=False)
    assert "base.resize_token_embeddings(len(tokenizer))" in (out / "README.md").read_text()
    answers = ["The answer is 6.", "a b c d"]
    want, rows = h.logprobs(PROMPTS[:2], answers), h.lm.model.get_input_embeddings().weight
    reloaded = api.load_policy(str(out))
    assert torch.equal(reloaded.lm.model.get_input_embeddings().weight, rows)  # the PAD row too
    assert reloaded.logprobs(PROMPTS[:2], answers) == pytest.approx(want, abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(str(out))))  # as the card says
    model = PeftModel.from_pretrained(base, str(out)).eval()
    lm = LoadedModel("peft", model.base_model.model, h.tokenizer, str(out))
    assert torch.equal(lm.model.get_input_embeddings().weight, rows)
    again = PolicyHandle("peft", "base", lm, runtime=h.runtime)
    assert again.logprobs(PROMPTS[:2], answers) == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------------ overwriting
def test_an_existing_folder_is_refused_without_overwrite_and_replaced_with_it(sft, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    sft.save(target)  # an empty folder is fine
    (target / "mine.txt").write_text("keep me")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(ConfigError, match=r"^'.*out' is a folder that is not empty; pass overwrite=True to") as e:
        sft.save(target, merged=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in target.iterdir()) == before  # untouched
    sft.save(target, merged=False, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "adapter_config.json" in names and "mine.txt" not in names and "config.json" not in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copies


def test_a_stage_rerun_replaces_its_own_output_dir(cache, tmp_path):
    out = tmp_path / "run"
    for steps in (1, 2):
        h = api.sft("s", model="tiny", data=[{"prompt": "a", "response": "b"}] * 4, max_steps=steps,
                    eval_fraction=0, output_dir=str(out), progress=False)  # fmt: skip
        assert json.loads((out / "rlhf_magic.json").read_text())["metrics"]["steps"] == h.metrics.summary["steps"]


# ------------------------------------------------------------------------------------------------ push_to_hub
class Uploads(Handler):
    """The calls create_repo and upload_folder make: repos/create, validate-yaml, preupload, the file tree (for the
    deletion of stale files) and the ndjson commit."""

    server: HubWithUploads

    def do_POST(self) -> None:
        path = urllib.parse.unquote(self.path).split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.log.append(f"POST {path}")
        self.server.auth.append(self.headers.get("Authorization"))
        if path == "/api/repos/create":
            req = json.loads(body)
            name = f"{req['organization']}/{req['name']}"
            self.server.created[name] = req
            answer = json.dumps({"url": f"{self.server.url}/{name}"}).encode()
            if name in self.server.repos:  # the Hub says 409 and the URL; exist_ok=True takes that as success
                return self._send(409, answer, {"Content-Type": "application/json"}, True)
            self.server.repos[name] = _empty_repo()
            return self._send(200, answer, {"Content-Type": "application/json"}, True)
        if path == "/api/validate-yaml":
            return self._json({"warnings": [], "errors": []})
        name = "/".join(path.split("/")[3:5])
        kind, repo = path.rsplit("/", 2)[-2], self.server.repos.get(name)
        if repo is None:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, True)
        if kind == "preupload":
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        for line in body.splitlines():  # the commit
            item = json.loads(line)
            if item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                repo.files.pop(item["value"]["path"])
        repo.commit = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
        repo.refs = {"main": repo.commit, repo.commit: repo.commit}
        return self._json({"commitUrl": f"{self.server.url}/{name}/commit/{repo.commit}", "commitOid": repo.commit})

    def _json(self, obj: object) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, True)


class HubWithUploads(FakeHub):
    def __init__(self) -> None:
        super().__init__()
        self.RequestHandlerClass = Uploads
        self.created: dict[str, dict] = {}
        self.auth: list[str | None] = []


def _empty_repo() -> Repo:
    repo = Repo.__new__(Repo)
    repo.files, repo.commit = {".gitattributes": b"*.safetensors filter=lfs\n"}, "0" * 40
    repo.refs = {"main": repo.commit, repo.commit: repo.commit}
    return repo


@pytest.fixture
def upload_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = HubWithUploads()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface_hub reads its settings once, at import: the module constants it consults on each call count
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_push_to_hub_uploads_the_saved_folder_privately_and_a_repush_replaces_it(upload_hub, ppo, tmp_path):
    url = ppo.push_to_hub("me/tiny-ppo", merged=False, token="hf_fake")
    repo = upload_hub.repos["me/tiny-ppo"]
    local = ppo.save(tmp_path / "local", merged=False)
    assert url == f"{upload_hub.url}/me/tiny-ppo"
    assert upload_hub.created["me/tiny-ppo"]["visibility"] == "private"
    assert set(upload_hub.auth) == {"Bearer hf_fake"}
    sent = {k for k in repo.files if k != ".gitattributes"}
    assert sent == {p.name for p in local.iterdir()}
    assert repo.files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
    assert b"# p.1" in repo.files["README.md"]

    ppo.push_to_hub("me/tiny-ppo", merged=True, private=False, token="hf_fake")
    assert "config.json" in repo.files and "adapter_config.json" not in repo.files  # no stale adapter files
    assert ".gitattributes" in repo.files
    assert upload_hub.created["me/tiny-ppo"]["visibility"] == "public"


def test_a_reward_model_pushes_too(upload_hub, sft, tmp_path):
    from rlhf_magic.engine.reward_model import RewardHandle, make_head

    head = make_head(sft.lm.model.config.hidden_size, sft.runtime.device)
    rm = RewardHandle("judge", sft.lm, head, runtime=sft.runtime, adapter=sft.adapter)
    rm.push_to_hub("me/judge", token="hf_fake")
    local = rm.save(tmp_path / "rm")
    assert {k for k in upload_hub.repos["me/judge"].files if k != ".gitattributes"} == {p.name for p in local.iterdir()}
    with pytest.raises(ConfigError, match="merged=False applies to policies"):
        rm.push_to_hub("me/judge", merged=False, token="hf_fake")


@pytest.mark.parametrize("repo_id", ["tiny-ppo", "me/tiny/ppo", "me/tiny ppo", "me/--x", "me/" + "x" * 100])
def test_a_malformed_repo_id_is_refused_in_one_line_before_anything_happens(upload_hub, sft, repo_id, monkeypatch):
    saves = []
    monkeypatch.setattr(type(sft), "save", lambda *a, **k: saves.append(a))
    with pytest.raises(ConfigError, match=r"^repo_id = .* is not valid \(.*\); expected 'user/name'") as e:
        sft.push_to_hub(repo_id, token="hf_fake")
    assert "\n" not in str(e.value)
    assert upload_hub.log == [] and saves == []


def test_push_to_hub_offline_is_refused_in_one_line_before_anything_happens(upload_hub, sft, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"needs the Hub, and HF_HUB_OFFLINE=1 forbids it; unset it first"):
        sft.push_to_hub("me/x", token="hf_fake")
    assert upload_hub.log == []


def test_a_pushed_adapter_loads_from_the_hub_onto_its_hub_base(upload_hub, cache, data_file, tmp_path):
    from test_hub import _save_tiny

    _save_tiny(tmp_path / "base")
    upload_hub.repos["org/tiny-base"] = Repo(tmp_path / "base")
    sft = api.sft("h", model="org/tiny-base", data=str(data_file), max_steps=20, lr=1e-2, lora={"r": 4}, progress=False)
    sft.push_to_hub("me/tiny-adapter", merged=False, token="hf_fake")
    config = json.loads(upload_hub.repos["me/tiny-adapter"].files["adapter_config.json"])
    assert config["base_model_name_or_path"] == "org/tiny-base"  # a hub base is recorded by its id: portable
    assert 'base_model: "org/tiny-base"' in upload_hub.repos["me/tiny-adapter"].files["README.md"].decode()
    again = api.load_policy("me/tiny-adapter")
    assert again.lm.spec == "me/tiny-adapter"
    lp, got = _answers(again)
    want_lp, want = _answers(sft)
    assert got == want and lp == pytest.approx(want_lp, abs=1e-4)
