"""Preference labels: K-way rankings (and prompt/chosen/rejected pairs) -> pairs, datasets, DataFrames.

On disk (JSONL, one record a line, append-only) a ranking record is::

    {"kind": "ranking", "id": "3f2a...", "prompt": "...", "responses": ["...", ...],
     "ranking": [0, [1, 2], 3], "labeler": "ann", "time": "2025-01-01T12:00:00+00:00",
     "flags": ["all_bad"], "comment": "", "policy": "sft", "replaces": null}

`ranking` lists answer indices best first; a nested list is a group of tied answers. Undo appends
`{"kind": "retraction", "id": ..., "retracts": "<id>"}`; a ranking with `"replaces": "<id>"` supersedes an
earlier one (re-labelling after Back). Pair records (`prompt`, `chosen`, `rejected`) are read as rankings of two.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NEED_LABELS, DataError

RANKING, RETRACTION = "ranking", "retraction"
RECORD_FORMATS = "ranking records (prompt/responses/ranking) or pairs (prompt/chosen/rejected)"
COLUMNS = ("prompt", "responses", "ranking", "labeler", "time", "flags", "comment", "policy", "id")  # to_pandas()
PAIR_COLUMNS = ("prompt", "chosen", "rejected")  # to_pandas(pairs=True), to_pairs()


@dataclass(frozen=True)
class Ranked:
    """One ranked prompt: `groups` are answer indices best first, tied answers share a group."""

    prompt: str
    responses: list[str]
    groups: list[list[int]]
    labeler: str = ""
    flags: list[str] = field(default_factory=list)
    comment: str = ""
    policy: str | None = None
    time: str = ""
    id: str = ""

    def __getitem__(self, key: str) -> Any:  # dict-style access for code that treats items as records
        return getattr(self, key)

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(better, worse) index pairs; tied answers give no pair."""
        for gi, better in enumerate(self.groups):
            for worse_group in self.groups[gi + 1 :]:
                for b in better:
                    for w in worse_group:
                        yield b, w


def parse_ranking(ranking: Any, k: int, where: str) -> list[list[int]]:
    """A ranking (best first, tie groups nested, e.g. [0, [1, 2], 3]) -> groups; checks it is a partition of K."""
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Sequence):
        raise DataError(f"{where}: ranking must be a list of answer indices best first, got {ranking!r}")
    groups: list[list[int]] = []
    for item in ranking:
        group = list(item) if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) else [item]
        if not group:
            raise DataError(f"{where}: ranking {ranking!r} has an empty tie group")
        for idx in group:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise DataError(f"{where}: ranking {ranking!r}: {idx!r} is not an answer index")
        groups.append(group)
    flat = [i for g in groups for i in g]
    bad = [i for i in flat if not 0 <= i < k]
    if bad:
        raise DataError(f"{where}: ranking {ranking!r}: index {bad[0]} is out of range for {k} answers (0..{k - 1})")
    dupes = sorted({i for i in flat if flat.count(i) > 1})
    if dupes:
        raise DataError(f"{where}: ranking {ranking!r} names answer {dupes[0]} twice")
    if len(flat) != k:
        missing = sorted(set(range(k)) - set(flat))
        raise DataError(f"{where}: ranking {ranking!r} is incomplete: answers {missing} are not ranked")
    return groups


def format_ranking(groups: Sequence[Sequence[int]]) -> list[Any]:
    """Groups -> the canonical on-disk form: an int for a lone answer, a sorted list for a tie."""
    return [g[0] if len(g) == 1 else sorted(g) for g in groups]


def record_kind(rec: dict, where: str) -> str:
    """'ranking', 'retraction' or 'pair'; anything else is a foreign record (DataError)."""
    kind = rec.get("kind")
    if kind == RETRACTION and isinstance(rec.get("retracts"), str):
        return RETRACTION
    if kind in (None, RANKING) and {"prompt", "responses", "ranking"} <= rec.keys():
        return RANKING
    if kind in (None, "pair") and {"prompt", "chosen", "rejected"} <= rec.keys():
        return "pair"
    fields = ", ".join(sorted(rec)) or "none"
    raise DataError(f"{where}: not a preference record (fields: {fields}); expected {RECORD_FORMATS}")


