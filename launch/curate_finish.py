"""The end of a curation pass, on rank 0: merge and check, evidence per item, decide, write, report."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from memfilter.filtering import curation
from memfilter.evaluation.curation_report import (clusters_found, ground_truth_metrics, histogram, top_grid,
                                                 write_report)
from memfilter.launch.config_check import ConfigError

log = logging.getLogger("memfilter.curate")


def _write_atomic_table(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, path)


def _manifest(cfg: DictConfig, plan: dict) -> pd.DataFrame | None:
    path = cfg.manifest
    if not path and plan["kind"] == "shards" and not plan["urls"][0].startswith("pipe:"):
        auto = Path(plan["urls"][0]).parent / "manifest.parquet"
        path = str(auto) if auto.is_file() else None
    try:
        return curation.read_manifest(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def _decisions_dir(out: Path, args) -> tuple[Path, dict | None]:
    """decisions/<name>, and its report when these scores were already decided there with the same settings (a
    re-run has nothing to do); a finished folder decided otherwise is never overwritten."""
    import json

    name = args.name or args.policy
    path = out / "decisions" / name
    done = path / "report.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("decision", {}).get("settings") == dataclasses.asdict(args):
            return path, old
        raise ConfigError(f"{path} holds decisions made with other settings; memfilter never overwrites them: "
                          "decide again under another name (decide.name=<new name>)")
    path.mkdir(parents=True, exist_ok=True)         # an unfinished folder (a killed finish) is written again
    return path, None


def merge_and_check(out: Path, plan: dict) -> tuple[pd.DataFrame, dict]:
    """scores.parquet and completeness.json; an incomplete pass stops here, naming what is missing."""
    df, comp = curation.merge(out, plan)
    curation.save_json(out / "completeness.json", comp)
    if comp["missing_chunks"] or comp["short_chunks"]:
        raise RuntimeError(f"the pass is incomplete: chunks without a part {comp['missing_chunks'][:10]}, chunks "
                           f"short of samples {comp['short_chunks'][:10]}; start the same command again to finish "
                           f"it ({out / 'completeness.json'})")
    _write_atomic_table(df, out / "scores.parquet")
    return df, comp


def write_shards(cfg: DictConfig, dest: Path, source, plan: dict, kept_keys: set[str]) -> dict:
    """The kept samples as new webdataset shards (original bytes), with shards.json and a manifest."""
    from memfilter.train.data.imagefolder import MapSource
    from memfilter.train.data.keeplist import KeepList, write_kept_shards

    if plan["kind"] == "shards":
        counts = write_kept_shards(plan["urls"], kept_keys, dest, cfg.shard_size)
        return {"shards": len(counts), "samples": sum(counts.values())}
    if not isinstance(source, MapSource):
        raise ConfigError("write_shards=true: this data source has no original files to copy (the toy world is "
                          "drawn in memory); use the keep-list (data.keep_list=<decisions>/keep.txt), or write the "
                          "world as shards first with launch/prepare.py input.kind=world")
    from memfilter.train.data.prepare import prepare
    report = prepare(KeepList(source, kept_keys), dest, shard_size=cfg.shard_size, progress=False)
    return {"shards": report["shards"], "samples": report["written"]}


def finish(cfg: DictConfig, out: Path, plan: dict, source, score_args, decide_args, scored_by: dict) -> dict:
    df, comp = merge_and_check(out, plan)
    scored = df[df.skip.isna()].reset_index(drop=True)
    if not len(scored):
        raise RuntimeError(f"no sample of the source could be scored (skipped: {comp['skipped']})")
    vectors = curation.timestep_matrix(scored, score_args.timesteps, score_args.draws)
    item_score, item_vec, by, size = curation.item_evidence(scored, vectors, _manifest(cfg, plan))
    try:
        drop, info = curation.decide(decide_args, scored, item_score, item_vec, score_args.timesteps,
                                     score_args.draws)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    dest, earlier = _decisions_dir(out, decide_args)
    if earlier is not None:
        log.info("curation: already decided in %s; nothing to do", dest)
        return earlier
    decisions = pd.DataFrame({"key": scored.key, "caption": scored.caption, "score": scored.score,
                              "item_score": item_score, "item_by": by, "item_size": size, "drop": drop})
    _write_atomic_table(decisions, dest / "decisions.parquet")
    curation.write_key_lists(dest, scored, drop)
    summary = {"output_dir": str(out), "scored_by": scored_by, "completeness": comp,
               "decision": {"name": dest.name, "policy": decide_args.policy, "info": info,
                            "settings": dataclasses.asdict(decide_args)},
               "dropped": int(drop.sum()), "dropped_fraction": float(drop.mean()),
               "keep_list": str(dest / "keep.txt"), "ground_truth": ground_truth_metrics(scored, item_score, drop),
               "clusters": clusters_found(scored, by, size, item_score)}
    if cfg.write_shards:
        summary["shards"] = {"dir": str(dest / "shards"), **write_shards(
            cfg, dest / "shards", source, plan, set(scored.key[~drop]))}
    histogram(dest / "scores_hist.png", scored, item_score, info)
    top_grid(dest / "top.png", source, plan, scored, item_score, cfg.report_top)
    curation.save_json(dest / "report.json", summary)
    write_report(dest, summary)
    log.info("curation: %d scored, %d dropped (%s); keep-list %s", comp["scored"], summary["dropped"],
             decide_args.policy, dest / "keep.txt")
    return summary
