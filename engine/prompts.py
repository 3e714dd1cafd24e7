"""Prompt files and a deterministic train/test split.

Formats (chosen by the file's suffix):
- ``.json``: HPDv2-style. Either a list of strings, or a list of objects each holding a
  ``"prompt"`` or a ``"caption"`` string field (``"prompt"`` is used when both are present).
  Anything else is an error naming the file and the offending entry.
- anything else: plain text (UTF-8), one prompt per line. Surrounding whitespace is stripped;
  blank lines and lines whose first non-blank character is ``#`` are skipped (a ``#`` later in
  a line is part of the prompt).

Blank prompts are skipped and duplicates are dropped (the first occurrence's position is kept):
HPDv2's training file lists each prompt once per image, and a prompt must not land on both
sides of the split.

The split ranks prompts by ``sha256(seed, prompt)``: the same seed and prompts give the same split
on every machine and Python version, independent of the file's order, and a prompt added to the
file moves at most one other prompt (the one at the cut-off) across the split.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["load_prompts", "split_prompts", "load_prompt_split"]

JSON_FIELDS = ("prompt", "caption")


def _dedupe(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(p for p in (q.strip() for q in prompts) if p))


def _from_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in prompt file {path}: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise ValueError(f"prompt file {path}: expected a JSON list of strings or of objects with a "
                         f"{' or '.join(repr(f) for f in JSON_FIELDS)} field, got a {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
            continue
        if isinstance(item, dict):
            for f in JSON_FIELDS:
                if isinstance(item.get(f), str):
                    out.append(item[f])
                    break
            else:
                raise ValueError(f"prompt file {path}: entry {i} has no string field "
                                 f"{' or '.join(repr(f) for f in JSON_FIELDS)} (keys: {sorted(item)[:8]})")
            continue
        raise ValueError(f"prompt file {path}: entry {i} is a {type(item).__name__}, expected a string or an object")
    return out


def _from_text(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text or JSON file (see the module docstring); never empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {e}") from None
    raw = _from_json(path, text) if path.suffix.lower() == ".json" else _from_text(text)
    prompts = _dedupe(raw)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _rank(seed: int, prompt: str) -> bytes:
    return hashlib.sha256(json.dumps([int(seed), prompt]).encode("utf-8")).digest()


def split_prompts(prompts: list[str], test_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test), both in the input's order. ``round(test_fraction * n)`` prompts (at least one
    when the fraction is positive) go to test; train must keep at least one."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    prompts = list(dict.fromkeys(prompts))
    n = len(prompts)
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
    if n_test >= n and n_test > 0:
        raise ValueError(f"test_fraction {test_fraction} of {n} prompt(s) leaves no training prompt")
    test = set(sorted(prompts, key=lambda p: _rank(seed, p))[:n_test])
    return [p for p in prompts if p not in test], [p for p in prompts if p in test]


def load_prompt_split(path: str | Path, test_fraction: float = 0.0, seed: int = 0) -> tuple[list[str], list[str]]:
    """``split_prompts(load_prompts(path), ...)`` with the file named in any split error."""
    prompts = load_prompts(path)
    try:
        return split_prompts(prompts, test_fraction, seed)
    except ValueError as e:
        raise ValueError(f"prompt file {path}: {e}") from None
