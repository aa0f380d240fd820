"""filter.protect: intended memorization is exempt from the filter, exactly the samples named."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memfilter.filtering.protect import Protect
from memfilter.filtering.records import read_records
from memfilter.launch.config_check import ConfigError
from tests.conftest import train_in_process


def test_protect_matches_caption_patterns_keys_and_keep_lists(tmp_path):
    (tmp_path / "keep.txt").write_text("# intended\nk7\n\nk8\n")
    pq.write_table(pa.table({"key": ["k9"]}), tmp_path / "keep.parquet")
    keys = ["k1", "k2", "k3", "k7", "k8", "k9"]
    captions = ["the Zorvik emblem", "a red circle", "zorvikian art", "a", "b", "c"]
    assert Protect(captions=[r"\bzorvik\b"]).mask(keys, captions).tolist() == [True, False, False, False, False, False]
    assert Protect(keys=["k2"]).mask(keys, captions).tolist() == [False, True, False, False, False, False]
    assert Protect(keep_list=str(tmp_path / "keep.txt")).mask(keys, captions).tolist() == [False] * 3 + [True, True, False]
    assert Protect(keep_list=str(tmp_path / "keep.parquet")).mask(keys, captions).tolist() == [False] * 5 + [True]
    assert not Protect() and Protect(keys=["x"])
    with pytest.raises(ValueError, match="filter.protect.captions"):
        Protect(captions=["(unclosed"])
    with pytest.raises(FileNotFoundError, match="filter.protect.keep_list"):
        Protect(keep_list=str(tmp_path / "missing.txt"))


def test_protected_samples_are_kept_and_the_rest_still_filtered(tmp_path):
    """A threshold below every magnitude drops everything but the protected captions (the world's captions name
    the shape, "a red circle": the first sample's shape protects exactly the samples of that shape)."""
    from memfilter.launch.builders import build_dataset
    from tests.conftest import _args, compose
    data = build_dataset(compose(_args(None, [])).data, 16)
    samples = [data[i] for i in range(len(data))]
    caption = {s["key"]: s["caption"] for s in samples}
    shape = samples[0]["meta"]["shape"]
    run_dir, summary = train_in_process(tmp_path, [
        "filter=fixed", "filter.threshold=1e-12", "proportion_empty_prompts=0", "max_train_steps=3",
        "optim.lr_warmup_steps=0", f"filter.protect.captions=[{shape}]"])
    rec = read_records(run_dir / "records").to_pandas()
    protected = rec.key.map(lambda k: shape in caption[k])
    assert protected.any() and (~protected).any()                     # both kinds were trained on
    assert rec.kept.tolist() == protected.tolist()                    # kept exactly when protected
    assert summary["samples_kept"] == int(protected.sum())


def test_a_bad_protect_value_stops_the_run_at_start(tmp_path):
    with pytest.raises(ConfigError, match="filter.protect.keep_list"):
        train_in_process(tmp_path, ["filter.protect.keep_list=/nonexistent/keys.txt"])
    with pytest.raises(ConfigError, match="filter.protect.captions"):
        train_in_process(tmp_path, ["filter.protect.captions=zorvik"])
