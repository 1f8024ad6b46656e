"""The extension through a real InteractiveShell: load, %%sft, the session, errors, unload/reload."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

SFT_CELL = "model = 'tiny'\ndata = pairs\nmax_steps = 3\nlr = 3e-3\n"


def test_load_ext_is_fast_and_does_not_import_torch():
    code = (
        "import sys, time\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython(); t = time.perf_counter()\n"
        "ip.run_line_magic('load_ext', 'rlhf_magic')\n"
        "print('SECONDS', time.perf_counter() - t)\n"
        "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False False" in out
    banner = next(line for line in out.splitlines() if line.startswith("rlhf-magic "))
    assert "device: cpu" in banner
    assert float(out.split("SECONDS")[1].split()[0]) < 2.0


def test_sft_cell_binds_the_handle_and_registers_it(ip, pairs):
    ip.user_ns["pairs"] = pairs
    res = ip.run_cell(f"%%sft first\n{SFT_CELL}")
    assert res.success, res.error_in_exec
    handle = ip.user_ns["first"]
    session = ip.user_ns["rlhf"]
    assert session["first"] is handle and session.latest("policy", "sft") is handle
    assert handle.metrics.summary["steps"] == 3
    listing = ip.run_line_magic("rlhf", "")
    assert "first" in repr(listing) and "sft" in listing._repr_html_()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("model='tiny'\ndata=pairs\nepoch=1", "UsageError: line 3: unknown setting 'epoch' (did you mean 'epochs'?)"),
        ("model='tiny'\ndata=pairs\nlr='fast'", "UsageError: line 3: lr = 'fast' is not valid"),
        ("model='tiny'\ndata=pears", "no notebook variable named 'pears' (did you mean 'pairs'?)"),
        ("model='tiny'\ndata='nope.jsonl'", "UsageError: data = 'nope.jsonl': no such file"),
        ("model='tiny'\ndata=[{'q': 1}]", "UsageError: record 0 has fields ['q']"),
        ("model='tiny'\ndata=[]", "UsageError: data is empty"),
        ("model='tiny'\ndata=pairs\nmax_steps = (1,", "UsageError: line 3: cannot read this setting"),
        ("model='./no/such/dir'\ndata=pairs", "UsageError: model = './no/such/dir': no such folder"),
    ],
)
def test_errors_are_one_line_usage_errors_and_leave_the_session_unchanged(ip, pairs, capsys, body, message):
    ip.user_ns["pairs"] = pairs
    ip.run_cell(f"%%sft ok\n{SFT_CELL}")
    capsys.readouterr()
    res = ip.run_cell(f"%%sft broken\n{body}\n")
    err = capsys.readouterr().err
    assert not res.success
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "broken" not in ip.user_ns and "broken" not in ip.user_ns["rlhf"]
    assert list(h.name for h in ip.user_ns["rlhf"]) == ["ok"]


def test_unload_and_reload_leave_no_state(ip, pairs):
    ip.user_ns["pairs"] = pairs
    ip.run_cell(f"%%sft one\n{SFT_CELL}")
    old = ip.user_ns["rlhf"]
    ip.run_line_magic("unload_ext", "rlhf_magic")
    assert "rlhf" not in ip.user_ns
    assert "sft" not in ip.magics_manager.magics["cell"] and "rlhf" not in ip.magics_manager.magics["line"]
    assert len(old) == 0 and old._runtime is None
    ip.run_line_magic("load_ext", "rlhf_magic")
    assert len(ip.user_ns["rlhf"]) == 0 and ip.user_ns["rlhf"] is not old
    ip.run_line_magic("reload_ext", "rlhf_magic")
    assert len(ip.user_ns["rlhf"]) == 0
    assert ip.run_cell(f"%%sft two\n{SFT_CELL}").success


def test_magic_docstring_lists_the_settings(ip):
    doc = ip.magics_manager.magics["cell"]["sft"].__doc__
    assert "max_steps" in doc and "lora.r" in doc and "rank of the LoRA update" in doc


def test_an_unknown_rank_option_is_a_one_line_usage_error_with_a_hint(ip, tmp_path, capsys):
    ip.user_ns.update(ps=["Say hi.", "Name a colour."], answers=[["a", "b"]] * 2, rule=len)
    file = tmp_path / "p.jsonl"
    capsys.readouterr()
    res = ip.run_cell(f'%rank typo prompts=ps responses=answers lables="kim" file="{file}"')
    err = capsys.readouterr().err
    assert not res.success and "typo" not in ip.user_ns and not file.exists()
    assert "UsageError: %rank: unknown setting 'lables' (did you mean 'labeler'?); settings are: " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for line, message in [
        ('k="4"', "%rank: k = '4' is not valid; expected int or None"),
        ("k=12", "k = 12: the number of answers per prompt must be an integer from 2 to 9"),
        ("ties=1", "%rank: ties = 1 is not valid; expected bool"),
    ]:
        res = ip.run_cell(f'%rank typo prompts=ps responses=answers file="{file}" {line}')
        assert not res.success and message in str(res.error_in_exec), (line, res.error_in_exec)
    ip.user_ns.update(x=object(), y=object())
    res = ip.run_cell("%compare x y prompts=ps rewrad=rule")
    assert not res.success and "%compare: unknown setting 'rewrad' (did you mean 'reward'?)" in str(res.error_in_exec)


@pytest.mark.parametrize(("magic", "cls"), [("rank", "RankConfig"), ("compare", "CompareConfig")])
def test_line_magic_help_lists_every_setting_of_its_config(ip, magic, cls):
    import dataclasses

    from rlhf_magic import config
    from rlhf_magic.validation import field_help

    config_cls = getattr(config, cls)
    doc = ip.find_line_magic(magic).__doc__
    assert doc.startswith(f"%{magic} ") and config_cls.__doc__ in doc
    for name, text in field_help(config_cls).items():
        assert f"  {name:<20} {text}" in doc, name
    assert len(field_help(config_cls)) == len(dataclasses.fields(config_cls))
    shown = ip.object_inspect_text(f"%{magic}")  # what `%rank?` / `%compare?` print
    assert all(f.name in shown for f in dataclasses.fields(config_cls))


# ---- a reward function that raises: one line, and `%tb` shows the user's own frame (issue 19, item 3)
BREVITY = "def brevity(prompts, responses):\n    n = 0\n    return [len(r) / n for r in responses]\n"
RAISED = "UsageError: reward brevity() raised ZeroDivisionError at line 3: division by zero"


class EchoPolicy:
    """Enough of a policy for %compare (.generate), with no model behind it."""

    name = "echo"

    def generate(self, prompts, **_):
        return [f"echo {p}" for p in prompts]


def _fails_in_one_line_and_tb_shows_the_frame(ip, capsys, cell):
    before = dict(ip.user_ns)
    capsys.readouterr()
    res = ip.run_cell(cell)
    err = capsys.readouterr().err
    assert not res.success and err.strip() == RAISED, err
    assert ip.user_ns.keys() == before.keys() and all(ip.user_ns[k] is v for k, v in before.items() if k != "_")
    ip.run_cell("%tb")
    shown = capsys.readouterr().out
    # the user's frame (its source line), the original exception, then the one-line error it caused
    assert "return [len(r) / n for r in responses]" in shown and "ZeroDivisionError: division by zero" in shown
    assert "UserFunctionError: reward brevity() raised" in shown


def test_a_raising_reward_in_compare_is_one_line_and_tb_shows_its_frame(ip, capsys):
    ip.run_cell(BREVITY)
    ip.user_ns.update(a=EchoPolicy(), ps=["Say hi.", "Name a colour."])
    _fails_in_one_line_and_tb_shows_the_frame(ip, capsys, "%compare a a prompts=ps reward=brevity")


def test_a_raising_reward_in_ppo_is_one_line_and_tb_shows_its_frame(ip, capsys):
    from rlhf_magic.api import load_policy

    ip.run_cell(BREVITY)
    ip.user_ns.update(base=load_policy("tiny", name="base"), ps=["Say hi.", "Name a colour."] * 2)
    body = "policy = base\nreward = brevity\nprompts = ps\nsteps = 1\nbatch_size = 4\nmax_new_tokens = 4\n"
    _fails_in_one_line_and_tb_shows_the_frame(ip, capsys, f"%%ppo tuned\n{body}")
    assert "tuned" not in ip.user_ns["rlhf"]


def test_a_raising_reward_stops_every_process_before_this_one_raises():
    """Under DDP the process whose reward raised must still join the all-reduce that stops every process."""
    import torch

    from rlhf_magic.engine import rollout as R
    from rlhf_magic.errors import UserFunctionError

    def brevity(prompts, responses):
        return [1 / 0 for _ in responses]

    ro = R.Rollout(["p", "q"], ["a", "b"], torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 1,
                   torch.ones(2, 2), torch.ones(2, dtype=torch.bool))  # fmt: skip
    roles = SimpleNamespace(score=R.callable_scorer(brevity, torch.device("cpu")))
    R.score(roles, ro, None)  # no raise yet: the scores are NaN, so ppo_step's any_rank stops every process
    assert R.first_bad_score(ro.scores) == 0 and isinstance(ro.error, UserFunctionError)
    with pytest.raises(UserFunctionError, match=r"^reward brevity\(\) raised ZeroDivisionError at line \d+"):
        R.bad_score(ro, 0)
    other = R.Rollout(["p"], ["a"], torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 1, torch.ones(1, 2),
                      torch.ones(1, dtype=torch.bool))  # fmt: skip
    assert R.bad_score(other, None) == ""  # a process whose own scores were fine stops with the warning


# ---- names (issue 19, item 5)
def _fake_stages(monkeypatch):
    """api.sft / api.reward that register a handle at once and count their calls (no model, no training)."""
    from rlhf_magic import api
    from rlhf_magic.engine.handles import PolicyHandle
    from rlhf_magic.engine.reward_model import RewardHandle

    calls = []

    def stage(cls, kind):
        def run(name, *, config, session):
            calls.append((kind, name))
            handle = cls.__new__(cls)
            handle.name, handle.stage, handle.parents = name, kind, ()
            return session.add(handle)

        return run

    monkeypatch.setattr(api, "sft", stage(PolicyHandle, "sft"))
    monkeypatch.setattr(api, "reward", stage(RewardHandle, "reward"))
    return calls


def _refused(ip, capsys, cell, message):
    names, handles = dict(ip.user_ns), list(ip.user_ns["rlhf"])
    capsys.readouterr()
    res = ip.run_cell(cell)
    err = capsys.readouterr().err
    assert not res.success and err.strip() == f"UsageError: {message}", err
    assert ip.user_ns.keys() == names.keys() and all(ip.user_ns[k] is v for k, v in names.items() if k != "_")
    assert list(ip.user_ns["rlhf"]) == handles


def test_a_name_never_overwrites_a_notebook_variable(ip, capsys, monkeypatch):
    calls = _fake_stages(monkeypatch)
    ip.user_ns.update(prompts=["Say hi."], pairs=[{"prompt": "p", "response": "r"}], answers=[["a", "b"]])
    msg = "prompts is already a notebook variable (a list); choose another name or `del prompts` first"
    _refused(ip, capsys, "%%sft prompts\nmodel = 'tiny'\ndata = pairs\n", msg)
    _refused(ip, capsys, '%rank pairs prompts=prompts responses=answers file="p.jsonl"',
             "pairs is already a notebook variable (a list); choose another name or `del pairs` first")  # fmt: skip
    _refused(ip, capsys, "%%sft rlhf\nmodel = 'tiny'\n", "%%sft 'rlhf': the result name must be a Python identifier "
             "(not 'rlhf')")  # fmt: skip
    assert calls == []  # refused before any work


def _printed(capsys):
    """What the magic printed (the cell's Out[...] display left out)."""
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("Out[")]


