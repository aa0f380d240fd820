"""Prompt sets: the training captions (duplicated / not, from the ground truth) and external prompt files.

External files are read as the literature ships them (../shared/data/prompts): one prompt per line (.txt),
JSON lines with a `caption` (or `prompt`/`text`) field (.jsonl), or CSV with `,` or `;` separators and a
`Caption`/`caption`/`prompt`/`text` column (.csv). Extra columns (e.g. `type` VM/TM, `index`) are kept in
`meta`, so reports can split by them.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

PROMPT_COLUMNS = ("caption", "Caption", "prompt", "Prompt", "text", "TEXT")
PROMPT_SETS = Path(__file__).resolve().parent / "prompt_sets"


def prompt_set(name: str) -> Path:
    """The path of a public prompt set shipped with memfilter (evaluation/prompt_sets, see its README)."""
    path = PROMPT_SETS / name
    if not path.is_file() or name == "README.md":
        known = sorted(p.name for p in PROMPT_SETS.iterdir() if p.name != "README.md")
        raise FileNotFoundError(f"sets:{name}: no such prompt set; known: {known}")
    return path


def load_prompt_file(path: str | Path, column: str | None = None, limit: int | None = None) -> list[dict]:
    """[{prompt, meta}] from a .txt, .jsonl or .csv file.

    Args:
        path: the file, or `sets:<name>` for a public set shipped with memfilter (`prompt_set`).
        column: the prompt column/field; default: the first of caption, Caption, prompt, Prompt, text, TEXT.
        limit: keep the first `limit` prompts. Default: all.
    """
    path = prompt_set(str(path)[5:]) if str(path).startswith("sets:") else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist (evaluation.prompt_files)")
    suffix = path.suffix.lower()
    rows: list[dict]
    if suffix == ".txt":
        rows = [{"prompt": line.strip(), "meta": {}} for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    elif suffix in (".jsonl", ".json"):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [_row(r, column, path) for r in records]
    elif suffix == ".csv":
        text = path.read_text(encoding="utf-8")
        delimiter = ";" if text.splitlines()[0].count(";") > text.splitlines()[0].count(",") else ","
        rows = [_row(r, column, path) for r in csv.DictReader(text.splitlines(), delimiter=delimiter)]
    else:
        raise ValueError(f"prompt file {path}: expected .txt, .jsonl or .csv")
    return rows[:limit] if limit else rows


def _row(record: dict, column: str | None, path: Path) -> dict:
    col = column or next((c for c in PROMPT_COLUMNS if c in record), None)
    if col is None or col not in record:
        raise ValueError(f"prompt file {path}: no prompt column (tried {column or PROMPT_COLUMNS}); "
                         f"columns are {sorted(record)}")
    meta = {k: v for k, v in record.items() if k != col and k}
    return {"prompt": str(record[col]).strip(), "meta": meta}


def training_prompts(samples: list[dict], max_duplicated: int | None = None, max_unique: int | None = None,
                     seed: int = 0) -> dict[str, list[dict]]:
    """Captions of the training set split by duplication ground truth.

    One prompt per duplicated group (its first caption) and one per non-duplicated item, each with its
    training key(s) in meta, sampled down to the limits with a fixed seed.

    Args:
        samples: training Samples (key, caption, meta.dup_group); images are not needed.
        max_duplicated: at most this many duplicated groups. Default: all.
        max_unique: at most this many non-duplicated items. Default: all.
        seed: sampling seed. Default 0.
    """
    groups: dict[int, dict] = {}
    unique = []
    for s in samples:
        g = int(s["meta"].get("dup_group", -1))
        if g >= 0:
            entry = groups.setdefault(g, {"prompt": s["caption"], "meta": {"dup_group": g, "keys": []}})
            entry["meta"]["keys"].append(s["key"])
        else:
            unique.append({"prompt": s["caption"], "meta": {"dup_group": -1, "keys": [s["key"]]}})
    rng = random.Random(seed)
    dup = list(groups.values())
    if max_duplicated is not None and len(dup) > max_duplicated:
        dup = rng.sample(dup, max_duplicated)
    if max_unique is not None and len(unique) > max_unique:
        unique = rng.sample(unique, max_unique)
    return {"duplicated": dup, "unique": unique}
