"""Data coercion: lists of dicts, DataFrames, `datasets.Dataset`s and files -> plain records -> chats.

No torch here; the tokenization of chats lives in `engine/text.py`.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
SFT_FORMATS = "prompt/response (or prompt/completion), chat `messages`, or instruction/input/output"


def read_records(data: Any, what: str = "data") -> list[dict]:
    """Any supported container -> list of dicts. Raises DataError naming what was wrong."""
    if data is None:
        raise DataError(f"{what} is required: pass a list of dicts, a DataFrame, a datasets.Dataset or a file path")
    if isinstance(data, (str, Path)):
        return read_file(Path(data), what)
    if hasattr(data, "to_records") and callable(data.to_records) and hasattr(data, "columns"):  # pandas
        return [dict(r) for r in data.to_dict(orient="records")]
    if hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        return list(data.to_list())
    if hasattr(data, "records") and isinstance(data.records, list):  # Preferences and similar
        return [dict(r) for r in data.records]
    if isinstance(data, Mapping):
        raise DataError(f"{what} is a single dict; wrap it in a list: [{{...}}]")
    if isinstance(data, Sequence):
        out = []
        for i, r in enumerate(data):
            if not isinstance(r, Mapping):
                raise DataError(f"{what}[{i}] is a {type(r).__name__}, not a dict; each record needs named fields")
            out.append(dict(r))
        return out
    raise DataError(
        f"{what} of type {type(data).__name__} is not supported; pass a list of dicts, a DataFrame, "
        f"a datasets.Dataset or a .jsonl/.json/.csv path"
    )


def read_file(path: Path, what: str = "data") -> list[dict]:
    if not path.exists():
        raise DataError(f"{what} = {str(path)!r}: no such file (relative paths start at {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{what} = {str(path)!r}: unsupported file type; use .jsonl, .json or .csv")
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return _read_jsonl(text, path)
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return read_records(obj, str(path))
    if suffix == ".txt":
        return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    return [dict(r) for r in csv.DictReader(text.splitlines())]


def _read_jsonl(text: str, path: Path) -> list[dict]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: skipped a torn last line {i} (an interrupted write)", stacklevel=3)
                continue
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object")
        out.append(rec)
    return out


def to_chat(rec: dict, i: int) -> list[dict[str, str]]:
    """One SFT record -> chat messages ending with the assistant answer that is trained on."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs
        ):
            raise DataError(f"record {i}: `messages` must be a list of {{'role', 'content'}} dicts")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"record {i}: `messages` has no assistant turn to learn from")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    if "instruction" in rec and "output" in rec:
        user = str(rec["instruction"])
        if rec.get("input"):
            user = f"{user}\n\n{rec['input']}"
        return _pair(user, rec["output"], i)
    answer_key = next((k for k in ("response", "completion", "answer") if k in rec), None)
    if "prompt" in rec and answer_key:
        return _pair(rec["prompt"], rec[answer_key], i)
    raise DataError(f"record {i} has fields {sorted(rec)}; expected {SFT_FORMATS}")


def _pair(prompt: Any, answer: Any, i: int) -> list[dict[str, str]]:
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise DataError(f"record {i}: prompt and answer must be strings")
    if not answer.strip():
        raise DataError(f"record {i}: the answer is empty")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def sft_chats(data: Any) -> list[list[dict[str, str]]]:
    records = read_records(data)
    if not records:
        raise DataError(f"data is empty; give at least one example with {SFT_FORMATS}")
    return [to_chat(r, i) for i, r in enumerate(records)]


def read_prompts(data: Any, what: str = "prompts") -> list[str]:
    """Prompts for sampling: a list of strings, records with `prompt`, or a file."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and all(isinstance(p, str) for p in data):
        prompts = list(data)
    else:
        recs = read_records(data, what)
        if recs and "prompt" not in recs[0]:
            raise DataError(f"{what}: records have fields {sorted(recs[0])}; expected a `prompt` field")
        prompts = [str(r["prompt"]) for r in recs]
    if not prompts:
        raise DataError(f"{what} is empty; give at least one prompt")
    if any(not p.strip() for p in prompts):
        raise DataError(f"{what}: prompt {next(i for i, p in enumerate(prompts) if not p.strip())} is empty")
    return prompts
