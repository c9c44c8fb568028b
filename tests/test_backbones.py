"""The synthetic world's backbone recipe: dense patch targets and the LM's length-bucketed sampler."""

import threading
import time

import pytest
import torch

from evlgen.config import ConfigError
from evlgen.synth import backbones, world
from evlgen.synth.backbones import _length_bucketed, patch_targets

BG = (len(world.SHAPES), len(world.COLOURS), len(world.SIZES))


def test_patch_targets_hand_checked_centred_object():
    # centre (0.5, 0.5), half extent 7.5/64 * 1.25 = 0.146: of the patch centres (k + 0.5) / 8 only
    # 0.4375 and 0.5625 are that close, so rows 3-4 x columns 3-4 = tokens 27, 28, 35, 36.
    scene = world.Scene((world.Obj("star", "blue", "large", "middle"),))
    targets = patch_targets([scene], 8)[0]  # [64, 3]
    labelled = {i for i in range(64) if tuple(targets[i].tolist()) != BG}
    assert labelled == {27, 28, 35, 36}
    star = (world.SHAPES.index("star"), world.COLOURS.index("blue"), world.SIZES.index("large"))
    assert all(tuple(targets[i].tolist()) == star for i in labelled)


def test_patch_targets_follow_the_rendered_pixels_in_token_order():
    # Off-centre objects: a row / column mix-up or a wrong centre would label the wrong patches.
    scene = world.Scene(
        (
            world.Obj("square", "red", "large", "left", dx=0.02, dy=-0.15),
            world.Obj("circle", "yellow", "small", "right", dx=-0.03, dy=0.12),
        )
    )
    targets = patch_targets([scene], 8)[0]  # [64, 3]
    pixels = torch.tensor(list(world.render(scene, 64).getdata())).view(8, 8, 8, 8, 3)  # [gy, y, gx, x, 3]
    for o in scene.objects:
        rgb = torch.tensor(world.RGB[o.colour])
        hits = (pixels == rgb).all(-1).permute(0, 2, 1, 3).flatten(2).sum(-1).flatten()  # [64] per patch
        mine = {i for i in range(64) if targets[i, 1] == world.COLOURS.index(o.colour)}
        assert mine, o
        assert all(hits[i] > 0 for i in mine), (o, mine, hits.nonzero().flatten().tolist())
        assert int(hits.argmax()) in mine  # the patch the object fills most is labelled with it
        assert all(targets[i, 0] == world.SHAPES.index(o.shape) for i in mine)
    assert (targets[:, 0] == BG[0]).sum() == 64 - sum(
        1 for i in range(64) if tuple(targets[i].tolist()) != BG
    )


def test_length_bucketed_visits_every_sequence_once_per_epoch_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (1000,), generator=g).tolist()
    batches = _length_bucketed(lengths, 32, torch.Generator().manual_seed(1))
    epoch: list[list[int]] = []
    while sum(map(len, epoch)) < 1000:
        epoch.append(next(batches))
    assert sorted(i for b in epoch for i in b) == list(range(1000))  # once each, nothing extra
    assert sorted(next(batches) + next(batches)) != sorted(epoch[0] + epoch[1])  # a fresh order next
    padding = sum(max(lengths[i] for i in b) - lengths[i] for b in epoch for i in b) / sum(map(len, epoch))
    shuffled = torch.randperm(1000, generator=g).tolist()
    random_padding = (
        sum(
            max(lengths[i] for i in shuffled[k : k + 32]) - lengths[i]
            for k in range(0, 1000, 32)
            for i in shuffled[k : k + 32]
        )
        / 1000
    )
    assert padding < 0.25 * random_padding, (padding, random_padding)


def test_concurrent_builders_of_one_recipe_build_once(tmp_path, monkeypatch):
    calls = []

    def slow_build(recipe, out, progress):
        calls.append(out)
        tmp = out.parent / f".{out.name}.tmp-{len(calls)}"
        tmp.mkdir()
        time.sleep(0.3)  # long enough for the other thread to arrive while this build runs
        (tmp / "recipe.json").write_text("{}")
        tmp.rename(out)

    monkeypatch.setattr(backbones, "_build_backbones", slow_build)
    recipe = backbones.Recipe(seed=7)
    stale = backbones.backbones_dir(recipe, tmp_path)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(backbones.ensure_backbones(recipe, tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [stale, stale]
    assert (stale / "recipe.json").is_file()


def test_a_killed_builds_leftovers_are_removed_under_the_lock(tmp_path, monkeypatch):
    recipe = backbones.Recipe(seed=8)
    out = backbones.backbones_dir(recipe, tmp_path)
    out.parent.mkdir(parents=True)
    leftover = out.parent / f".{out.name}.tmp-999999"
    leftover.mkdir()
    monkeypatch.setattr(backbones, "train_lm", lambda *a, **k: (_Saveable(), 1.0))
    monkeypatch.setattr(backbones, "train_vision", lambda *a, **k: (_Saveable(), 1.0))
    monkeypatch.setattr(backbones, "lm_corpus", lambda r, rng: [("left: nothing.", "caption: a red circle")])
    assert backbones.ensure_backbones(recipe, tmp_path) == out
    assert (
        not leftover.exists() and (out / "llm" / "saved").is_file() and (out / "vision" / "saved").is_file()
    )


class _Saveable:
    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "saved").write_text("x")


def test_recipe_changes_are_typed_and_bad_ones_named():
    base = backbones.Recipe()
    changed = backbones.recipe_with(base, ["lm_hidden=256", "lm_lr=1e-3", "shuffle_slots=false"])
    assert (changed.lm_hidden, changed.lm_lr, changed.shuffle_slots) == (256, 1e-3, False)
    assert changed.digest() != base.digest() and backbones.recipe_with(base, []) == base
    with pytest.raises(ConfigError, match="lm_hiden"):
        backbones.recipe_with(base, ["lm_hiden=256"])
    with pytest.raises(ConfigError, match="lm_hidden: 'big' is not a valid int"):
        backbones.recipe_with(base, ["lm_hidden=big"])
    with pytest.raises(ConfigError, match="shuffle_slots"):
        backbones.recipe_with(base, ["shuffle_slots=yes"])
