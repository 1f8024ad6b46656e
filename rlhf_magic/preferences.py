"""Preference labels: K-way rankings (and prompt/chosen/rejected pairs) -> pairs, datasets, DataFrames.

On disk (JSONL, one record a line, append-only) a ranking record is::

    {"kind": "ranking", "id": "3f2a...", "prompt": "...", "responses": ["...", ...],
     "ranking": [0, [1, 2], 3], "labeler": "ann", "time": "2025-01-01T12:00:00+00:00",
     "flags": ["all_bad"], "comment": "", "policy": "sft", "replaces": null}

`ranking` lists answer indices best first; a nested list is a group of tied answers. A prompt flagged "all
answers are bad or unsafe" may have `"ranking": null` (no ranking). Undo appends
`{"kind": "retraction", "id": ..., "retracts": "<id>"}`; a ranking with `"replaces": "<id>"` supersedes an
earlier one (re-labelling after Back). Pair records (`prompt`, `chosen`, `rejected`) are read as rankings of two.
Tables show rankings in the panel's letters ("B > A > C = D"), and read them back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import Agreement, agreement
from .errors import NEED_LABELS, DataError
from .tables import HISTORY_COLUMNS, LETTERS, groups_of, history_rows, ranking_text, table

RANKING, RETRACTION = "ranking", "retraction"
ALL_BAD = "all_bad"  # the panel's flag: "all answers are bad or unsafe"
RECORD_FORMATS = "ranking records (prompt/responses/ranking) or pairs (prompt/chosen/rejected)"
COLUMNS = ("prompt", "ranking", "flags", "comment", "labeler", "time", "responses", "policy", "id")  # to_pandas()
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


def _from_text(text: str, where: str) -> Any:
    """A ranking kept as text: JSON ('[1, [0, 2]]', 'null') or letters ('B > A = C'; '' is no ranking)."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    groups = [[tok.strip().upper() for tok in part.split("=")] for part in text.split(">")]
    if not all(len(t) == 1 and t in LETTERS for g in groups for t in g):
        raise DataError(
            f"{where}: ranking {text!r} is not a list of answer indices, nor letters best first such as 'B > A = C'"
        )
    return format_ranking([[LETTERS.index(t) for t in g] for g in groups])


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
    flags = rec.get("flags") or []
    if not isinstance(flags, list):
        raise DataError(f"{where}: flags must be a list of strings")
    ranking = rec["ranking"]
    if isinstance(ranking, str):  # Dataset rows and CSV cells hold JSON text; to_pandas() tables hold letters
        ranking = _from_text(ranking, where)
    if ranking in (None, []) and flags:  # flagged "all answers are bad or unsafe": no ranking needed
        return {**rec, "kind": RANKING, "ranking": None, "flags": flags}
    if ranking is None:
        raise DataError(f"{where}: the ranking is missing; only a flagged prompt (flags: [{ALL_BAD!r}]) may have none")
    groups = parse_ranking(ranking, len(responses), where)
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


def apply_log(entries: Sequence[tuple[str, dict]], log: list[dict] | None = None) -> list[dict]:
    """Checked ranking records, with retracted and replaced ones removed (file order kept). `log`, when given,
    receives every checked record in file order, retractions included (for `Preferences.history`)."""
    active: dict[int, dict] = {}
    by_id: dict[str, int] = {}
    for pos, (where, rec) in enumerate(entries):
        if record_kind(rec, where) == RETRACTION:
            target = by_id.pop(rec["retracts"], None)
            if target is None:
                warnings.warn(f"{where}: retracts {rec['retracts']!r}, which is not an active record", stacklevel=3)
            else:
                del active[target]
            if log is not None:
                log.append(rec)
            continue
        norm = normalize(rec, where)
        old = norm.get("replaces")
        if isinstance(old, str) and old in by_id:
            del active[by_id.pop(old)]
        active[pos] = norm
        if isinstance(norm.get("id"), str):
            by_id[norm["id"]] = pos
        if log is not None:
            log.append(norm)
    return list(active.values())


