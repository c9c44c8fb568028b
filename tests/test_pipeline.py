"""The training data stream: permutation, mixing, rank/worker splits and exact restarts."""

import io
import itertools
import tarfile
from collections import Counter

import pytest
import torch

from evlgen.config import DatasetConfig, load_config
from evlgen.data.pipeline import (
    TrainStream,
    cumulative_weights,
    fixed_batches,
    make_loader,
    make_sample_maker,
    mixing_choice,
    open_sources,
    permute,
)
from sample_data import caption_dataset, make_image


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 63, 64, 65, 1000])
def test_permute_is_a_bijection(n):
    out = [permute(i, n, key=12345) for i in range(n)]
    assert sorted(out) == list(range(n))


def test_permute_depends_on_the_key_and_shuffles():
    n = 500
    a = [permute(i, n, 1) for i in range(n)]
    b = [permute(i, n, 2) for i in range(n)]
    assert a != b
    # Not close to the identity: few fixed points, like a random permutation (expected 1).
    assert sum(x == i for i, x in enumerate(a)) < 10
    with pytest.raises(IndexError):
        permute(n, n, 1)


def test_mixing_follows_the_ratios():
    cum = cumulative_weights([15, 4, 1])
    counts = Counter(mixing_choice(b, cum, seed=0) for b in range(20000))
    for d, w in enumerate([0.75, 0.2, 0.05]):
        assert abs(counts[d] / 20000 - w) < 0.015
    assert [mixing_choice(b, cum, 0) for b in range(50)] != [mixing_choice(b, cum, 1) for b in range(50)]
    with pytest.raises(ValueError, match="weights"):
        cumulative_weights([0, 0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    path = caption_dataset(root, 20)
    cfg = load_config("tiny", [f"data.train=[{{path: {path}}}]"])
    sources = open_sources(cfg.data.train)
    maker = make_sample_maker(cfg, 32, train=True)
    return cfg, sources, maker


def take(stream, n, workers=0):
    if workers:
        return list(itertools.islice(iter(make_loader(stream, workers)), n))
    return list(itertools.islice(iter(stream), n))


def same(a, b):
    return [x.index for x in a] == [y.index for y in b] and all(
        x.keys == y.keys and x.targets == y.targets and torch.equal(x.pixels, y.pixels)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_stream_restarts_exactly_with_and_without_workers(setup):
    _, sources, maker = setup
    full = take(TrainStream(sources, [1.0], maker, batch_size=4, seed=3), 12)
    later = take(TrainStream(sources, [1.0], maker, batch_size=4, seed=3, start=7), 5)
    assert same(full[7:], later)
    assert same(full, take(TrainStream(sources, [1.0], maker, batch_size=4, seed=3), 12, workers=2))
    assert same(
        full[7:], take(TrainStream(sources, [1.0], maker, batch_size=4, seed=3, start=7), 5, workers=3)
    )


def test_epochs_cover_every_row_once_and_reshuffle(setup):
    _, sources, maker = setup
    batches = take(TrainStream(sources, [1.0], maker, batch_size=5, seed=0), 8)
    epoch0 = [k for b in batches[:4] for k in b.keys]
    epoch1 = [k for b in batches[4:] for k in b.keys]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 20
    assert epoch0 != epoch1


def test_ranks_split_each_epoch_and_match_one_process(setup):
    _, sources, maker = setup
    one = take(TrainStream(sources, [1.0], maker, batch_size=4, seed=5), 5)
    ranks = [
        take(TrainStream(sources, [1.0], maker, batch_size=2, seed=5, rank=r, world_size=2), 5)
        for r in (0, 1)
    ]
    for b in range(5):
        keys = ranks[0][b].keys + ranks[1][b].keys
        assert len(set(keys)) == 4
        # The same global batch as one process with twice the batch, with the same augmentation.
        assert sorted(keys) == sorted(one[b].keys)
        merged = {k: p for r in ranks for k, p in zip(r[b].keys, r[b].pixels, strict=True)}
        for k, p in zip(one[b].keys, one[b].pixels, strict=True):
            assert torch.equal(merged[k], p)


def test_mixing_draws_each_batch_from_one_dataset(tmp_path):
    a = caption_dataset(tmp_path / "a", 8)
    b = caption_dataset(tmp_path / "b", 8)
    cfg = load_config("tiny", [f"data.train=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"])
    sources = open_sources(cfg.data.train)
    stream = TrainStream(sources, [3, 1], make_sample_maker(cfg, 32, True), batch_size=2, seed=0)
    batches = take(stream, 200)
    share = sum(bt.dataset == 0 for bt in batches) / 200
    assert 0.65 < share < 0.85
    later = take(
        TrainStream(sources, [3, 1], make_sample_maker(cfg, 32, True), batch_size=2, seed=0, start=150), 50
    )
    assert same(batches[150:], later)


def write_shards(folder, n_shards, per_shard):
    folder.mkdir()
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                make_image("red" if k % 2 else "blue", "left").save(buf, format="JPEG")
                for name, data in (
                    (f"{k:06d}.jpg", buf.getvalue()),
                    (f"{k:06d}.txt", f"sample {k}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return folder


@pytest.mark.parametrize("n_shards", [8, 1])
def test_webdataset_stream_splits_slots_and_restarts(tmp_path, n_shards):
    folder = write_shards(tmp_path / "shards", n_shards, 24 // n_shards)
    cfg = load_config("tiny", [f"data.train=[{{path: {folder}}}]"])
    sources = open_sources(cfg.data.train)
    maker = make_sample_maker(cfg, 32, True)

    def stream(rank, start=0):
        return TrainStream(sources, [1.0], maker, batch_size=3, seed=1, rank=rank, world_size=2, start=start)

    per_rank = [take(stream(r), 4, workers=2) for r in (0, 1)]
    keys = [k for r in per_rank for b in r for k in b.keys]
    assert len(keys) == 24 and len(set(keys)) == 24  # one epoch, every sample once, no overlap
    assert same(per_rank[1][3:], take(stream(1, start=3), 1, workers=2))


def test_fixed_batches_use_eval_transforms_and_count_bad(tmp_path):
    path = caption_dataset(tmp_path / "d", 10, corrupt=2)
    cfg = load_config("tiny", [])
    source = open_sources([DatasetConfig(path=str(path))])[0]
    batches, bad = fixed_batches(source, make_sample_maker(cfg, 32, train=False), n=6, batch_size=4)
    assert bad == 2 and [len(b) for b in batches] == [4, 2]
    again, _ = fixed_batches(source, make_sample_maker(cfg, 32, train=False), n=6, batch_size=4)
    assert torch.equal(batches[0].pixels, again[0].pixels)
