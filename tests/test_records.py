"""Per-sample score records: Parquet parts per rank, read back whole, truncated on resume."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from memfilter.filtering.records import SCHEMA, RecordWriter, read_records

BS = 3  # samples per step


def _batch(step: int, rank: int = 0):
    """One step's records: keys, timesteps, magnitudes, kept, losses, eligible, item ids (48-bit), base losses and
    base magnitudes (tensors, as the loop passes them)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    keys = [f"r{rank}-s{step}-{i}" for i in range(BS)]
    return (keys, torch.randint(0, 1000, (BS,), generator=g), torch.rand(BS, generator=g) * 5,
            torch.rand(BS, generator=g) > 0.3, torch.rand(BS, generator=g), torch.rand(BS, generator=g) > 0.2,
            torch.randint(1, 2 ** 48, (BS,), generator=g), torch.rand(BS, generator=g),
            torch.rand(BS, generator=g) * 5)


def _expected_rows(steps, rank: int = 0) -> set[tuple]:
    rows = set()
    for s in steps:
        keys, t, m, kept, loss, elig, ids, base_loss, base_m = _batch(s, rank)
        for i in range(BS):
            rows.add((s, rank, keys[i], int(t[i]), float(np.float32(m[i])), bool(kept[i]),
                      float(np.float32(loss[i])), bool(elig[i]), int(ids[i]), float(np.float32(base_loss[i])),
                      float(np.float32(base_m[i]))))
    return rows


def _rows(table) -> list[tuple]:
    d = table.to_pydict()
    return list(zip(*(d[name] for name in SCHEMA.names)))


def _write(root, steps, rank: int = 0, flush_every: int = 4, split: bool = False) -> RecordWriter:
    """Write the records of `steps`; with split=True in two appends per step (micro-batches)."""
    w = RecordWriter(root, rank=rank, flush_every=flush_every)
    for s in steps:
        cols = _batch(s, rank)
        if split:
            w.append(s, *(c[:2] for c in cols))
            w.append(s, *(c[2:] for c in cols))
        else:
            w.append(s, *cols)
    w.flush()
    return w


def _parts(root, rank: int = 0):
    return sorted((root / f"rank-{rank:05d}").glob("part-*.parquet"))


def _span(part) -> tuple[int, int, int]:
    return tuple(map(int, re.search(r"part-(\d+)-(\d+)-(\d+)\.parquet$", part.name).groups()))


def test_append_flush_read_returns_every_row(tmp_path):
    root = tmp_path / "records"
    _write(root, range(1, 8), rank=0)                             # 21 rows, parts of >= 4 rows
    _write(root, range(1, 8), rank=1, flush_every=100)            # one part, written by flush()
    table = read_records(root)
    assert table.schema == SCHEMA
    rows = _rows(table)
    assert len(rows) == 2 * 7 * BS
    assert set(rows) == _expected_rows(range(1, 8), 0) | _expected_rows(range(1, 8), 1)
    steps_ranks = [(r[0], r[1]) for r in rows]
    assert steps_ranks == sorted(steps_ranks)                     # sorted by step, rank
    # several parts on rank 0, each named by the first and last step it holds
    parts = _parts(root, 0)
    assert len(parts) > 1 and len(_parts(root, 1)) == 1
    for p in parts:
        first, last, _ = _span(p)
        steps = pq.read_table(p)["step"].to_pylist()
        assert (first, last) == (steps[0], steps[-1])
    assert len({_span(p)[2] for p in parts}) == len(parts)        # unique sequence numbers


def test_empty_flush_and_empty_folder(tmp_path):
    w = RecordWriter(tmp_path / "records", rank=0)
    w.flush()
    assert _parts(tmp_path / "records") == []
    table = read_records(tmp_path / "records")
    assert table.num_rows == 0 and table.schema == SCHEMA


def test_plain_sequences_are_accepted(tmp_path):
    w = RecordWriter(tmp_path, rank=2)
    w.append(5, ["a", "b"], [10, 20], [0.5, 1.5], [True, False], [0.1, 0.2], [True, False])
    w.flush()
    rows = _rows(read_records(tmp_path))
    assert rows == [(5, 2, "a", 10, 0.5, True, pytest.approx(0.1), True, None, None, None),   # no ids, no base:
                    (5, 2, "b", 20, 1.5, False, pytest.approx(0.2), False, None, None, None)]  # nulls