class Preferences:
    """Ranked answers (retractions applied): `.ranked()`, `.to_pairs()`, `.to_dataset()`, `.to_pandas()`,
    `.history()` and `.agreement()`. `log` keeps every record as written (replaced and undone ones too)."""

    def __init__(self, records: Sequence[dict] = (), source: str | None = None, log: Sequence[dict] | None = None):
        self.records: list[dict] = list(records)
        self.source = source
        self.log: list[dict] = list(self.records if log is None else log)

    @classmethod
    def from_records(cls, records: Any, *, allow_empty: bool = False, source: str | None = None) -> Preferences:
        """Ranking records, retractions and/or prompt/chosen/rejected pairs (list, DataFrame, Dataset)."""
        from .data import read_records

        if isinstance(records, Preferences):
            return cls(records.records, records.source, records.log)
        if isinstance(records, (str, Path)):
            return cls.load(records, allow_empty=allow_empty)
        raw = read_records(records, "preferences")
        log: list[dict] = []
        prefs = cls(apply_log([(f"record {i}", r) for i, r in enumerate(raw)], log), source, log)
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
        log: list[dict] = []
        prefs = cls(apply_log(entries, log), str(path), log)
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
                groups=groups_of(r),
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
        more = Preferences.from_records(other, allow_empty=True)
        return Preferences(self.records + more.records, log=self.log + more.log)

    @property
    def labelers(self) -> list[str]:
        return sorted({str(r.get("labeler") or "") for r in self.records})

    @property
    def flagged(self) -> int:
        """How many ranked prompts are flagged (e.g. "all answers are bad or unsafe")."""
        return sum(bool(r.get("flags")) for r in self.records)

    def without_flagged(self) -> Preferences:
        """These preferences less the flagged prompts (what `to_pairs()` and `%%reward` learn from by default)."""
        return Preferences([r for r in self.records if not r.get("flags")], self.source, self.log)

    def to_pairs(self, *, include_flagged: bool = False) -> list[dict[str, str]]:
        """Every strictly ordered answer pair: C(K, 2) per prompt without ties. Keys: prompt, chosen, rejected.
        Flagged prompts are left out, with a warning saying how many, unless `include_flagged`."""
        return self._pairs(include_flagged, "to_pairs", warn=True)

    def _pairs(self, include_flagged: bool, caller: str, warn: bool) -> list[dict[str, str]]:
        left_out = 0 if include_flagged else self.flagged
        if left_out and warn:
            warnings.warn(
                f"{caller}: left out {left_out} flagged prompt(s) (all answers bad or unsafe); "
                f"include_flagged=True keeps those with a ranking",
                stacklevel=3,
            )
        source = self if include_flagged else self.without_flagged()
        return [
            {"prompt": item.prompt, "chosen": item.responses[b], "rejected": item.responses[w]}
            for item in source.ranked()
            for b, w in item.pairs()
        ]

    def rows(self, pairs: bool = False) -> list[dict[str, Any]]:
        """One dict per ranked prompt (rankings as indices), or pairs as in `to_pairs()`."""
        if pairs:
            return self.to_pairs()
        return [{k: r.get(k) for k in COLUMNS} for r in self.records]

    def to_pandas(self, pairs: bool = False, *, include_flagged: bool = False) -> Any:
        """One row per ranked prompt, rankings in the panel's letters ('B > A > C = D'), or one per pair with
        `pairs=True` (flagged prompts left out as in `to_pairs()`). A notebook shows every text in full, wrapped.
        No rankings give an empty table with the same columns."""
        if pairs:
            return table(self._pairs(include_flagged, "to_pandas", warn=True), PAIR_COLUMNS)
        rows = [{**r, "ranking": ranking_text(groups_of(r)), "comment": r["comment"] or ""} for r in self.rows()]
        return table(rows, COLUMNS)

    def to_dataset(self, pairs: bool = False, *, include_flagged: bool = False) -> Any:
        """A `datasets.Dataset`: one row per ranked prompt (rankings as JSON text of indices), or
        prompt/chosen/rejected rows with `pairs=True` (flagged prompts left out as in `to_pairs()`)."""
        import datasets

        rows = self._pairs(include_flagged, "to_dataset", warn=True) if pairs else self.rows()
        if not rows:  # the same columns, no rows
            return datasets.Dataset.from_dict({c: [] for c in (PAIR_COLUMNS if pairs else COLUMNS)})
        if not pairs:
            rows = [{**r, "ranking": json.dumps(r["ranking"])} for r in rows]  # ragged nesting -> JSON text
        return datasets.Dataset.from_list(rows)

    def history(self, prompt: str | None = None) -> Any:
        """A table of what happened to `prompt` (every prompt if None): saved, replaced and undone rankings, in
        file order, each with its time, labeler, ranking (letters), flags and comment."""
        rows = history_rows(self.log)
        if prompt is not None:
            rows = [r for r in rows if r["prompt"] == prompt]
            if not rows:
                raise DataError(
                    f"history: no ranking of prompt {str(prompt)[:60]!r} in these preferences; give one of the "
                    f"prompts in .to_pandas()['prompt'], or no prompt for every one"
                )
        return table(rows, HISTORY_COLUMNS)

    def agreement(self) -> Agreement:
        """Pairwise agreement between labelers on prompts several of them ranked, with a 95% interval and the
        prompts they disagree on most (see `rlhf_magic.agreement`)."""
        return agreement(self.ranked())

    def __repr__(self) -> str:
        ks = sorted({len(r["responses"]) for r in self.records})
        k = "" if not ks else f", K={ks[0]}" if len(ks) == 1 else f", K={ks[0]}..{ks[-1]}"
        flagged = f" ({self.flagged} flagged, left out)" if self.flagged else ""
        return (
            f"Preferences({len(self)} ranked prompts{k}, {len(self._pairs(False, '', warn=False))} pairs{flagged}, "
            f"labelers: {', '.join(self.labelers) or 'none'})"
        )


def load_preferences(path: str | Path, *, allow_empty: bool = False) -> Preferences:
    """Read a preferences file (the panel's JSONL, or pair files in prompt/chosen/rejected form)."""
    return Preferences.load(path, allow_empty=allow_empty)