def normalize(rec: dict, where: str) -> dict:
    """A ranking or pair record -> a checked ranking record in canonical form (extra fields kept)."""
    if record_kind(rec, where) == "pair":
        base = {k: v for k, v in rec.items() if k not in ("chosen", "rejected")}
        rec = {**base, "kind": RANKING, "responses": [rec["chosen"], rec["rejected"]], "ranking": [0, 1]}
    prompt, responses = rec["prompt"], rec["responses"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: the prompt must be a non-empty string")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: responses must be a list of strings")
    if len(responses) < 2:
        raise DataError(f"{where}: a ranking needs at least 2 answers, got {len(responses)}")
    ranking = rec["ranking"]
    if isinstance(ranking, str):  # Dataset rows (to_dataset) and CSV cells keep nested rankings as JSON text
        try:
            ranking = json.loads(ranking)
        except json.JSONDecodeError:
            raise DataError(f"{where}: ranking {ranking!r} is not a list of answer indices") from None
    groups = parse_ranking(ranking, len(responses), where)
    flags = rec.get("flags") or []
    if not isinstance(flags, list):
        raise DataError(f"{where}: flags must be a list of strings")
    return {**rec, "kind": RANKING, "ranking": format_ranking(groups), "flags": flags}


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each line. Torn lines (a record cut short by a crash) are skipped with a warning."""
    text = path.read_text(encoding="utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{path.name}, line {n}"
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if line.lstrip().startswith("{"):
                warnings.warn(f"{where}: skipped a torn record (an interrupted write); others kept", stacklevel=3)
                continue
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    return out


def apply_log(entries: Sequence[tuple[str, dict]]) -> list[dict]:
    """Checked ranking records, with retracted and replaced ones removed (file order kept)."""
    active: dict[int, dict] = {}
    by_id: dict[str, int] = {}
    for pos, (where, rec) in enumerate(entries):
        if record_kind(rec, where) == RETRACTION:
            target = by_id.pop(rec["retracts"], None)
            if target is None:
                warnings.warn(f"{where}: retracts {rec['retracts']!r}, which is not an active record", stacklevel=3)
            else:
                del active[target]
            continue
        norm = normalize(rec, where)
        old = norm.get("replaces")
        if isinstance(old, str) and old in by_id:
            del active[by_id.pop(old)]
        active[pos] = norm
        if isinstance(norm.get("id"), str):
            by_id[norm["id"]] = pos
    return list(active.values())


class Preferences:
    """Ranked answers (retractions applied): `.ranked()`, `.to_pairs()`, `.to_dataset()`, `.to_pandas()`."""

    def __init__(self, records: Sequence[dict] = (), source: str | None = None):
        self.records: list[dict] = list(records)
        self.source = source

    @classmethod
    def from_records(cls, records: Any, *, allow_empty: bool = False, source: str | None = None) -> Preferences:
        """Ranking records, retractions and/or prompt/chosen/rejected pairs (list, DataFrame, Dataset)."""
        from .data import read_records

        if isinstance(records, Preferences):
            return cls(records.records, records.source)
        if isinstance(records, (str, Path)):
            return cls.load(records, allow_empty=allow_empty)
        raw = read_records(records, "preferences")
        prefs = cls(apply_log([(f"record {i}", r) for i, r in enumerate(raw)]), source)
        return prefs if allow_empty else prefs.require()

    @classmethod
    def load(cls, path: str | Path, *, allow_empty: bool = False) -> Preferences:
        """A .jsonl file written by the ranking panel (or any .jsonl/.json/.csv of rankings or pairs)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(
                f"preferences file {str(path)!r} does not exist: check the path, or where a ranking panel writes "
                f"it (on the first Submit), {NEED_LABELS}"
            )
        if path.suffix.lower() == ".jsonl":
            entries = read_jsonl(path)  # line numbers in errors; torn lines skipped
        else:
            from .data import read_records

            entries = [(f"{path.name}, record {i}", r) for i, r in enumerate(read_records(path, "preferences"))]
        prefs = cls(apply_log(entries), str(path))
        return prefs if allow_empty else prefs.require()

    def require(self) -> Preferences:
        """Self, or DataError when there is nothing to train on."""
        if not self.records:
            where = f" in {self.source}" if self.source else ""
            raise DataError(f"no preferences{where} yet: {NEED_LABELS} (or every ranking was retracted)")
        return self

    def ranked(self) -> list[Ranked]:
        return [
            Ranked(
                prompt=r["prompt"],
                responses=list(r["responses"]),
                groups=[g if isinstance(g, list) else [g] for g in r["ranking"]],
                labeler=str(r.get("labeler") or ""),
                flags=list(r.get("flags") or []),
                comment=str(r.get("comment") or ""),
                policy=r.get("policy"),
                time=str(r.get("time") or ""),
                id=str(r.get("id") or ""),
            )
            for r in self.records
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Ranked]:
        return iter(self.ranked())

    def __add__(self, other: Preferences) -> Preferences:
        return Preferences(self.records + Preferences.from_records(other, allow_empty=True).records)

    @property
    def labelers(self) -> list[str]:
        return sorted({str(r.get("labeler") or "") for r in self.records})

    def to_pairs(self, *, skip_flagged: bool = False) -> list[dict[str, str]]:
        """Every strictly ordered answer pair: C(K, 2) per prompt without ties. Keys: prompt, chosen, rejected."""
        out = []
        for item in self.ranked():
            if skip_flagged and item.flags:
                continue
            for b, w in item.pairs():
                out.append({"prompt": item.prompt, "chosen": item.responses[b], "rejected": item.responses[w]})
        return out

    def rows(self, pairs: bool = False) -> list[dict[str, Any]]:
        if pairs:
            return self.to_pairs()
        return [{k: r.get(k) for k in COLUMNS} for r in self.records]

    def to_pandas(self, pairs: bool = False) -> Any:
        """One row per ranked prompt (or per pair with `pairs=True`); no rankings give an empty table with the
        same columns."""
        import pandas as pd

        return pd.DataFrame(self.rows(pairs), columns=list(PAIR_COLUMNS if pairs else COLUMNS))

    def to_dataset(self, pairs: bool = False) -> Any:
        """A `datasets.Dataset`: one row per ranked prompt, or prompt/chosen/rejected rows with `pairs=True`."""
        import datasets

        rows = self.rows(pairs)
        if not rows:  # the same columns, no rows
            return datasets.Dataset.from_dict({c: [] for c in (PAIR_COLUMNS if pairs else COLUMNS)})
        if not pairs:
            rows = [{**r, "ranking": json.dumps(r["ranking"])} for r in rows]  # ragged nesting -> JSON text
        return datasets.Dataset.from_list(rows)

    def agreement(self) -> Agreement:
        """Pairwise agreement between labelers on prompts several of them ranked (see `Agreement`)."""
        return agreement(self.ranked())

    def __repr__(self) -> str:
        ks = sorted({len(r["responses"]) for r in self.records})
        k = "" if not ks else f", K={ks[0]}" if len(ks) == 1 else f", K={ks[0]}..{ks[-1]}"
        return (
            f"Preferences({len(self)} ranked prompts{k}, {len(self.to_pairs())} pairs, "
            f"labelers: {', '.join(self.labelers) or 'none'})"
        )


