"""Prompts for text-to-image GRPO from local files: one prompt per line of a text file, or a column of a local
table (CSV, TSV, JSON lines, a JSON list of records).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "prompts.csv"
    >>> _ = path.write_text('id,prompt\\n1,a red car\\n2,"a cat, on a tree"\\n')
    >>> load_prompts(path)
    ['a red car', 'a cat, on a tree']
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["TABLE_SUFFIXES", "load_prompts"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="," if path.suffix == ".csv" else "\t"))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: a JSON prompt file must hold a list of records, got {type(records).__name__}")
    return records


def load_prompts(source: str | Path | Sequence[str], column: str = "prompt") -> list[str]:
    """The prompts of ``source``: a list of strings (returned as it is), a text file (one prompt per non-empty
    line, stripped), or a table (:data:`TABLE_SUFFIXES`) whose ``column`` holds them. Raises FileNotFoundError
    for a missing file and ValueError for no prompts, a missing column or an empty prompt in a table."""
    if not isinstance(source, (str, Path)):
        prompts = [str(p) for p in source]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        if path.suffix in TABLE_SUFFIXES:
            records = _records(path)
            if records and column not in records[0]:
                raise ValueError(f"{path} has no column {column!r} (columns: {sorted(records[0])})")
            prompts = [str(r[column]).strip() for r in records]
            if any(not p for p in prompts):
                raise ValueError(f"{path}: column {column!r} has an empty prompt (row {prompts.index('') + 1})")
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {source!r}: a prompt file needs at least one non-empty line")
    return prompts