def test_replacing_a_result_says_so_and_another_kind_is_refused(ip, capsys, monkeypatch):
    calls = _fake_stages(monkeypatch)
    ip.user_ns["pairs"] = [{"prompt": "p", "response": "r"}]
    sft_cell, reward_cell = "%%sft {}\nmodel = 'tiny'\ndata = pairs\n", "%%reward {}\nmodel = 'tiny'\ndata = pairs\n"
    assert ip.run_cell(sft_cell.format("sft0")).success and _printed(capsys) == []
    first = ip.user_ns["sft0"]
    assert ip.run_cell(sft_cell.format("sft0")).success
    assert _printed(capsys) == ["sft0: replaces the earlier policy sft0"] and ip.user_ns["sft0"] is not first
    assert ip.run_cell(reward_cell.format("rm0")).success
    msg = "rm0 is already a reward model; choose another name for the policy, or `del rm0` first"
    _refused(ip, capsys, sft_cell.format("rm0"), msg)
    ip.run_cell("del rm0")  # gone from the notebook (still in `rlhf`): now it may be replaced, and that is said
    capsys.readouterr()
    assert ip.run_cell(sft_cell.format("rm0")).success
    assert _printed(capsys) == ["rm0: replaces the earlier reward model rm0"]
    assert ip.user_ns["rlhf"]["rm0"].stage == "sft" and len(calls) == 4


def test_rank_never_shadows_a_result(ip, capsys, monkeypatch, tmp_path):
    _fake_stages(monkeypatch)
    ip.user_ns.update(ps=["Say hi."], answers=[["a", "b"]], pairs=[{"prompt": "p", "response": "r"}])
    assert ip.run_cell("%%sft base\nmodel = 'tiny'\ndata = pairs\n").success
    rank = f'%rank {{}} prompts=ps responses=answers file="{tmp_path / "p.jsonl"}"'
    msg = ("%rank base: base is a policy of this session, and a ranking panel of that name would hide it from "
           "%compare; choose another name, e.g. base_panel")  # fmt: skip
    _refused(ip, capsys, rank.format("base"), msg)
    ip.run_cell("del base")
    _refused(ip, capsys, rank.format("base"), msg)  # the session still has it: %compare base would find the panel
    _refused(ip, capsys, rank.format("rlhf"), "%rank 'rlhf': the result name must be a Python identifier (not 'rlhf')")
    assert ip.run_cell(rank.format("prefs_once")).success and _printed(capsys) == []
    assert ip.run_cell(rank.format("prefs_once")).success
    assert _printed(capsys) == ["prefs_once: replaces the earlier ranking panel prefs_once"]
