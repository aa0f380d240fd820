"""Training-time mitigation baselines (train/mitigation.py): each perturbs captions or embeddings as specified, is a
pure function of (seed, key, step), composes from its config and runs in the loop with an exact resume."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from memfilter.launch.config_check import ConfigError, check_train_config
from memfilter.train.mitigation import Mitigation, MitigationArgs, sample_rng
from tests.conftest import compose, train_in_process

VOCAB = ["zebra", "piano", "cloud", "lamp"]
CAPTION = "a red circle on grey"


def _apply(name, caption=CAPTION, key="k1", step=3, seed=0, **kw):
    mit = Mitigation(MitigationArgs(name=name, **kw), VOCAB, seed)
    return mit.captions([caption], [key], step)[0]


def test_text_baselines_change_captions_as_specified():
    words = CAPTION.split()
    rc = _apply("random_caption").split()
    assert len(rc) == len(words) and set(rc) <= set(VOCAB)                   # replaced, same length
    rt = _apply("random_tokens", num_words=3).split()
    assert len(rt) == len(words) + 3 and [w for w in rt if w not in VOCAB] == words    # order of the caption kept
    rn = _apply("random_numbers", num_words=2).split()
    added = [w for w in rn if w.isdigit()]
    assert len(added) == 2 and [w for w in rn if not w.isdigit()] == words
    rw = _apply("repeat_words", num_words=4).split()
    assert len(rw) == len(words) + 4 and set(rw) == set(words)
    assert _apply("random_numbers", probability=0.0) == CAPTION                # probability 0: untouched


def test_multiple_captions_draw_from_the_file_and_leave_others(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"key": "k1", "captions": ["one", "two", "three"]}) + "\n")
    mit = Mitigation(MitigationArgs(name="multiple_captions", caption_file=str(f)), [], 0)
    drawn = {mit.captions([CAPTION, CAPTION], ["k1", "k2"], step)[0] for step in range(40)}
    assert drawn == {"one", "two", "three"}                        # every alternative, across steps
    assert mit.captions([CAPTION], ["k2"], 5) == [CAPTION]        # no alternatives: as it is
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["k1"], "captions": [["solo"]]}), tmp_path / "caps.parquet")
    mit = Mitigation(MitigationArgs(name="multiple_captions", caption_file=str(tmp_path / "caps.parquet")), [], 0)
    assert mit.captions([CAPTION], ["k1"], 0) == ["solo"]


def test_perturbations_are_a_pure_function_of_seed_key_and_step():
    """What resume needs: a fresh object gives the same perturbation; another step, key or seed another one."""
    for name in ("random_caption", "random_tokens", "random_numbers", "repeat_words"):
        assert _apply(name) == _apply(name)
        assert len({_apply(name, step=s) for s in range(8)}) > 1
        assert len({_apply(name, key=f"k{i}") for i in range(8)}) > 1
    assert sample_rng(1, "k", 2).random() != sample_rng(2, "k", 2).random()
    # probability: the share of (key, step) pairs perturbed
    mit = Mitigation(MitigationArgs(name="random_numbers", probability=0.3), VOCAB, 0)
    changed = sum(mit.captions([CAPTION], [f"k{i}"], 0)[0] != CAPTION for i in range(2000))
    assert 0.26 < changed / 2000 < 0.34


def test_embedding_noise_perturbs_chosen_rows_but_the_start_token():
    g = torch.Generator().manual_seed(0)
    text = {"encoder_hidden_states": torch.randn(6, 5, 8, generator=g), "pooled": torch.randn(6, 4, generator=g)}
    keys = [f"k{i}" for i in range(6)]
    mit = Mitigation(MitigationArgs(name="embedding_noise", probability=0.5, sigma=0.2), [], 0)
    out = mit.embeddings(text, keys, 7)
    again = mit.embeddings(text, keys, 7)
    hidden, before = out["encoder_hidden_states"], text["encoder_hidden_states"]
    assert torch.equal(hidden, again["encoder_hidden_states"]) and torch.equal(out["pooled"], text["pooled"])
    assert torch.equal(hidden[:, 0], before[:, 0])                                     # start token frozen
    changed = [not torch.equal(hidden[i], before[i]) for i in range(6)]
    expected = [sample_rng(0, k, 7).random() < 0.5 for k in keys]
    assert changed == expected and any(changed) and not all(changed)
    diff = (hidden - before)[torch.tensor(changed)][:, 1:]
    assert 0.15 < float(diff.std()) < 0.25                                              # N(0, sigma^2)
    assert mit.captions(["a b"], ["k0"], 0) == ["a b"]                 # an embedding baseline leaves captions


@pytest.mark.parametrize("override, needle", [
    (["mitigation=random_numbers", "mitigation.probability=1.5"], "mitigation.probability"),
    (["mitigation=multiple_captions"], "mitigation.caption_file"),
    (["mitigation=multiple_captions", "mitigation.caption_file=/nonexistent.jsonl"], "mitigation.caption_file"),
    (["mitigation=embedding_noise", "mitigation.sigma=0"], "mitigation.sigma"),
])
def test_bad_values_stop_the_run_naming_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        check_train_config(compose(override), cuda_available=False)


def test_a_baseline_in_the_loop_changes_training_and_resumes_exactly(tmp_path):
    """random_numbers in a real run: other weights than without; 2 steps + resume to 4 equals 4 straight."""
    common = ["filter=item", "max_train_steps=4", "checkpointing_steps=2", "proportion_empty_prompts=0",
              "mitigation=random_numbers", "mitigation.probability=0.5"]
    straight, summary = train_in_process(tmp_path / "a", common)
    assert summary["mitigation"] == "random_numbers"
    plain, _ = train_in_process(tmp_path / "p", common[:-2])
    half, _ = train_in_process(tmp_path / "b", [*common, "max_train_steps=2"])
    from memfilter.launch.train import run
    from tests.conftest import _args
    run(compose(_args(half, [*common, "resume_from_checkpoint=latest"])))
    a, p, b = (UNet2DConditionModel.from_pretrained(d / "unet").state_dict() for d in (straight, plain, half))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], p[k]) for k in a)
