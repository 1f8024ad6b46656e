"""Cell text -> frozen config. The body is read with `ast`, never executed.

Each line is one assignment: `epochs = 2`, `lora.r = 8`, `data = my_pairs` (a notebook variable, also
`prefs.pairs` for an attribute), `data = "pairs.jsonl"` (a literal). Comments and blank lines are fine.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Mapping
from typing import Any

from .config import STAGES
from .errors import ConfigError, did_you_mean
from .validation import build_config

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_name(line: str, magic: str) -> str:
    """The result name on a `%%sft NAME` line."""
    name = line.strip()
    if not name:
        raise ConfigError(f"%%{magic} needs a result name, e.g. `%%{magic} my_{magic}`")
    if not _NAME.match(name) or name in {"rlhf", "True", "False", "None"}:
        raise ConfigError(f"%%{magic} {name!r}: the result name must be a Python identifier (not 'rlhf')")
    return name


def parse_body(body: str, namespace: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Read assignments from `body`. Returns (values by key, 'line N' by key)."""
    try:
        tree = ast.parse(body or "", mode="exec")
    except SyntaxError as e:
        raise ConfigError(
            f"line {e.lineno}: cannot read this setting ({e.msg}); write one `key = value` per line"
        ) from None
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for stmt in tree.body:
        line = f"line {stmt.lineno}"
        key = _target(stmt, line)
        if key in values:
            raise ConfigError(f"{line}: {key!r} is set twice (first on {where[key]})")
        values[key] = _value(stmt.value, key, line, namespace)  # type: ignore[attr-defined]
        where[key] = line
    return values, where


def _target(stmt: ast.stmt, line: str) -> str:
    if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
        raise ConfigError(f"{line}: only `key = value` lines are allowed in the cell body")
    t = stmt.targets[0]
    if isinstance(t, ast.Name):
        return t.id
    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
        return f"{t.value.id}.{t.attr}"
    raise ConfigError(f"{line}: the left side must be a setting name such as `epochs` or `lora.r`")


def _value(node: ast.expr, key: str, line: str, namespace: Mapping[str, Any]) -> Any:
    if isinstance(node, (ast.Name, ast.Attribute)):
        return _lookup(node, key, line, namespace)
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(
            f"{line}: {key} = {ast.unparse(node)} is not a literal or a notebook variable; "
            f"compute it in a code cell first and pass the variable"
        ) from None


def _lookup(node: ast.expr, key: str, line: str, namespace: Mapping[str, Any]) -> Any:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ConfigError(f"{line}: {key}: only variable names and literals are accepted")
    if node.id not in namespace:
        public = [k for k in namespace if not k.startswith("_")]
        raise ConfigError(
            f"{line}: {key} = {node.id}: no notebook variable named {node.id!r}"
            f"{did_you_mean(node.id, public)}; define it first or quote a path"
        )
    obj = namespace[node.id]
    for attr in reversed(parts):
        if not hasattr(obj, attr):
            raise ConfigError(f"{line}: {key}: {node.id} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


def parse_cell(stage: str, line: str, body: str, namespace: Mapping[str, Any]) -> tuple[str, Any]:
    """`%%sft NAME` + body -> (NAME, SFTConfig)."""
    name = parse_name(line, stage)
    values, where = parse_body(body, namespace)
    return name, build_config(STAGES[stage], values, where)


def parse_line_args(line: str, namespace: Mapping[str, Any], magic: str) -> tuple[list[str], dict[str, Any]]:
    """`%rank NAME policy=sft k=4 file="p.jsonl"` -> (["NAME"], {"policy": <obj>, "k": 4, "file": "p.jsonl"})."""
    try:
        tokens = shlex.split(line, posix=False)
    except ValueError as e:
        raise ConfigError(f"%{magic}: cannot split the line ({e})") from None
    positional: list[str] = []
    options: dict[str, Any] = {}
    for tok in tokens:
        if "=" not in tok:
            positional.append(tok)
            continue
        key, _, text = tok.partition("=")
        if not _NAME.match(key):
            raise ConfigError(f"%{magic}: {tok!r} is not key=value")
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError:
            raise ConfigError(f"%{magic}: {key}={text}: not a literal or a variable name") from None
        options[key] = _value(node, key, f"%{magic}", namespace)
    return positional, options
