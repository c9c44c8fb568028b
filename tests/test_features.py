"""Frozen-feature cache: stored features are the tower's outputs, and training from them matches pixels."""

import json

import pytest
import torch

from evlgen.config import ConfigError, DatasetConfig, load_config
from evlgen.data.features import FeatureSource, cache_features
from evlgen.data.pipeline import fixed_batches, make_sample_maker, open_sources
from evlgen.model.build import build_vlm
from evlgen.train.loop import train
from sample_data import caption_dataset
from test_train import cfg_for, losses

# With scale 1 on square images RandomResizedCrop keeps the whole image: train == eval transforms.
NO_AUG = ["data.crop_scale=[1.0, 1.0]", "data.num_workers=0", "train.val_every=0", "train.sample_every=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_dataset(tmp_path_factory.mktemp("data"), 24, corrupt=0)


def test_cache_holds_the_tower_outputs(tmp_path, data):
    cfg = load_config("tiny", [])
    out = tmp_path / "feats"
    summary = cache_features(
        cfg, DatasetConfig(path=str(data)), out, batch_size=5, shard_size=7, dtype="float32"
    )
    assert summary["rows"] == 24 and summary["bad_samples"] == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [7, 7, 7, 3]
    source = FeatureSource(out)
    torch.manual_seed(cfg.seed)
    vlm = build_vlm(cfg, log_table=False)
    batches, _ = fixed_batches(
        open_sources([DatasetConfig(path=str(data))])[0], make_sample_maker(cfg, 32, train=False), 24, 24
    )
    expected = vlm.tower_features(batches[0].pixels)  # [24, N, D]
    for i in (0, 6, 7, 23):
        rec = source.get(i)
        assert rec.key == batches[0].keys[i] and rec.captions == (batches[0].targets[i],)
        torch.testing.assert_close(rec.features[0], expected[i], rtol=1e-5, atol=1e-5)


def test_training_from_the_cache_matches_training_from_pixels(tmp_path, data):
    base = load_config("tiny", NO_AUG)
    cache_features(base, DatasetConfig(path=str(data)), tmp_path / "feats", dtype="float32")
    train(cfg_for(data, *NO_AUG), tmp_path / "pixels")
    summary = train(cfg_for(tmp_path / "feats", *NO_AUG), tmp_path / "from-cache")
    assert summary["completed"]
    a, b = losses(tmp_path / "pixels"), losses(tmp_path / "from-cache")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_a_cache_from_another_tower_is_refused(tmp_path, data):
    cache_features(load_config("tiny", []), DatasetConfig(path=str(data)), tmp_path / "feats")
    with pytest.raises(ConfigError, match="vision-tower weights"):
        train(cfg_for(tmp_path / "feats", "seed=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match="layer: cache -1, config -2"):
        train(cfg_for(tmp_path / "feats", "vision.layer=-2"), tmp_path / "run2")


def test_a_cache_names_its_frame_sampling_and_old_caches_still_match(tmp_path, data):
    cache_features(load_config("tiny", []), DatasetConfig(path=str(data)), tmp_path / "feats")
    index = json.loads((tmp_path / "feats" / "index.json").read_text())
    assert "frame_sampling" not in index["tower"]  # the default leaves the identity as it always was
    FeatureSource(tmp_path / "feats").check_compatible(load_config("tiny", []))
    with pytest.raises(ConfigError, match="frame_sampling: cache None, config 'head-tail'"):
        FeatureSource(tmp_path / "feats").check_compatible(
            load_config("tiny", ["data.frame_sampling=head-tail"])
        )
