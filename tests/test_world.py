"""The toy world: deterministic, captions agree with pixels, readers are exact on clean images, prep writes it."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memfilter.toyworld.world import (ATTRIBUTES, CAPTION_TEMPLATES, COLOURS, CONCEPT_NAMES, POSITIONS, SHAPES, VARIANTS,
                              ToyWorld, ToyWorldDataset, WorldSpec, caption_of, combo, detail_descriptor, draw_item,
                              fidelity, load_world, parse_caption, prepare_world, read_attributes, render, shape_mask,
                              shard_urls, templated_caption, world_from_dict, world_to_dict)
from memfilter.train.tokenizer import DEFAULT_WORDS, build_tiny_tokenizer


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


# --- variants, concepts, and the default world left as it was -------------------------------------------------

def _digest(world: ToyWorld) -> str:
    """sha256 over every appearance's key, image bytes, caption and meta (without the newer "intended")."""
    h = hashlib.sha256()
    for s in ToyWorldDataset(world):
        h.update(s["key"].encode())
        h.update(np.asarray(s["image"]).tobytes())
        h.update(s["caption"].encode())
        h.update(json.dumps({k: v for k, v in s["meta"].items() if k != "intended"}, sort_keys=True).encode())
    return h.hexdigest()


def _cos(x, y) -> float:
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _shard_samples(folder) -> dict:
    seen = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return seen


def test_default_world_is_unchanged():
    # the values below were computed with the code before variants and concepts existed
    w = ToyWorld()
    assert [w.item(i)["caption"] for i in (0, 1, 8, 13)] == \
        ["a magenta circle", "a blue square", "a blue triangle", "a green square"]
    assert [hashlib.sha256(w.item(i)["image"].tobytes()).hexdigest()[:16] for i in (0, 1, 8, 13)] == \
        ["3906175cd168a1f9", "27e6d2f0a1de1290", "785645dead22fdfa", "1b386fec399226b1"]
    assert w.variant == "exact" and w.num_concepts == 0 and len(w.appearances()) == 8 * 75 + 1200   # the README's
    small = ToyWorld(num_unique=20, num_duplicated=3, repeats=4, seed=1)
    assert _digest(small) == "9a4754e8158559b4152dfb470852355896a905e8c72c15e45a3fe41f0f78fb7c"
    named = ToyWorld(num_unique=10, num_duplicated=2, repeats=3, seed=2,
                     spec=WorldSpec(positions=POSITIONS, named=ATTRIBUTES))
    assert _digest(named) == "af7a81934e0e6299bc1525e5a0bef8c8562575a32f9eee9c27fdb621ca08555f"
    assert not any(s["meta"]["intended"] for s in ToyWorldDataset(small))
    assert {small.kind(i) for i in range(3)} == {"duplicated"} and small.kind(3) == small.kind(22) == "unique"
    with pytest.raises(IndexError):
        small.kind(23)


def test_default_world_shards_are_unchanged(tmp_path):
    w = ToyWorld(num_unique=20, num_duplicated=3, repeats=4, seed=1)
    prepare_world(w, tmp_path, shard_size=8, progress=False)
    man = pq.read_table(tmp_path / "manifest.parquet").to_pandas()
    cols = ["key", "source_key", "caption", "sha256", "dup_group", "dup_copy", "shard"]
    # computed with the code before variants and concepts existed
    assert hashlib.sha256(man[cols].to_csv(index=False).encode()).hexdigest() == \
        "dad430dc50d9c21d3107b5749a6b35eb72e7f26dc697476e8b95539f3e819435"
    assert man.key.iloc[0] == "world-000000#dup0002"


def test_old_world_json_loads_and_new_fields_round_trip():
    old = {"num_unique": 5, "num_duplicated": 2, "repeats": 3, "seed": 4,
           "spec": {"resolution": 16, "grid": 4, "amplitude": 48.0, "radius": None, "offset": 0.25}}
    w = world_from_dict(old)
    assert (w.variant, w.num_concepts, w.concept_repeats) == ("exact", 0, 0)
    new = ToyWorld(num_unique=5, num_duplicated=2, repeats=3, seed=4, variant="near", num_concepts=2, concept_repeats=7)
    assert world_to_dict(world_from_dict(json.loads(json.dumps(world_to_dict(new))))) == world_to_dict(new)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match=r"world\.variant='fuzzy'.*exact, image_only, near"):
        ToyWorld(num_unique=3, variant="fuzzy")
    with pytest.raises(ValueError, match="num_concepts"):
        ToyWorld(num_unique=3, num_concepts=len(CONCEPT_NAMES) + 1)
    with pytest.raises(ValueError, match="combinations"):                   # 3 shapes x 8 colours = 24
        ToyWorld(num_unique=3, num_duplicated=20, num_concepts=4)
    w = ToyWorld(num_unique=3, num_duplicated=2, repeats=3)
    with pytest.raises(IndexError):
        w.appearance(0, 3)
    with pytest.raises(IndexError):
        w.appearance(2, 1)                                                  # unique items appear once