def test_records_written_before_the_eligible_column_read_back_with_it_unknown(tmp_path):
    """A resumed run's folder may hold parts of an older writer: they read as one table, eligibility null,
    and the judged samples fall back to m > 0 for them only."""
    import pyarrow as pa
    from memfilter.filtering.records import eligible_mask

    old = tmp_path / "rank-00000"
    old.mkdir()
    pq.write_table(pa.table({"step": [1, 1], "rank": pa.array([0, 0], pa.int32()), "key": ["a", "b"],
                             "timestep": pa.array([5, 6], pa.int32()), "magnitude": pa.array([0.0, 2.0], pa.float32()),
                             "kept": [True, True], "loss": pa.array([0.1, 0.2], pa.float32())}),
                   old / "part-0000000001-0000000001-000000.parquet")
    w = RecordWriter(tmp_path, rank=0)
    w.append(2, ["c", "d"], [7, 8], [0.0, 3.0], [True, False], [0.3, 0.4], [True, False])
    w.flush()
    table = read_records(tmp_path)
    assert table.schema == SCHEMA and table["eligible"].to_pylist() == [None, None, True, False]
    assert eligible_mask(table).tolist() == [False, True, True, False]


@pytest.mark.parametrize("flush_every, split, S, straddles", [
    (4, False, 5, True),      # parts of 2 steps: [5, 6] straddles S=5
    (4, False, 6, False),     # a part boundary exactly at S
    (7, False, 5, True),      # parts of 3 steps: [4, 6]
    (100, False, 5, True),    # one part with everything
    (4, True, 2, True),       # two appends per step: step 2 spans two parts, [2, 3] straddles
])
def test_truncate_after_removes_exactly_the_later_steps(tmp_path, flush_every, split, S, straddles):
    root = tmp_path / "records"
    _write(root, range(1, 11), rank=0, flush_every=flush_every, split=split)
    _write(root, range(1, 11), rank=1, flush_every=flush_every, split=split)
    parts_before = _parts(root, 0)
    straddling = [p for p in parts_before if _span(p)[0] <= S < _span(p)[1]]
    assert bool(straddling) == straddles
    if split:
        assert sum(1 for p in parts_before if _span(p)[0] <= S <= _span(p)[1]) >= 2   # step S in two parts
    # a flush killed midway leaves a .tmp behind
    stale = root / "rank-00000" / "part-0000000011-0000000011-000099.tmp"
    stale.write_bytes(b"half a parquet file")

    resumed = RecordWriter(root, rank=0, flush_every=flush_every)   # a resumed run's writer
    removed = resumed.truncate_after(S)
    assert removed == (10 - S) * BS
    assert not stale.exists()
    assert not list((root / "rank-00000").glob("*.tmp"))
    for p in straddling:
        assert p.exists()                                         # rewritten in place, atomically
    for p in _parts(root, 0):
        first, last, _ = _span(p)
        steps = pq.read_table(p)["step"].to_pylist()
        assert steps[0] == first and steps[-1] <= min(S, last)    # the name's last step is an upper bound
    rows = _rows(read_records(root))
    assert set(r for r in rows if r[1] == 0) == _expected_rows(range(1, S + 1), 0)
    assert set(r for r in rows if r[1] == 1) == _expected_rows(range(1, 11), 1)   # other rank untouched
    assert len(rows) == len(set(rows))

    # the resumed run writes steps S+1.. again: every (step, key) exactly once, no part overwritten
    for s in range(S + 1, 11):
        resumed.append(s, *_batch(s, 0))
    resumed.flush()
    rows = _rows(read_records(root))
    assert set(r for r in rows if r[1] == 0) == _expected_rows(range(1, 11), 0)
    assert len(rows) == 2 * 10 * BS
    seqs = [_span(p)[2] for p in _parts(root, 0)]
    assert len(seqs) == len(set(seqs))

    # truncating at or after the last step removes nothing
    assert resumed.truncate_after(10) == 0
    assert len(read_records(root)) == 2 * 10 * BS
    # truncating before the first step removes all of this rank
    assert resumed.truncate_after(0) == 10 * BS
    assert _parts(root, 0) == []


def test_length_mismatch_raises(tmp_path):
    w = RecordWriter(tmp_path, rank=0)
    keys, t, m, kept, loss, elig, ids, base_loss, base_m = _batch(1)
    with pytest.raises(ValueError, match="base_loss"):
        w.append(1, keys, t, m, kept, loss, elig, ids, base_loss[:-1], base_m)
    with pytest.raises(ValueError, match="magnitude"):
        w.append(1, keys, t, m[:-1], kept, loss, elig)
    with pytest.raises(ValueError, match="loss"):
        w.append(1, keys, t, m, kept, torch.cat([loss, loss]), elig)
    with pytest.raises(ValueError, match="timestep"):
        w.append(1, keys[:-1], t, m, kept, loss, elig)
    with pytest.raises(ValueError, match="eligible"):
        w.append(1, keys, t, m, kept, loss, elig[:-1])


def test_rejected_append_leaves_the_writer_usable(tmp_path):
    w = RecordWriter(tmp_path, rank=0)
    keys, t, m, kept, loss, elig, *_ = _batch(1)
    with pytest.raises(ValueError):
        w.append(1, keys, t, m[:-1], kept, loss, elig)
    w.append(2, *_batch(2))
    w.flush()
    assert set(_rows(read_records(tmp_path))) == _expected_rows([2])
