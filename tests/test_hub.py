"""Hub models against a stand-in Hub on 127.0.0.1 (never the network), weight dtype and placement, memory refusals."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from rlhf_magic import api
from rlhf_magic.engine import models
from rlhf_magic.engine.models import ModelShape, Workload, estimate_memory
from rlhf_magic.engine.runtime import Runtime, pick_device
from rlhf_magic.engine.tiny import CHATML
from rlhf_magic.errors import ConfigError, ModelError

BIG = {  # a ~1.2B-parameter Llama: config.json only, never any weights
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


# ------------------------------------------------------------------------------------------- a stand-in Hub
class Repo:
    def __init__(self, folder: Path):
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.commit = hashlib.sha1(str(folder).encode()).hexdigest()
        self.refs = {"main": self.commit, "v1": self.commit, self.commit: self.commit}


class FakeHub(http.server.ThreadingHTTPServer):
    """The calls huggingface_hub makes: repo info (the commit of a revision), the file tree, and HEAD/GET of
    resolve/<rev>/<file> with the ETag and X-Repo-Commit headers it requires."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, Repo] = {}
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client never holds a server thread for long
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(self.path)
        self.server.log.append(f"{self.command} {path}")
        m = API.match(path) or RESOLVE.match(path)
        repo = self.server.repos.get(m["repo"]) if m else None
        if repo is None:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        if m["rev"] not in repo.refs:
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        if "kind" in m.groupdict():
            return self._send(200, self._api(m["repo"], repo, m["kind"]), {}, body)
        data = repo.files.get(m["file"])
        if data is None:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, body)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        return self._send(200, data, {"ETag": etag, "X-Repo-Commit": repo.commit}, body)

    def _api(self, name: str, repo: Repo, kind: str) -> bytes:
        if kind == "revision":
            out: object = {"id": name, "sha": repo.commit, "siblings": [{"rfilename": f} for f in repo.files]}
        else:
            out = [
                {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in repo.files.items()
            ]
        return json.dumps(out).encode()

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _save_tiny(folder: Path, chat_template: bool = True) -> torch.nn.Module:
    from rlhf_magic.engine.tiny import tiny_model

    model, tok = tiny_model(seed=3)
    if not chat_template:
        tok.chat_template = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    server = FakeHub()
    originals = {}
    for name, chat in (("org/tiny-chat", True), ("org/tiny-plain", False)):
        originals[name] = _save_tiny(root / name, chat)
        server.repos[name] = Repo(root / name)
    for name, cfg in (("org/weirdformer", {"model_type": "weirdformer"}), ("org/big", BIG)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
        server.repos[name] = Repo(root / name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.originals = originals  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def hub(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in Hub, with an empty cache of this test's own; online."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads its settings once, at import: patch the module constants it consults on each call
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake_hub.log.clear()
    return fake_hub


def _go_offline(monkeypatch, fake_hub) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.log.clear()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- hub models
def test_a_hub_id_downloads_into_the_cache_then_loads_offline_with_no_request(hub, monkeypatch, capfd):
    lm = models.load_model("org/tiny-chat", CPU)
    assert "Fetching 6 files" in capfd.readouterr().err  # huggingface_hub's progress bar
    assert lm.spec == "org/tiny-chat" and "models--org--tiny-chat" in lm.source
    assert _same_weights(lm.model, hub.originals["org/tiny-chat"])
    assert lm.tokenizer.chat_template == CHATML  # chat_template.jinja came along
    fetched = {line.rsplit("/", 1)[-1] for line in hub.log if line.startswith("GET") and "/resolve/" in line}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert any("/api/models/org/tiny-chat/revision/main" in line for line in hub.log)

    _go_offline(monkeypatch, hub)
    again = models.load_model("org/tiny-chat", CPU)
    assert hub.log == []  # HF_HUB_OFFLINE=1: the cache answers, the Hub is never asked
    assert _same_weights(again.model, lm.model)
    assert again.tokenizer.chat_template == lm.tokenizer.chat_template


def test_revisions_load_and_key_the_runtime_cache(hub):
    rt = Runtime("cpu")
    main = rt.load("org/tiny-chat")
    assert rt.load("org/tiny-chat") is main  # the weights in memory are reused
    tagged = rt.load("org/tiny-chat", revision="v1")
    assert tagged is not main and tagged.spec == "org/tiny-chat@v1"
    assert any("/revision/v1" in line for line in hub.log)
    with pytest.raises(ConfigError, match=r"^revision = 'nope' was not found in model 'org/tiny-chat'; pass a") as e:
        rt.load("org/tiny-chat", revision="nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="applies to hub models only"):
        rt.load("tiny", revision="v1")


def test_an_uncached_model_offline_gets_one_line_saying_how_to_fetch_it(hub, monkeypatch):
    _go_offline(monkeypatch, hub)
    with pytest.raises(ModelError) as e:
        models.load_model("org/tiny-chat", CPU)
    msg = str(e.value)
    assert "\n" not in msg and hub.log == []
    assert "is not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1 forbids downloads; unset HF_HUB_OFFLINE, or run `hf download org/tiny-chat`" in msg


def test_a_typo_is_not_found_with_a_did_you_mean_from_the_cache(hub, monkeypatch):
    with pytest.raises(
        ModelError,
        match=r"^model = 'org/tiny-chta' was not found: no such folder here, nor model on the Hub; check the spelling",
    ):
        models.load_model("org/tiny-chta", CPU)  # nothing cached yet: no suggestion
    models.load_model("org/tiny-chat", CPU)
    with pytest.raises(ModelError, match=r"was not found: .* on the Hub \(did you mean 'org/tiny-chat'\?\)") as e:
        models.load_model("org/tiny-chta", CPU)
    assert "\n" not in str(e.value)
    _go_offline(monkeypatch, hub)
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache .*\(did you mean 'org/tiny-chat'\?\)"):
        models.load_model("org/tiny-chta", CPU)


def test_an_unknown_model_type_is_refused_before_the_weights_download(hub):
    with pytest.raises(ModelError, match=r"model type 'weirdformer'.*pip install -U transformers.*trust_remote_code"):
        models.load_model("org/weirdformer", CPU)
    assert not any("/revision/" in line for line in hub.log)  # config.json only: no snapshot was started


def test_a_model_without_a_chat_template_loads_with_a_note_naming_the_fallback(hub):
    with pytest.warns(UserWarning, match=r"no chat template: prompts go in as plain text \(the turns of a chat"):
        lm = models.load_model("org/tiny-plain", CPU)
    assert not lm.tokenizer.chat_template
    from rlhf_magic.engine.text import format_prompt

    assert format_prompt(lm.tokenizer, "Hi") == "Hi"  # the fallback the note describes


def test_custom_code_stays_off_unless_the_api_asks_for_it(tmp_path, pairs):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({**BIG, "model_type": "mine", "auto_map": {"AutoModelForCausalLM": "m.M"}})
    )
    with pytest.raises(ModelError, match=r"runs its own code .* pass trust_remote_code=True to the Python API"):
        models.load_model(str(folder), CPU)
    with pytest.raises(ModelError, match="runs its own code"):
        api.sft("c", model=str(folder), data=pairs, progress=False)
    for asked in (  # asked for: the check lets it through to transformers (which finds no code or weights here)
        lambda: api.load_policy(str(folder), trust_remote_code=True),
        lambda: api.sft("c", model=str(folder), data=pairs, progress=False, trust_remote_code=True),
    ):
        with pytest.raises(ModelError) as e:
            asked()
        assert "runs its own code" not in str(e.value)


# ------------------------------------------------------------------------------------------- memory
def test_the_memory_estimate_of_a_known_config():
    shape = ModelShape(params=1_000_000_000, hidden=2048, layers=16, intermediate=8192, vocab=32000)
    full = Workload("full", rows=8, max_length=512)
    est = estimate_memory(shape, full, weight_bytes=4)
    assert est.weights == 4_000_000_000
    assert est.optimizer == 1_000_000_000 * (4 + 8)  # fp32 gradients + AdamW's two fp32 moments
    per_token = 16 * (6 * 2048 + 4 * 8192) * 4 + 32000 * (4 + 4)  # layers kept for backward + fp32 logits
    assert est.activations == 8 * 512 * per_token
    bf16 = estimate_memory(shape, Workload("full", 8, 512, act_bytes=2), weight_bytes=2)
    assert bf16.weights == 2_000_000_000 and bf16.optimizer == 1_000_000_000 * (2 + 8 + 4)  # + fp32 master
    lora = estimate_memory(shape, Workload("lora", 8, 512, lora_r=16, grad_layers=4, act_bytes=2), weight_bytes=2)
    assert lora.optimizer == 16 * 4 * (11 * 2048 + 3 * 8192) * 12  # r x (in + out) x 7 linears, top 4 layers
    assert lora.activations == 8 * 512 * (4 * (6 * 2048 + 4 * 8192) * 2 + 32000 * (2 + 4))  # backward stops there
    ckpt = estimate_memory(shape, Workload("full", 8, 512, checkpointing=True), weight_bytes=4)
    assert ckpt.activations < est.activations / 3
    assert estimate_memory(shape, Workload(), weight_bytes=2).total == 2_000_000_000  # inference: the weights


def test_the_parameter_count_comes_from_config_json_alone(tmp_path):
    model = _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    shape = models.model_shape(tmp_path / "config.json")
    assert shape is not None and shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (64, 2, model.config.vocab_size)


def test_a_stage_that_cannot_fit_is_refused_before_anything_loads(tmp_path, monkeypatch, pairs):
    (tmp_path / "config.json").write_text(json.dumps(BIG))  # no weights: only a refusal can happen first
    monkeypatch.setattr(models, "available_memory", lambda device: 2 * 2**30)
    with pytest.raises(ModelError) as e:
        api.sft("big", model=str(tmp_path), data=pairs, lora=False, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"needs about \d+\.\d GiB \(\d+\.\d GiB weights in float32, \d+\.\d GiB gradients", msg), msg
    assert "activations at 8 x 512 tokens) but only 2.0 GiB of RAM is free on cpu; lower batch_size" in msg
    with pytest.raises(ModelError, match=r"needs about 4\.\d GiB \(4\.\d GiB weights in float32\) but only 2\.0 GiB"):
        api.load_policy(str(tmp_path))  # inference: the weights alone do not fit
    monkeypatch.setattr(models, "available_memory", lambda device: 2**50)
    with pytest.raises(ModelError) as e:  # with room, loading starts (and finds no tokenizer or weights)
        api.load_policy(str(tmp_path))
    assert "GiB" not in str(e.value)


def test_a_hub_model_that_cannot_fit_is_refused_before_its_weights_download(hub, monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda device: 2**30)
    with pytest.raises(ModelError, match=r"^model = 'org/big' needs about .* but only 1\.0 GiB of RAM is free"):
        models.load_model("org/big", CPU)
    assert not any("/revision/" in line for line in hub.log)


# ------------------------------------------------------------------------------------------- dtype and device
def test_weights_take_the_runtime_precision_and_full_copies_keep_fp32_masters():
    rt = Runtime("cpu", "bf16")
    assert rt.weight_dtype() == torch.float32  # CPU bf16: autocast over fp32 weights, as before
    assert rt.load("tiny").model.dtype == torch.float32
    rt.device = torch.device("cuda", 0)  # the GPU policy, without a GPU
    assert rt.weight_dtype() == torch.bfloat16 and rt.weight_dtype(master=True) == torch.float32
    rt.precision = "fp16"
    assert rt.weight_dtype() == torch.float32  # fp16 autocast over fp32 master weights
    rt.precision = "fp32"
    assert rt.weight_dtype() == torch.float32


def test_a_gpu_load_goes_straight_to_the_process_gpu_in_its_dtype(tmp_path, monkeypatch):
    import transformers

    _save_tiny(tmp_path)
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **{k: v for k, v in kw.items() if k != "device_map"})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    models._from_pretrained("t", tmp_path, torch.device("cuda", 1), dtype=torch.bfloat16, trust=False)
    assert seen["device_map"] == torch.device("cuda", 1) and seen["dtype"] == torch.bfloat16
    seen.clear()
    lm = models._from_pretrained("t", tmp_path, CPU, dtype=torch.float32, trust=False)
    assert "device_map" not in seen and lm.model.dtype == torch.float32  # the CPU path as before


def test_each_accelerate_process_picks_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("RLHF_MAGIC_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("cuda") == torch.device("cuda")  # one process: accelerate's own default
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == torch.device("cuda", 1)  # as accelerate's PartialState: rank mod GPUs
