"""world.augment: appearances on a wider canvas for random crops and flips, replication judged flip-invariantly,
the demo's runs told to crop and flip, a bad value refused at start."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memfilter.launch.config_check import ConfigError
from memfilter.toyworld.evaluate import (descriptor_views, nearest_training, replication_bar,
                                         training_descriptors)
from memfilter.toyworld.world import (COLOURS, ToyWorld, ToyWorldDataset, draw_item, fidelity, world_from_dict,
                                      world_to_dict)
from memfilter.train.data.transforms import ImageTransform
from tests.conftest import compose

SMALL = dict(num_unique=30, num_duplicated=3, repeats=4, seed=2)


@pytest.mark.parametrize("variant", ["exact", "image_only", "near"])
def test_augmented_appearances_are_wider_and_their_centre_is_the_plain_one(variant):
    aug = ToyWorld(**SMALL, variant=variant, num_concepts=1, augment=True)
    plain = ToyWorld(**SMALL, variant=variant, num_concepts=1)
    assert (aug.augment_pad, plain.augment_pad) == (1, 0)
    for index, copy in aug.appearances():
        a, p = aug.appearance(index, copy), plain.appearance(index, copy)
        assert a["image"].shape == (16, 18, 3) and p["image"].shape == (16, 16, 3)
        assert np.array_equal(a["image"][:, 1:17], p["image"]) and a["caption"] == p["caption"]
    # the items (what evaluation compares with) are the plain ones; the pad shows the item's own border tints
    for index in (0, 5, aug.num_items - 1):
        item = aug.item(index)
        assert np.array_equal(item["image"], plain.item(index)["image"])
        canvas, border = aug.appearance(index)["image"].astype(int), aug.border(index).astype(int)
        bg = np.array(COLOURS[item["attrs"]["background"]])
        for side, col in ((0, 0), (1, 17)):
            want = bg + 48 * np.repeat(border[:, side], 4, 0)                  # [16, 3]: one block per 4 rows
            assert np.array_equal(canvas[:, col], want)
    assert not np.array_equal(aug.border(0), aug.border(1))
    assert world_to_dict(world_from_dict(world_to_dict(aug))) == world_to_dict(aug)
    assert world_from_dict({k: v for k, v in world_to_dict(plain).items() if k != "augment"}).augment is False


def test_every_training_crop_keeps_the_shape_inside_and_readable():
    """Through the training transform (random crop, random flip): every offset and both flips occur, the
    shape is whole in every crop and the named attributes read back."""
    world = ToyWorld(num_unique=60, num_duplicated=2, repeats=3, augment=True)
    transform = ImageTransform(16, center_crop=False, random_flip=True, seed=0)
    seen = set()
    for sample in ToyWorldDataset(world):
        item = world.item(sample["meta"]["item"])
        colour = np.array(COLOURS[item["attrs"]["colour"]])
        shape_pixels = int((item["image"] == colour).all(-1).sum())
        for epoch in range(3):
            pixels, _, (top, left) = transform.apply(sample["image"], sample["key"], epoch)
            crop = pixels.permute(1, 2, 0).numpy()
            assert crop.shape == (16, 16, 3) and top == 0
            flipped = not np.array_equal(crop, np.asarray(sample["image"])[:, left:left + 16])
            seen.add((left, flipped))
            assert int((crop == colour).all(-1).sum()) == shape_pixels            # the whole shape is in the crop
            assert fidelity(crop, item["attrs"], world.spec)["all"], (sample["key"], left, flipped)
    assert seen == {(o, f) for o in range(3) for f in (False, True)}


def test_a_mirrored_copy_replicates_and_a_fresh_item_does_not():
    world = ToyWorld(num_unique=200, num_duplicated=4, repeats=5, augment=True)
    idx, desc, images = training_descriptors(world)
    plain_desc = training_descriptors(ToyWorld(num_unique=200, num_duplicated=4, repeats=5))[1]
    assert np.array_equal(desc.numpy(), plain_desc.numpy())         # the items as the evaluation sees them
    bar = replication_bar(world, desc, n=300, quantile=0.99)
    assert bar["flip_invariant"] and 0.3 < bar["bar"] < 0.9
    # training appearances as the model saw them: mirrored, shifted by a pixel either way
    copies = []
    for i in range(20):
        canvas = world.appearance(i)["image"]
        copies += [canvas[:, 1:17, :][:, ::-1], canvas[:, 0:16][:, ::-1], canvas[:, 2:18]]
    views = np.stack([descriptor_views(c, world) for c in copies])
    assert views.shape[1] == 2
    sims, rows = nearest_training(views, desc)
    assert (sims > bar["bar"]).all(), sims.min()
    assert [idx[r] for r in rows] == [i for i in range(20) for _ in range(3)]
    # the rule without the mirror would miss a mirrored copy: why an augmented world needs it
    mirrored = np.stack([descriptor_views(c, world)[:1] for c in copies[0::3]])
    assert (nearest_training(mirrored, desc)[0] <= bar["bar"]).mean() > 0.5
    fresh = [draw_item(world.seed, "fresh", 5000 + i)["image"] for i in range(200)]
    for images_ in (fresh, [f[:, ::-1] for f in fresh]):
        s, _ = nearest_training(np.stack([descriptor_views(f, world) for f in images_]), desc)
        assert (s > bar["bar"]).mean() < 0.05
    plain = ToyWorld(num_unique=10, num_duplicated=2, repeats=2)
    assert descriptor_views(Image.fromarray(fresh[0]), plain).shape[0] == 1     # without augment: as before


def _demo_cfg(tmp_path, *overrides):
    return compose([f"output_dir={tmp_path / 'demo'}", *overrides], config_name="demo")


def test_the_demo_tells_its_runs_to_crop_and_flip_only_with_augment(tmp_path):
    from memfilter.launch.demo import AUGMENT_OVERRIDES, _train_config, run_overrides

    assert AUGMENT_OVERRIDES == ("center_crop=false", "random_flip=true")
    for augment in (True, False):
        cfg = _demo_cfg(tmp_path, f"world.augment={str(augment).lower()}")
        for name in (*cfg.runs, "dedup-exact"):
            overrides = run_overrides(cfg, name, "/data/shard-000000.tar", tmp_path / name, 3)
            assert ("center_crop=false" in overrides and "random_flip=true" in overrides) is augment, overrides
            train = _train_config(overrides)
            assert (train.center_crop, train.random_flip) == ((False, True) if augment else (True, False))
            assert train.seed == 3 and train.data.name == "webdataset"
    # the demo's `train` and a run's own overrides come after, and win
    cfg = _demo_cfg(tmp_path, "world.augment=true", "train='center_crop=true'")
    assert _train_config(run_overrides(cfg, "filtered", "/d.tar", tmp_path, 0)).center_crop is True


@pytest.mark.parametrize("value", ["maybe", "1", "null"])
def test_a_bad_augment_value_stops_at_start_naming_the_field(tmp_path, value):
    from memfilter.launch.builders import build_world
    from memfilter.launch.demo import run

    with pytest.raises(ConfigError, match=r"world\.augment="):
        run(_demo_cfg(tmp_path, f"world.augment={value}"))
    assert not (tmp_path / "demo").exists()                                   # stopped before writing anything
    with pytest.raises(ConfigError, match=r"^data\.augment="):              # data=world and the prep app
        build_world(compose(["data=world", f"data.augment={value}"]).data, prefix="data")
    with pytest.raises(ValueError, match=r"world\.augment='yes'"):
        ToyWorld(num_unique=3, augment="yes")


def test_the_shipped_base_takes_augmented_crops(one_thread):
    """The base (trained on centred, unshifted items; not rebuilt) encodes and decodes what an augmented run trains
    on: a mirrored item as well as the item; a 1 px shifted crop far less exactly (its VAE never saw one), yet
    the round trip stays its item's copy by the flip-invariant rule and keeps what the caption names in most."""
    import torch
    from diffusers import AutoencoderKL

    from memfilter.toyworld.base import ASSET_DIR

    vae = AutoencoderKL.from_pretrained(ASSET_DIR / "vae").eval()
    world = ToyWorld(num_unique=200, num_duplicated=4, repeats=2, augment=True)
    idx, desc, _ = training_descriptors(world)
    bar = replication_bar(world, desc, n=300)["bar"]
    items = list(range(4, 28))

    def round_trip(crops):
        x = torch.from_numpy(np.stack([np.ascontiguousarray(c) for c in crops])).permute(0, 3, 1, 2) / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        psnr = float((10 * torch.log10(4 / ((rec - x) ** 2).mean((1, 2, 3)))).mean())
        return psnr, ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    canvases = [world.appearance(i)["image"] for i in items]
    psnr, _ = round_trip([c[:, 1:17][:, ::-1] for c in canvases])
    assert psnr > 30, psnr                                             # mirrored: as good as the item (~35 dB)
    psnr, rec = round_trip([c[:, 2:18] for c in canvases] + [c[:, 0:16][:, ::-1] for c in canvases])
    assert psnr > 14, psnr                                             # shifted: ~17.6 dB
    sims, rows = nearest_training(np.stack([descriptor_views(r, world) for r in rec]), desc)
    own = np.array([idx[r] for r in rows]) == np.array(items * 2)
    assert ((sims > bar) & own).mean() >= 0.9, sims
    assert np.mean([fidelity(r, world.item(i)["attrs"], world.spec)["all"] for r, i in zip(rec, items * 2)]) >= 0.75
