"""Per-sample score records: one row per sample per step, in Parquet, written by every rank.

Training's schema (SCHEMA): step, rank, key, timestep, magnitude, kept, loss, eligible, item_id, base_loss,
base_magnitude. The curation pass's
(CURATION_SCHEMA) shares rank, key, timestep and magnitude (as lists: one value per draw and timestep) and adds
what a pass over a dataset knows: the chunk, the caption, the mean score, the item ids (caption and image, as
filtering.policies.item_groups computes them for training), the source's ground truth and a skipped sample's
reason.
Each rank appends to memory and flushes a part file `rank-<r>/part-<first>-<last>-<seq>.parquet` named
by the first and last step it holds (after a truncation, `last` is an upper bound) and a sequence number
(a step can span several parts). When a killed run resumes from checkpoint S, `truncate_after(S)`
drops every row with step > S from that rank's parts, so the resumed run writes them again and
the final set holds every (step, key) exactly once.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("rank", pa.int32()),
    ("key", pa.string()),
    ("timestep", pa.int32()),
    ("magnitude", pa.float32()),
    ("kept", pa.bool_()),
    ("loss", pa.float32()),
    ("eligible", pa.bool_()),     # False where the caption was dropped for guidance: never judged
    ("item_id", pa.int64()),      # the sample's first item id as the policy saw it (null: the policy reads none)
    ("base_loss", pa.float32()),  # the base model's loss at the same x_t and t (NaN: not measured, filter.null)
    ("base_magnitude", pa.float32()),   # and its magnitude: with the rest, a stream any policy can be replayed on
])
CURATION_SCHEMA = pa.schema([
    ("chunk", pa.int64()),
    ("index", pa.int64()),                   # position in the source (map-style) or in the shard (webdataset)
    ("rank", pa.int32()),
    ("key", pa.string()),
    ("caption", pa.string()),
    ("timestep", pa.list_(pa.int32())),      # per draw (x timestep): the timestep scored
    ("magnitude", pa.list_(pa.float32())),   # per draw (x timestep): m
    ("score", pa.float32()),                 # mean of magnitude
    ("caption_id", pa.int64()),
    ("image_id", pa.int64()),
    ("dup_group", pa.int64()),               # the source's ground truth (-1: not duplicated)
    ("skip", pa.string()),                   # null for a scored sample; else why it could not be scored
    ("skip_detail", pa.string()),
])
_PART = re.compile(r"part-(\d+)-(\d+)-(\d+)\.parquet$")


class RecordWriter:
    """Buffers records of one rank and writes them as Parquet parts.

    Args:
        root: the records folder of the run (e.g. <run_dir>/records).
        rank: this process's rank.
        flush_every: rows buffered before a part is written. Default 65536.
    """

    def __init__(self, root: str | os.PathLike, rank: int, flush_every: int = 65536):
        self.dir = Path(root) / f"rank-{rank:05d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.flush_every = flush_every
        self._cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._seq = 1 + max((int(_PART.search(p.name).group(3)) for p in self.dir.glob("part-*.parquet")),
                            default=-1)

    def _part_path(self, first: int, last: int) -> Path:
        self._seq += 1
        return self.dir / f"part-{first:010d}-{last:010d}-{self._seq - 1:06d}.parquet"

    def append(self, step: int, keys, timesteps, magnitudes, kept, losses, eligible, item_ids=None,
               base_losses=None, base_magnitudes=None) -> None:
        """Add one row per sample. Tensors or sequences of equal length [B]; the last three may be None (nulls)."""
        keys = list(keys)
        n = len(keys)
        cols = {}
        for name, vals in (("timestep", timesteps), ("magnitude", magnitudes), ("kept", kept), ("loss", losses),
                           ("eligible", eligible), ("item_id", item_ids), ("base_loss", base_losses),
                           ("base_magnitude", base_magnitudes)):
            vals = [None] * n if vals is None else vals
            cols[name] = vals.detach().cpu().tolist() if hasattr(vals, "detach") else list(vals)
            if len(cols[name]) != n:      # check everything before touching the buffer
                raise ValueError(f"records: {name} has {len(cols[name])} values for {n} keys")
        cols.update(step=[int(step)] * n, rank=[self.rank] * n, key=[str(k) for k in keys])
        for name, vals in cols.items():
            self._cols[name] += vals
        if len(self._cols["step"]) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one part, atomically (write to .tmp, then rename)."""
        steps = self._cols["step"]
        if not steps:
            return
        path = self._part_path(steps[0], steps[-1])
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table(self._cols, schema=SCHEMA), tmp)
        os.replace(tmp, path)
        self._cols = {name: [] for name in SCHEMA.names}

    def truncate_after(self, step: int) -> int:
        """Remove rows with step > `step` from this rank's parts (resume). Returns rows removed."""
        removed = 0
        for part in sorted(self.dir.glob("*.tmp")):
            part.unlink()
        for part in sorted(self.dir.glob("part-*.parquet")):
            first, last, _ = map(int, _PART.search(part.name).groups())
            if last <= step:
                continue
            table = pq.read_table(part)
            kept = table.filter(pc.less_equal(table["step"], step))
            removed += table.num_rows - kept.num_rows
            if kept.num_rows:
                # rewrite under the same name, atomically: a kill here leaves the old or the new part,
                # and truncating again is idempotent (the name's last step is then an upper bound)
                tmp = part.with_suffix(".tmp")
                pq.write_table(kept, tmp)
                os.replace(tmp, part)
            else:
                part.unlink()
        return removed


def read_records(root: str | os.PathLike) -> pa.Table:
    """All records under a records folder (every rank), sorted by step, rank."""
    parts = sorted(Path(root).glob("rank-*/part-*.parquet"))
    if not parts:
        return SCHEMA.empty_table()
    table = pa.concat_tables([_with_schema(pq.read_table(p)) for p in parts])
    return table.sort_by([("step", "ascending"), ("rank", "ascending")])


def _with_schema(table: pa.Table) -> pa.Table:
    """A part in SCHEMA's columns; a part written before a column existed gets it as nulls (unknown)."""
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def eligible_mask(table) -> "np.ndarray":
    """[N] bool: the samples the filter judged (a records table or its pandas frame). Records written before
    the `eligible` column existed fall back to m > 0 (a dropped caption had m = 0)."""
    import numpy as np
    df = table.to_pandas() if isinstance(table, pa.Table) else table
    known = df["eligible"].notna().to_numpy()
    return np.where(known, df["eligible"].fillna(False).to_numpy(bool), (df["magnitude"] > 0).to_numpy())
