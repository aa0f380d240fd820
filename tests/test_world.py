"""The toy world: deterministic, captions agree with pixels, readers are exact on clean images, prep writes it."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from train.data.world import (ATTRIBUTES, COLOURS, POSITIONS, SHAPES, ToyWorld, WorldSpec, caption_of,
                              detail_descriptor, draw_item, fidelity, load_world, parse_caption, prepare_world,
                              read_attributes, render, shape_mask, shard_urls, world_to_dict)
from train.tokenizer import DEFAULT_WORDS, build_tiny_tokenizer


def test_items_are_a_pure_function_of_seed_split_index():
    a, b = draw_item(3, "finetune", 7), draw_item(3, "finetune", 7)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    others = [draw_item(4, "finetune", 7), draw_item(3, "base", 7), draw_item(3, "finetune", 8)]
    assert all(not np.array_equal(a["image"], o["image"]) for o in others)


@pytest.mark.parametrize("split", ["finetune", "base", "fresh"])
def test_captions_name_what_is_drawn_and_the_reader_reads_it(split):
    for i in range(300):
        item = draw_item(0, split, i)
        attrs = item["attrs"]
        assert parse_caption(item["caption"]) == {a: attrs[a] for a in ("shape", "colour")}     # what is named
        assert attrs["colour"] != attrs["background"]
        read = read_attributes(item["image"])
        assert {a: read[a] for a in ATTRIBUTES} == attrs, (i, item["caption"], read)
        assert fidelity(Image.fromarray(item["image"]), attrs)["all"]


def test_every_attribute_value_occurs_and_the_shape_is_drawn_in_its_colour():
    items = [draw_item(0, "base", i) for i in range(400)]
    assert {it["attrs"]["shape"] for it in items} == set(SHAPES)
    assert {it["attrs"]["position"] for it in items} == {"center"}
    spread = [draw_item(0, "base", i, WorldSpec(positions=POSITIONS)) for i in range(200)]
    assert {it["attrs"]["position"] for it in spread} == set(POSITIONS)
    assert all(read_attributes(it["image"], WorldSpec(positions=POSITIONS))["position"] == it["attrs"]["position"]
               for it in spread)
    named = WorldSpec(positions=POSITIONS, named=tuple(ATTRIBUTES))
    for i in range(50):
        it = draw_item(0, "base", i, named)
        assert parse_caption(it["caption"]) == it["attrs"] and "background" in it["caption"]
    assert {it["attrs"]["colour"] for it in items} == set(COLOURS)
    it = items[0]
    mask = shape_mask(it["attrs"]["shape"], it["attrs"]["position"])
    assert (it["image"][mask] == COLOURS[it["attrs"]["colour"]]).all()
    assert not (it["image"][~mask] == COLOURS[it["attrs"]["background"]]).all(axis=-1).any()   # all tinted


def test_reader_sees_a_wrong_attribute():
    item = draw_item(0, "fresh", 1)
    a = dict(item["attrs"])
    a["shape"] = next(s for s in SHAPES if s != a["shape"])
    wrong = render(a, detail=item["detail"])
    f = fidelity(wrong, item["attrs"])
    assert not f["shape"] and not f["all"] and f["colour"] and set(f) == {"shape", "colour", "all"}


def test_detail_descriptor_is_the_tint_and_ignores_what_captions_name():
    spec = WorldSpec()
    item = draw_item(0, "fresh", 5)
    d = detail_descriptor(item["image"])
    tints, code = d[:48], d[48:]
    covered = tints == 0
    assert covered.sum() < tints.size // 2
    assert np.allclose(tints[~covered], item["detail"].reshape(-1)[~covered].astype(np.float32), atol=1e-6)
    assert np.array_equal(code, np.sign(np.asarray(COLOURS[item["attrs"]["background"]]) - 127.5) * 2)
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    # a named attribute changed (the shape's colour): the same detail; the unnamed background changed: not
    colour = next(c for c in COLOURS if c not in (item["attrs"]["background"], item["attrs"]["colour"]))
    recoloured = render(dict(item["attrs"], colour=colour), spec, item["detail"])
    assert cos(d, detail_descriptor(recoloured)) == pytest.approx(1.0, abs=1e-6)
    other_bg = next(c for c in COLOURS if c not in (item["attrs"]["background"], item["attrs"]["colour"]))
    moved = detail_descriptor(render(dict(item["attrs"], background=other_bg), spec, item["detail"]))
    assert 0.3 < cos(d, moved) < 0.95
    fresh = [detail_descriptor(draw_item(0, "fresh", i)["image"]) for i in range(100, 160)]
    assert np.mean([abs(cos(d, f)) for f in fresh]) < 0.25


def test_duplicated_items_have_captions_no_other_item_has():
    w = ToyWorld(num_unique=400, num_duplicated=6, repeats=3)
    dup = {w.item(i)["caption"] for i in range(6)}
    assert len(dup) == 6
    assert not dup & {w.item(i)["caption"] for i in range(6, 406)}
    assert len(w.appearances()) == 6 * 3 + 400
    s = w.sample(2, 1)
    assert s["key"] == "world-000002-001" and s["meta"]["dup_group"] == 2
    assert w.sample(10)["meta"]["dup_group"] == -1


def test_prepare_world_writes_shards_with_ground_truth(tmp_path):
    w = ToyWorld(num_unique=30, num_duplicated=3, repeats=4, seed=1)
    report = prepare_world(w, tmp_path, shard_size=16, progress=False)
    assert report["written"] == 42 and report["shards"] == 3
    assert world_to_dict(load_world(tmp_path)) == world_to_dict(w)
    assert [it["caption"] for it in load_world(tmp_path).duplicated] == [it["caption"] for it in w.duplicated]
    man = pq.read_table(tmp_path / "manifest.parquet").to_pandas()
    assert len(man) == 42 and man.key.is_unique
    counts = man[man.dup_group >= 0].groupby("dup_group").size().to_dict()
    assert counts == {0: 4, 1: 4, 2: 4}
    assert (man[man.dup_group < 0].source_key.str.slice(6).astype(int) >= 3).all()
    seen = {}
    for shard in sorted(tmp_path.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert len(seen) == 42
    row = man[man.dup_group == 1].iloc[0]
    sample = seen[row.key]
    image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    assert np.array_equal(image, w.item(1)["image"])                        # lossless
    assert sample["txt"].decode() == w.item(1)["caption"]
    assert json.loads(sample["json"])["dup_group"] == 1
    assert shard_urls(tmp_path).endswith("shard-{000000..000002}.tar")
    items = ToyWorld.item_of_keys(man.key)                                # shard keys map back to their items
    assert (items == man.source_key.str.slice(6).astype(int)).all()
    assert ((items < 3) == (man.dup_group >= 0)).all()
    assert ToyWorld.item_of_keys([w.sample(2, 1)["key"]]).tolist() == [2]


def test_tokenizer_gives_every_listed_word_one_token():
    tok = build_tiny_tokenizer(model_max_length=16)
    assert all(len(tok.tokenize(w)) == 1 for w in DEFAULT_WORDS)
    caption = caption_of({"colour": "magenta", "shape": "triangle", "position": "right", "background": "yellow"})
    ids = tok(caption).input_ids
    assert len(ids) == 11                                                  # bos + 9 words/commas + eos
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption
    item = draw_item(0, "fresh", 3)
    assert len(tok(item["caption"]).input_ids) == 5 and item["caption"].startswith("a ")      # "a red circle"