@dataclass(frozen=True)
class Agreement:
    """Pairwise agreement between labelers who ranked the same answers to the same prompt.

    For each prompt+answer set ranked by 2+ labelers, each answer pair and each two labelers who both ranked it
    is one comparison; they agree when both put the same answer first or both call it a tie. `rate` is
    agreed / compared (None when no prompt was ranked twice).
    """

    rate: float | None
    compared: int
    agreed: int
    prompts: int
    by_labelers: dict[tuple[str, str], float]

    def __repr__(self) -> str:
        if self.rate is None:
            return "Agreement(no prompt was ranked by two labelers on the same answers)"
        pairs = ", ".join(f"{a}~{b}: {v:.0%}" for (a, b), v in self.by_labelers.items())
        return f"Agreement({self.rate:.1%} of {self.compared} comparisons on {self.prompts} prompts; {pairs})"


def load_preferences(path: str | Path, *, allow_empty: bool = False) -> Preferences:
    """Read a preferences file (the panel's JSONL, or pair files in prompt/chosen/rejected form)."""
    return Preferences.load(path, allow_empty=allow_empty)


def _relations(item: Ranked) -> dict[tuple[str, str], int]:
    """For each two different answer texts (sorted): -1 if the first is better, 1 if worse, 0 for a tie."""
    pos = {i: g for g, group in enumerate(item.groups) for i in group}
    out: dict[tuple[str, str], int] = {}
    for i, j in itertools.combinations(range(len(item.responses)), 2):
        ti, tj = item.responses[i], item.responses[j]
        if ti == tj:
            continue
        (a, pa), (b, pb) = sorted([(ti, pos[i]), (tj, pos[j])])
        out.setdefault((a, b), (pa > pb) - (pa < pb))
    return out


def agreement(items: Sequence[Ranked]) -> Agreement:
    """See `Agreement`. A labeler's latest ranking of a prompt+answer set counts; answers are matched by text."""
    latest: dict[tuple[str, tuple[str, ...]], dict[str, dict[tuple[str, str], int]]] = {}
    for item in items:
        latest.setdefault((item.prompt, tuple(sorted(item.responses))), {})[item.labeler] = _relations(item)
    tally: dict[tuple[str, str], list[int]] = {}
    prompts = 0
    for by_labeler in latest.values():
        if len(by_labeler) < 2:
            continue
        prompts += 1
        for a, b in itertools.combinations(sorted(by_labeler), 2):
            ra, rb = by_labeler[a], by_labeler[b]
            counts = tally.setdefault((a, b), [0, 0])
            for pair in ra.keys() & rb.keys():
                counts[0] += ra[pair] == rb[pair]
                counts[1] += 1
    agreed, compared = sum(c[0] for c in tally.values()), sum(c[1] for c in tally.values())
    return Agreement(
        rate=agreed / compared if compared else None,
        compared=compared,
        agreed=agreed,
        prompts=prompts,
        by_labelers={k: c[0] / c[1] for k, c in tally.items() if c[1]},
    )
