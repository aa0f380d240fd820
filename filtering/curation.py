"""After the curation pass (filtering/curate.py): merge its parts and check them against the plan, gather evidence
per item, decide keep/drop, and write the keep-list.

Evidence per item: a sample's scores are averaged with every other sample of the same item (the same caption,
the same image by its pixel hash, and, given a manifest of launch/prepare.py, the same file by sha256 and the same
near-duplicate cluster); a sample's item score is the highest mean among its items of two or more samples (its own
score when it shares nothing). An image repeated under
different captions (Somepalli et al.'s image-only duplication) is then judged as one item, and a repeated item's
score averages out the noise of its draws.

Decisions (`decide.policy`), each on the item scores of the scored samples:
    top_fraction   drop the highest `fraction`
    threshold      drop item scores above `threshold`
    calibrated     the threshold at false-positive rate `fpr` on a reference set (`reference`: another pass's
                   output_dir or scores.parquet, scored on data known not to be memorized), or a calibration file's
                   overall threshold (`calibration`, memfilter-calibrate over a reference pass's `score` column)
    bucket         per timestep, the reference's threshold at fpr / T (T timesteps, a union bound), or the threshold
                   of the timestep's bucket in a calibration file: drop when any timestep's item mean is above its
                   threshold (needs score.timesteps to be a list)
Thresholds from a reference are filtering.calibration.fpr_threshold, the one definition training uses.
Samples whose caption matches `protect_captions` (intended memorization, Naseh et al. 2023) are never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from memfilter.filtering.calibration import fpr_threshold, load_calibration
from memfilter.filtering.curate import PARTS
from memfilter.filtering.settings import num_in, setting

DECISIONS = ("top_fraction", "threshold", "calibrated", "bucket")


@dataclass
class DecideArgs:
    """How scores become keep/drop (curate.yaml's `decide` block)."""

    policy: str = setting("calibrated", f"one of {', '.join(DECISIONS)}", lambda v: v in DECISIONS,
                          "how scores become keep/drop")
    fraction: float = setting(0.01, "a number in (0, 1)", num_in(0, 1, lo_open=True, hi_open=True),
                              "top_fraction: the share of samples dropped")
    threshold: float | None = setting(None, "null or a number", lambda v: v is None or isinstance(v, (int, float)),
                                      "threshold: drop item scores above it")
    fpr: float = setting(0.01, "a number in (0, 1)", num_in(0, 1, lo_open=True, hi_open=True),
                         "calibrated, bucket: the false-positive rate on the reference set")
    reference: str | None = setting(None, "null or a curation output_dir or scores.parquet",
                                    lambda v: v is None or isinstance(v, str),
                                    "calibrated, bucket: scores of data known not to be memorized")
    calibration: str | None = setting(None, "null or a calibration file (memfilter-calibrate)",
                                      lambda v: v is None or isinstance(v, str),
                                      "calibrated, bucket: thresholds from a calibration file instead of a reference")
    protect_captions: list = setting(must="a list of regular expressions", check=lambda v: isinstance(v, list),
                                     doc="captions never dropped (intended memorization)", factory=list)
    name: str | None = setting(None, "null or a folder name", lambda v: v is None or (isinstance(v, str) and v and
                                                                                      "/" not in v),
                               "the decisions' folder (decisions/<name>); null: the policy's name")

    def __post_init__(self):
        from memfilter.filtering.settings import check_settings
        check_settings(self, "decide.")
        if self.policy == "threshold" and self.threshold is None:
            raise ValueError("decide.policy=threshold needs decide.threshold=<number>")
        if self.policy in ("calibrated", "bucket") and not (self.reference or self.calibration):
            raise ValueError(f"decide.policy={self.policy} needs decide.reference=<a curation pass over data known "
                             "not to be memorized> or decide.calibration=<file>; or use decide.policy=top_fraction "
                             "or threshold")
        if self.reference and self.calibration:
            raise ValueError("decide.reference and decide.calibration both given: thresholds come from one of them")


# --- merge -----------------------------------------------------------------------------------------------------
def merge(out: Path, plan: dict) -> tuple[pd.DataFrame, dict]:
    """Every part of the pass in one frame, and its completeness against the plan."""
    parts = sorted((out / PARTS).glob("part-c*-r*.parquet"))
    by_chunk: dict[int, Path] = {}
    extra = []
    for p in parts:
        c = int(p.name.split("-")[1][1:])
        (extra.append(p.name) if c in by_chunk else by_chunk.__setitem__(c, p))
    frames = [pq.read_table(by_chunk[c]).to_pandas() for c in sorted(by_chunk)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["chunk", "key", "skip"])
    missing = sorted(set(range(plan["chunks"])) - set(by_chunk))
    counts = df.groupby("chunk").size().to_dict() if len(df) else {}
    short = _short_chunks(plan, counts)
    scored = df[df.skip.isna()]
    repeated = scored.key[scored.key.duplicated()].unique().tolist()
    skipped = df[df.skip.notna()]
    report = {
        "planned_chunks": plan["chunks"], "done_chunks": len(by_chunk), "missing_chunks": missing,
        "short_chunks": short, "extra_parts": extra, "samples": int(len(df)), "scored": int(len(scored)),
        "expected_samples": expected_samples(plan), "skipped": skipped.skip.value_counts().to_dict(),
        "unreadable": [{"key": k, "reason": r, "detail": d} for k, r, d in
                       skipped[["key", "skip", "skip_detail"]].head(1000).itertuples(index=False)],
        "keys_scored_twice": repeated[:1000],
    }
    report["complete"] = not missing and not short and not repeated and (
        report["expected_samples"] is None or report["samples"] == report["expected_samples"])
    return df, report


def expected_samples(plan: dict) -> int | None:
    if plan["kind"] == "map":
        return plan["size"]
    counts = plan.get("counts") or {}
    return sum(counts.get(u, 0) for u in plan["urls"]) if all(u in counts for u in plan["urls"]) else None


def _short_chunks(plan: dict, counts: dict) -> list[dict]:
    """Chunks whose part holds fewer rows than the chunk has samples (a map chunk's range, a shard's count)."""
    out = []
    for c, n in counts.items():
        if plan["kind"] == "map":
            want = min(plan["chunk_size"], plan["size"] - c * plan["chunk_size"])
        else:
            want = (plan.get("counts") or {}).get(plan["urls"][c])
        if want is not None and n != want:
            out.append({"chunk": int(c), "rows": int(n), "expected": int(want)})
    return out


# --- evidence per item -----------------------------------------------------------------------------------------
def timestep_matrix(scored: pd.DataFrame, timesteps: list | None, draws: int) -> np.ndarray:
    """[N, T] per-timestep means over the draws (T = 1 when each draw had its own timestep)."""
    m = np.stack(scored.magnitude.to_numpy()).astype(np.float64) if len(scored) else np.zeros((0, draws))
    t = len(timesteps) if timesteps else 1
    return m.reshape(len(m), draws, t).mean(axis=1)


def item_evidence(scored: pd.DataFrame, vectors: np.ndarray, manifest: pd.DataFrame | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Per sample: the item score, the item's per-timestep vector, the kind of item it was judged by, and the
    item's size (samples sharing it)."""
    kinds = {"caption": scored.caption_id.to_numpy(), "image": scored.image_id.to_numpy()}
    if manifest is not None:
        joined = scored[["key"]].merge(manifest, on="key", how="left")
        for col in ("sha256", "cluster"):
            if col in joined:
                kinds[col] = joined[col].fillna("").astype(str).to_numpy()
    best = np.full(len(scored), -np.inf)
    vec, size, by = vectors.copy(), np.ones(len(scored), int), ["sample"] * len(scored)
    for kind, ids in kinds.items():
        codes, inverse = np.unique(ids.astype(str), return_inverse=True)
        counts = np.bincount(inverse, minlength=len(codes))
        sums = np.zeros((len(codes), vectors.shape[1]))
        np.add.at(sums, inverse, vectors)
        means = sums / counts[:, None]
        score = means.mean(axis=1)[inverse]
        valid = ~np.isin(ids.astype(str), ["", "nan", "None"]) & (counts[inverse] >= 2)     # an item repeats
        better = valid & (score > best)
        best[better], vec[better], size[better] = score[better], means[inverse][better], counts[inverse][better]
        for i in np.nonzero(better)[0]:
            by[i] = kind
    no_item = ~np.isfinite(best)
    best[no_item] = vectors[no_item].mean(axis=1)
    return best, vec, by, size


# --- decisions -------------------------------------------------------------------------------------------------
def reference_scores(reference: str) -> pd.DataFrame:
    """The scored rows of a reference pass (its output_dir or its scores.parquet)."""
    path = Path(reference)
    path = path / "scores.parquet" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"decide.reference={reference!r}: no scores.parquet there; run memfilter-curate "
                                "on the reference data first and give its output_dir")
    df = pq.read_table(path).to_pandas()
    return df[df.skip.isna()]


def decide(args: DecideArgs, scored: pd.DataFrame, item_score: np.ndarray, item_vec: np.ndarray,
           timesteps: list | None, draws: int) -> tuple[np.ndarray, dict]:
    """[N] bool drop, and the thresholds used."""
    if args.policy == "top_fraction":
        k = int(np.ceil(args.fraction * len(item_score)))
        thr = float(np.sort(item_score)[::-1][k - 1]) if k else np.inf
        drop, info = item_score >= thr, {"threshold": thr}
    elif args.policy == "threshold":
        drop, info = item_score > args.threshold, {"threshold": float(args.threshold)}
    elif args.policy == "calibrated":
        thr, info = _overall_threshold(args)
        drop = item_score > thr
    else:
        if not timesteps:
            raise ValueError("decide.policy=bucket needs score.timesteps to be a list (per-timestep thresholds)")
        thr, info = _timestep_thresholds(args, timesteps, draws)
        drop = (item_vec > thr[None, :]).any(axis=1)
    if args.protect_captions:
        patterns = [re.compile(p, re.IGNORECASE) for p in args.protect_captions]
        protected = np.array([any(p.search(c or "") for p in patterns) for c in scored.caption], bool)
        drop &= ~protected
        info["protected"] = int(protected.sum())
    return np.asarray(drop, bool), info


def _overall_threshold(args: DecideArgs) -> tuple[float, dict]:
    if args.calibration:
        cal = load_calibration(args.calibration, "decide.calibration")
        return cal.threshold, {"threshold": cal.threshold, "calibration": args.calibration, "fpr": cal.fpr}
    ref = reference_scores(args.reference)
    thr = fpr_threshold(ref.score.to_numpy(np.float64), args.fpr)
    return thr, {"threshold": thr, "reference_samples": len(ref)}


def _timestep_thresholds(args: DecideArgs, timesteps: list, draws: int) -> tuple[np.ndarray, dict]:
    if args.calibration:
        cal = load_calibration(args.calibration, "decide.calibration")
        if not cal.bucket_thresholds:
            raise ValueError(f"decide.calibration={args.calibration}: no per-timestep thresholds in the file")
        thr = cal.thresholds_at(timesteps)
        info = {"calibration": args.calibration, "fpr": cal.fpr}
    else:
        ref = timestep_matrix(reference_scores(args.reference), timesteps, draws)
        thr = np.array([fpr_threshold(ref[:, j], args.fpr / len(timesteps)) for j in range(len(timesteps))])
        info = {"reference_samples": len(ref)}
    return thr, {"per_timestep": {int(t): float(v) for t, v in zip(timesteps, thr)}, **info}


def write_key_lists(out: Path, scored: pd.DataFrame, drop: np.ndarray) -> None:
    """keep.txt and drop.txt (one key per line), accepted by every training data source as data.keep_list."""
    (out / "keep.txt").write_text("".join(f"{k}\n" for k in scored.key[~drop]))
    (out / "drop.txt").write_text("".join(f"{k}\n" for k in scored.key[drop]))


def read_manifest(path: str | None) -> pd.DataFrame | None:
    """A manifest of launch/prepare.py (key, sha256 and, where present, a near-duplicate cluster)."""
    if not path:
        return None
    p = Path(path)
    p = p / "manifest.parquet" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"manifest={path!r}: no manifest.parquet (launch/prepare.py writes one beside "
                                "its shards)")
    cols = [c for c in ("key", "sha256", "cluster") if c in pq.read_schema(p).names]
    return pq.read_table(p, columns=cols).to_pandas()


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