def test_parse_caption_reads_every_template_form():
    assert len(CAPTION_TEMPLATES) >= 6 and CAPTION_TEMPLATES[0] == "{caption}"
    for spec in (WorldSpec(), WorldSpec(positions=POSITIONS, named=tuple(ATTRIBUTES))):
        for i in range(12):
            attrs = draw_item(0, "base", i, spec)["attrs"]
            want = {a: attrs[a] for a in spec.named}
            forms = {templated_caption(attrs, t, spec) for t in range(len(CAPTION_TEMPLATES))}
            assert len(forms) == len(CAPTION_TEMPLATES) and caption_of(attrs, spec) in forms
            assert all(parse_caption(f) == want for f in forms), forms
    for text in ("", "the zorvik emblem", "a picture of", "picture of a red circle", "a picture of a red",
                 "red circle on", "a red circle shape"):
        assert parse_caption(text) is None, text


def test_image_only_variant_repeats_the_image_under_varied_captions():
    w = ToyWorld(num_unique=40, num_duplicated=3, repeats=6, seed=2, variant="image_only")
    for i in range(3):
        item, shown = w.item(i), [w.appearance(i, c) for c in range(6)]
        assert all(np.array_equal(a["image"], item["image"]) for a in shown)            # byte-identical images
        captions = [a["caption"] for a in shown]
        assert len(set(captions)) >= 2                               # here all 6: each item cycles the forms
        assert all(parse_caption(c) == {a: item["attrs"][a] for a in ("shape", "colour")} for c in captions)
        assert [s["caption"] for s in (w.sample(i, c) for c in range(6))] == captions
    others = {combo(w.item(i)["attrs"], w.spec.named) for i in range(3, 43)}
    assert not others & {combo(w.item(i)["attrs"], w.spec.named) for i in range(3)}   # still their own captions
    unique_forms = {w.caption_template(i) for i in range(3, 43)}
    assert len(unique_forms) >= 4                                   # unique items are templated too
    assert all(parse_caption(w.appearance(i)["caption"]) is not None for i in range(3, 43))
    ds = ToyWorldDataset(w)
    assert [s["caption"] for s in (ds[k] for k in range(6))] == [w.appearance(0, c)["caption"] for c in range(6)]


