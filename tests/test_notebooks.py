"""Every example notebook runs top to bottom headless (nbclient), with live views updated in place, and every result
its text states holds on that run's own figures (on three seeds with RLHF_MAGIC_TUTORIAL_SEEDS=0,1,2). The labelling
notebooks, run with nobody at the panel, stop at the first cell that needs labels with one line saying so."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rlhf_magic.errors import NEED_LABELS

ROOT = Path(__file__).resolve().parent.parent
BOOKS = sorted((ROOT / "examples").glob("[0-9]*.ipynb"))

pytestmark = pytest.mark.slow

# Every notebook states results that depend on its random choices (SFT data order, sampled answers, simulated
# labelers, PPO samples), so its claims must hold on every seed. RLHF_MAGIC_TUTORIAL_SEEDS picks the seeds to run:
# `0,1,2` runs each notebook three times (about 45 minutes on 2 cores); the default, seed 0, keeps CI within its
# time. Seed 0 keeps the plain id (scripts/test.sh names `[03_ppo]`).
SEEDS = tuple(int(s) for s in os.environ.get("RLHF_MAGIC_TUTORIAL_SEEDS", "0").split(","))
CASES = [
    pytest.param(book, seed, id=book.stem if seed == 0 else f"{book.stem}-seed{seed}")
    for book in BOOKS
    for seed in SEEDS
]
FIGURES = "FIGURES "  # the first check cell prints the run's figures on one line (json), for the test log
LIVE = ("%%sft", "%%reward", "%%dpo", "%%ppo", "%%grpo")  # the cells whose live plot is updated in place
# Issue 20: the labelling notebooks' "before and after: did the SFT take?" cells. 02 and 05: "After SFT more answers
# end as a finished sentence and they are shorter"; 03 and 06: "After SFT the first sentence is shorter on average and
# more answers open with a short answer".
FINISHED_AND_SHORTER = (
    "assert after_done > before_done and after_words < before_words,"
    " (before_done, after_done, before_words, after_words)"
)
SHORTER_OPENING = (
    "assert after_first < before_first and after_short > before_short,"
    " (before_first, after_first, before_short, after_short)"
)

# The claims each tutorial's text makes, checked on the run itself (appended as extra cells before execution). The
# first cell prints the figures the claims rest on; each later cell asserts one claim (the sentence in the comment).
CHECKS = {
    "00_base_model_problem": [
        "_fig = {'base': before, 'sft': after, 'haiku_lines': len(haiku.strip().splitlines()),"
        " 'three_words': len(three_words.split())}",
        # the base model writes "a fragment, a heading like 'The answer is:', sometimes nothing at all"
        "assert any(b.strip() == '' or b.rstrip().endswith(':') for b in before), before",
        # "After SFT ... the list comes in the numbered format of the demonstrations"
        "assert all(f'{i}. ' in after[1] for i in (1, 2, 3)), after[1]",
        # "it names someone ...": no "nobody", no "I don't know"
        "assert not any(w in mars.lower() for w in ('nobody', 'no one', 'no human', 'not ', \"n't\")), mars",
        # README: "an ignored length request"
        "assert len(three_words.split()) != 3, three_words",
    ],
    "01_sft": [
        "_fig = {'train_loss': [losses[0], losses[-1]], 'eval_loss': [held[0], held[-1]], 'in_style': in_style,"
        " 'probs': probs, 'said': {k: dict(v) for k, v in said.items()}}",
        # "the training and held-out loss falling live"
        "assert losses[-1] < losses[0] and held[-1] < held[0], (losses, held)",
        # "It answers new questions in the house style it learned"; "30 were enough to teach a format"
        "assert in_style == len(new_questions), answers",
        # "probabilities are astronomically small" before, "millions of times more likely" after
        "assert max(probs['before SFT']) < 1e-6, probs",
        "assert all(a / b > 1e6 for a, b in zip(probs['after SFT'], probs['before SFT'])), probs",
        # "its samples name all kinds of cats" before SFT; "the samples split between Luna and Pepper" after
        "assert said['before SFT']['other'] > 8, said",
        "assert said['after SFT']['Luna'] > 0 and said['after SFT']['Pepper'] > 0, said",
    ],
    "02_label_preferences": [
        "_fig = {'pairs': len(pairs), 'rankings': len(prefs), 'agreement': {' vs '.join(k): v for k, v in"
        " agreement.by_labelers.items()}, 'rm_acc': [acc, low, high, n],"
        " 'sft_style': [before_done, after_done, before_words, after_words]}",
        FINISHED_AND_SHORTER,  # issue 20: SFT's before and after
        # "6 per ranking"
        "assert len(pairs) == 6 * len(prefs) > 0, (len(pairs), len(prefs))",
        # "Alice and Bob ... agree far more often than either does with Carol"
        "_rate = {frozenset(k): v for k, v in agreement.by_labelers.items()}\n"
        "_ab, _ac, _bc = (_rate[frozenset(('sim:' + a, 'sim:' + b))] for a, b in"
        " [('alice', 'bob'), ('alice', 'carol'), ('bob', 'carol')])\n"
        "assert _ab > 0.2 + max(_ac, _bc), _rate",
        # the held-out accuracy is printed with an interval over the 2 held-out prompts that contains it
        "assert n == 2 and low <= acc <= high, (acc, low, high, n)",
    ],
    "03_ppo": [
        "_m = ppo.metrics\n"
        "_cmp = rlhf_magic.compare(sft, ppo, held_out, reward=rm, max_new_tokens=ANSWER_TOKENS).mean_scores\n"
        "_fig = {'rm_acc': [acc, low, high, n_check], 'rm_train_acc': rm.accuracy, 'compare': _cmp,"
        " 'win': blind.win_rate().rate, 'sft_style': [before_first, after_first, before_short, after_short],"
        " **{k: _m[f'ppo/{k}'] for k in"
        " ('objective/scores', 'objective/kl', 'response/eos_rate', 'response/length')}}",
        SHORTER_OPENING,  # issue 20: SFT's before and after
        # the reward model is tested on the 12 rankings it never saw, and the interval printed with it contains it
        "assert n_check == len(rm_check) == 12 and low <= acc <= high, (acc, low, high, n_check)",
        # "score rising" (the dashboard); "PPO raised its score on its own answers (the table: first 3 steps ...)"
        "assert last(scores) > first(scores), scores",
        # "the SFT model rarely finishes an answer in time (watch the EOS rate: it starts low)"
        "assert first(eos) < 0.5, eos",
        # "PPO's answers end earlier and get shorter (EOS rate and length in the table)"
        "assert last(eos) > first(eos) and last(length) < first(length), (eos, length)",
    ],
    "04_kl_leash": [
        "_fig = {'final': final, 'unfinished': unfinished, 'mean_score': mean_score,"
        " 'free_scores': free.metrics['ppo/objective/scores']}",
        # "at kl_coef = 0 it ended with a higher score and a larger KL than at kl_coef = 1" (the frontier)
        "assert final['kl_coef = 0'][0] > final['kl_coef = 1'][0], final",
        "assert final['kl_coef = 0'][1] > final['kl_coef = 1'][1], final",
        # "reward hacking at kl_coef = 0: the score climbs"
        "assert tail(free.metrics['ppo/objective/scores']) > free.metrics['ppo/objective/scores'][0]",
        # "its answers are longer (a higher word score than the SFT model's) and more of them stop mid-sentence"
        "assert mean_score['kl_coef = 0'] > mean_score['sft'], mean_score",
        "assert unfinished['kl_coef = 0'] > unfinished['sft'], unfinished",
        # "at kl_coef = 1, less reward and fewer unfinished answers than at 0"
        "assert unfinished['kl_coef = 1'] < unfinished['kl_coef = 0'], unfinished",
    ],
    "05_whose_preferences": [
        "_fig = {'agreement': agreement.rate, 'accuracy': {' on '.join(k): v for k, v in accuracy.items()},"
        " 'lengths': lengths, 'sft_style': [before_done, after_done, before_words, after_words]}",
        FINISHED_AND_SHORTER,  # issue 20: SFT's before and after
        # "They disagree on most pairs"
        "assert agreement.rate < 0.5, agreement",
        # "rm_alice orders most of Alice's unseen pairs her way"
        "assert accuracy['rm_alice', 'alice'] > 0.5, accuracy",
        # "Alice's policy ends up writing shorter answers than the SFT model, and Bob's longer ones than Alice's"
        "assert lengths['ppo_alice'] < lengths['sft'], lengths",
        "assert lengths['ppo_bob'] > lengths['ppo_alice'], lengths",
    ],
    "06_dpo_grpo": [
        "_fig = {'tested': tested, 'mean_score': mean_score, 'chars': chars, 'words': words,"
        " 'seconds': dict(zip(needed['result'], needed['seconds'])), 'sampled': dict(zip(needed['result'],"
        " needed['answers sampled'])), 'memory': meter.cells, 'ppo': ppo.metrics['ppo/objective/scores'],"
        " 'grpo': grpo.metrics['grpo/reward'], 'dpo': dpo.metrics.summary,"
        " 'sft_style': [before_first, after_first, before_short, after_short]}",
        SHORTER_OPENING,  # issue 20: SFT's before and after
        # "one set of 28 SIMULATED rankings (168 comparisons)"
        "assert len(train_prefs) == 28 and len(train_prefs.to_pairs()) == 168, len(train_prefs)\n"
        "assert all(r['labeler'].startswith('sim:') for r in train_prefs.records)",
        # the reward model and DPO are tested on the 12 rankings neither saw, each with an interval that contains it
        "assert all(n == len(rm_check) == 12 and lo <= acc <= hi for acc, (lo, hi), n in tested.values()), tested",
        # "all three policies write shorter answers than the SFT model"
        "assert max(chars['ppo'], chars['dpo'], chars['grpo']) < chars['sft'], chars",
        # "PPO and GRPO went much further than DPO: their answers average fewer than 8 words, under half of DPO's"
        "assert max(chars['ppo'], chars['grpo']) < chars['dpo'] / 2, chars\n"
        "assert max(words['ppo'], words['grpo']) < 8 and max(words['ppo'], words['grpo']) < words['dpo'] / 2, words",
        # "the reward model scores them far above SFT's, while its score of DPO's answers stays closer to SFT's"
        "_gain = {k: mean_score[k] - mean_score['sft'] for k in ('ppo', 'dpo', 'grpo')}\n"
        "assert min(_gain['ppo'], _gain['grpo']) > max(abs(_gain['dpo']), 0.5), _gain",
        # "their reward rose on their dashboards" (the first 3 steps against the last 3)
        "_rose = lambda xs: sum(xs[-3:]) / 3 > sum(xs[:3]) / 3\n"
        "assert _rose(ppo.metrics['ppo/objective/scores']) and _rose(grpo.metrics['grpo/reward'])",
        # "PPO held four roles (policy, reference, reward model, value head), GRPO three (no value head), DPO two"
        "_roles = {h.name: models_in_memory(h) for h in (ppo, grpo, dpo)}\n"
        "assert [len(_roles[k]) for k in ('ppo', 'grpo', 'dpo')] == [4, 3, 2], _roles\n"
        "assert 'value head' in _roles['ppo'] and 'value head' not in _roles['grpo'], _roles\n"
        "assert not any(r.startswith('reward') for r in _roles['dpo']), _roles",
        # "DPO ... learned offline" (the table: answers sampled)
        "assert dict(zip(needed['result'], needed['answers sampled']))['dpo'] == 0, needed",
    ],
}


def _execute(book: Path, tmp_path: Path, cells: list[str]):
    """Run a copy of `book` with `cells` appended in a scratch folder (files the tutorial writes, prefs.jsonl and
    runs/, never land in examples/). Returns (executed notebook, minutes, the CellExecutionError or None)."""
    import sys

    import nbformat
    from nbclient.exceptions import CellExecutionError

    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebooks import run

    nb = nbformat.read(book, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(code) for code in cells]
    source = tmp_path / "src" / book.name
    source.parent.mkdir()
    nbformat.write(nb, source)
    t0, failure = time.perf_counter(), None
    try:
        run(source, tmp_path, timeout=900)
    except CellExecutionError as e:
        failure = e
    return nbformat.read(tmp_path / book.name, as_version=4), (time.perf_counter() - t0) / 60, failure


def _outputs(executed, kind: str) -> list:
    return [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


@pytest.mark.parametrize(("book", "seed"), CASES)
def test_notebook_runs_without_error_cells(book, seed, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_MAGIC_HEADLESS", "1")
    monkeypatch.setenv("RLHF_MAGIC_TUTORIAL_SEED", str(seed))
    checks = CHECKS.get(book.stem, [])
    cells = [f"{checks[0]}\nimport json as _json\nprint({FIGURES!r} + _json.dumps(_fig, default=str))", *checks[1:]]
    executed, minutes, failure = _execute(book, tmp_path, cells if checks else [])
    figures = [o.text for o in _outputs(executed, "stream") if o.text.startswith(FIGURES)]
    print(f"\n{book.stem} seed {seed}: {minutes:.1f} min; {figures[0].strip() if figures else 'no figures'}")
    errors = _outputs(executed, "error")
    assert not errors and failure is None, errors[0].get("evalue") if errors else failure
    for cell in executed.cells:
        if cell.cell_type == "code" and cell.source.lstrip().startswith(LIVE):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert 1 <= len(images) <= 2, f"live plot not updated in place in {book.name}: {len(images)} images"


LABELLING = [b for b in BOOKS if "%rank " in b.read_text(encoding="utf-8")]  # notebooks with a ranking panel


@pytest.mark.parametrize("book", LABELLING, ids=[b.stem for b in LABELLING])
def test_labelling_notebook_with_nobody_labelling_stops_in_one_line(book, tmp_path, monkeypatch):
    """ "Run All" with nobody at the panel (not headless: no simulated labeler ranks anything) stops at the first cell
    that needs labels, `%%reward`, with one line saying to rank the answers first: no traceback, no KeyError."""
    monkeypatch.delenv("RLHF_MAGIC_HEADLESS", raising=False)
    executed, _, failure = _execute(book, tmp_path, [])
    assert failure is not None, "the notebook ran to the end with nobody labelling"
    ran = [c for c in executed.cells if c.cell_type == "code" and c.get("execution_count") is not None]
    stopped = ran[-1]
    assert stopped.source.startswith("%%reward"), f"stopped at {stopped.source[:60]!r}, not at the %%reward cell"
    assert not _outputs(executed, "error"), [o.get("traceback") for o in _outputs(executed, "error")]
    stderr = "".join(o.text for o in stopped.outputs if o.output_type == "stream" and o.name == "stderr")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert last.startswith("UsageError: ") and NEED_LABELS in last, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    after = executed.cells[executed.cells.index(stopped) + 1 :]
    assert not any(c.get("outputs") for c in after if c.cell_type == "code"), "cells ran after the one that stopped"
