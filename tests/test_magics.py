"""The extension through a real InteractiveShell: load, %%sft, the session, errors, unload/reload."""

from __future__ import annotations

import subprocess
import sys

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

    config_cls = getattr(config, cls)
    doc = ip.find_line_magic(magic).__doc__
    assert doc.startswith(f"%{magic} ") and config_cls.__doc__ in doc
    for name, text in config.field_help(config_cls).items():
        assert f"  {name:<20} {text}" in doc, name
    assert len(config.field_help(config_cls)) == len(dataclasses.fields(config_cls))
    shown = ip.object_inspect_text(f"%{magic}")  # what `%rank?` / `%compare?` print
    assert all(f.name in shown for f in dataclasses.fields(config_cls))