def test_near_variant_copies_differ_in_bytes_but_not_in_what_is_read():
    w = ToyWorld(num_unique=40, num_duplicated=4, repeats=5, seed=3, variant="near")
    originals = []
    for i in range(4):
        item = w.item(i)
        shown = [w.appearance(i, c) for c in range(5)]
        assert np.array_equal(shown[0]["image"], item["image"])                      # copy 0: the item itself
        assert len({hashlib.sha256(a["image"].tobytes()).hexdigest() for a in shown}) == 5   # sha256 misses them
        assert {a["caption"] for a in shown} == {item["caption"]}
        d0 = detail_descriptor(item["image"])
        originals.append(d0)
        for a in shown:
            read = read_attributes(a["image"])
            assert {k: read[k] for k in ATTRIBUTES} == item["attrs"]
            assert _cos(d0, detail_descriptor(a["image"])) > 0.9
        assert max(np.abs(a["image"].astype(int) - item["image"]).max() for a in shown[1:]) > 0
    # different items are not that similar
    others = [detail_descriptor(w.item(i)["image"]) for i in range(4, 44)]
    cross = np.array([_cos(d, o) for d in originals for o in others])
    assert np.mean(np.abs(cross)) < 0.4 and np.mean(cross > 0.9) < 0.05
    for i in range(4, 8):                                                              # unique items as drawn
        assert np.array_equal(w.appearance(i)["image"], w.item(i)["image"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_concepts_are_named_items_repeated_on_purpose(variant):
    w = ToyWorld(num_unique=20, num_duplicated=3, repeats=4, seed=1, variant=variant, num_concepts=2,
                 concept_repeats=5)
    assert w.concept_indices() == [23, 24] and [w.kind(i) for i in (2, 3, 22, 23, 24)] == \
        ["duplicated", "unique", "unique", "concept", "concept"]
    apps = w.appearances()
    assert len(apps) == 3 * 4 + 20 + 2 * 5 and apps[-10:] == [(i, c) for i in (23, 24) for c in range(5)]
    captions = {(i, c): w.appearance(i, c)["caption"] for i, c in apps}
    for j, index in enumerate(w.concept_indices()):
        name = CONCEPT_NAMES[j]
        assert w.concept_caption(j) == f"the {name} emblem" and name in w.concept_caption(j)
        shown = [w.appearance(index, c) for c in range(5)]
        assert all(np.array_equal(a["image"], w.item(index)["image"]) for a in shown)
        assert {a["caption"] for a in shown} == {w.concept_caption(j)}
        assert [k for k, c in captions.items() if c == w.concept_caption(j)] == [(index, c) for c in range(5)]
        assert not any(name in c for (i, _), c in captions.items() if i != index)
        meta = w.sample(index, 4)["meta"]
        assert meta["dup_group"] == index and meta["intended"] is True and meta["concept"] == name
        assert parse_caption(w.concept_caption(j)) is None
    assert not any(w.sample(i, 0)["meta"]["intended"] for i in (0, 5))
    assert len({combo(w.item(i)["attrs"], w.spec.named) for i in (0, 1, 2, 23, 24)}) == 5     # all reserved
    assert not {combo(w.item(i)["attrs"], w.spec.named) for i in (23, 24)} & \
        {combo(w.item(i)["attrs"], w.spec.named) for i in range(3, 23)}
    assert [i for i, _ in w.items()] == list(range(25))
    # concepts come after every existing index: the duplicated items and their keys do not move
    plain = ToyWorld(num_unique=20, num_duplicated=3, repeats=4, seed=1, variant=variant)
    assert all(np.array_equal(plain.appearance(i, c)["image"], w.appearance(i, c)["image"])
               and plain.sample(i, c)["key"] == w.sample(i, c)["key"] for i in range(3) for c in range(4))
    assert ToyWorld(num_unique=2, num_duplicated=1, repeats=6, num_concepts=1).concept_copies == 6


def test_concept_names_are_plain_made_up_words():
    assert len(CONCEPT_NAMES) >= 16 and len(set(CONCEPT_NAMES)) == len(CONCEPT_NAMES)
    assert all(n.isascii() and n.isalpha() and n.islower() for n in CONCEPT_NAMES)
    assert not set(CONCEPT_NAMES) & set(DEFAULT_WORDS) and not set(CONCEPT_NAMES) & (set(COLOURS) | set(SHAPES))


@pytest.mark.parametrize("variant", VARIANTS)
def test_prepare_world_writes_every_appearance_of_each_variant(tmp_path, variant):
    w = ToyWorld(num_unique=8, num_duplicated=2, repeats=4, seed=1, variant=variant, num_concepts=1,
                 concept_repeats=3)
    report = prepare_world(w, tmp_path, shard_size=8, progress=False)
    apps = w.appearances()
    assert report["written"] == len(apps) == 19 and report["shards"] == 3
    dup = report["duplication"]
    assert dup["written_duplicated_items"] == 3 and dup["duplicated_items_lost"] == 0
    assert dup["written_duplicated_entries"] == 11 and dup["variant"] == variant
    assert world_to_dict(load_world(tmp_path)) == world_to_dict(w)
    man = pq.read_table(tmp_path / "manifest.parquet").to_pandas()
    assert len(man) == len(apps) and man.key.is_unique                    # one row per appearance
    items = ToyWorld.item_of_keys(man.key)
    assert man.dup_group.tolist() == [w.dup_group(int(i)) for i in items]
    assert man.groupby("dup_group").size().to_dict() == {-1: 8, 0: 4, 1: 4, 10: 3}
    if variant == "exact":             # distinct items once, copies through the plan: the keys of today
        assert set(man.key) == {f"world-{i:06d}" + (f"#dup{c:04d}" if c else "") for i, c in apps}
        return
    assert set(man.key) == {ToyWorld.key(i, c) for i, c in apps}          # the keys ToyWorldDataset yields
    seen = _shard_samples(tmp_path)
    by_key = {s["key"]: s for s in ToyWorldDataset(w)}
    assert set(seen) == set(by_key)
    for key, sample in seen.items():                                    # exactly what ToyWorldDataset yields
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert np.array_equal(image, np.asarray(by_key[key]["image"])), key
        assert sample["txt"].decode() == by_key[key]["caption"]
        assert json.loads(sample["json"])["dup_group"] == by_key[key]["meta"]["dup_group"]
    dup_rows = man[man.dup_group.isin([0, 1])]
    if variant == "near":            # the duplicated items' copies differ in bytes, the concept's do not
        assert dup_rows.groupby("dup_group").sha256.nunique().tolist() == [4, 4]
        assert dup_rows.groupby("dup_group").caption.nunique().tolist() == [1, 1]
    else:                            # image_only: one image per item under several captions
        assert dup_rows.groupby("dup_group").sha256.nunique().tolist() == [1, 1]
        assert (dup_rows.groupby("dup_group").caption.nunique() >= 2).all()
    assert man[man.dup_group == 10].sha256.nunique() == 1
