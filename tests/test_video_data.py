"""Video rows end to end through the data path: JSONL `video` rows and WebDataset `.mp4` members become
[T, 3, H, W] clips with one crop for all frames, and broken clips are skipped and counted."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from evlgen.config import DatasetConfig, load_config
from evlgen.data.check import check_dataset
from evlgen.data.pipeline import TrainStream, fixed_batches, make_sample_maker, open_sources
from evlgen.data.webdataset import WebDatasetSource

av = pytest.importorskip("av")

STEP = 20


def clip_bytes(n: int = 8, size: int = 32) -> bytes:
    """Frame i is solid grey i * STEP."""
    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * STEP, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return buf.getvalue()


def frame_ids(pixels: torch.Tensor, cfg) -> list[int]:
    """Undo the normalisation and read back which source frame each of [T, 3, H, W] is."""
    mean = torch.tensor(cfg.vision.image_mean)[:, None, None]
    std = torch.tensor(cfg.vision.image_std)[:, None, None]
    grey = [float(((f * std + mean) * 255).mean()) for f in pixels]
    return [round(g / STEP) for g in grey]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    (root / "good.mp4").write_bytes(clip_bytes())
    (root / "bad.mp4").write_bytes(clip_bytes()[:300])
    rows = [
        {"video": "good.mp4", "caption": "a grey clip"},
        {"video": "bad.mp4", "caption": "a truncated clip"},
        {"video": "gone.mp4", "caption": "a missing clip"},
        {"video": "good.mp4", "caption": "the same clip again"},
    ]
    path = root / "clips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_video_rows_eval_frames_and_bad_clips_counted(jsonl):
    cfg = load_config("tiny", ["data.frames=4"])
    maker = make_sample_maker(cfg, 32, train=False)
    (source,) = open_sources([DatasetConfig(path=str(jsonl))])
    batches, bad = fixed_batches(source, maker, 10, 8)
    assert bad == 2 and len(batches) == 1
    batch = batches[0]
    assert batch.pixels.shape == (2, 4, 3, 32, 32)
    assert frame_ids(batch.pixels[0], cfg) == [0, 2, 5, 7]  # segment centres of 8 frames
    assert [loc for loc, _ in batch.bad] == [f"{jsonl}:2", f"{jsonl}:3"]
    assert "bad.mp4" in batch.bad[0][1] and "gone.mp4" in batch.bad[1][1]


@pytest.mark.parametrize("mode", ["segments", "head-tail"])
def test_training_stream_samples_frames_in_order_per_mode(jsonl, mode):
    cfg = load_config("tiny", ["data.frames=4", f"data.frame_sampling={mode}", "data.crop_scale=[1.0, 1.0]"])
    maker = make_sample_maker(cfg, 32, train=True)
    (source,) = open_sources([DatasetConfig(path=str(jsonl))])
    stream = TrainStream([source], [1.0], maker, batch_size=2, seed=0, rank=0, world_size=1, start=0)
    draws, bad = [], 0
    it = iter(stream)
    for _ in range(8):
        batch = next(it)
        bad += batch.num_bad
        for clip in batch.pixels if batch.pixels is not None else []:
            ids = frame_ids(clip, cfg)
            assert ids == sorted(ids)
            if mode == "head-tail":
                assert all(i < 4 for i in ids[:2]) and all(i >= 4 for i in ids[2:])
            else:
                assert all(2 * j <= i < 2 * j + 2 for j, i in enumerate(ids))
            draws.append(tuple(ids))
    assert len(set(draws)) > 1 and bad > 0  # random offsets; broken clips skipped and counted


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_mp4_members(tmp_path):
    good = clip_bytes()
    shard = tmp_path / "videos-000.tar"
    write_shard(
        shard,
        [
            ("000.mp4", good),
            ("000.txt", b"a grey clip"),
            ("001.mp4", good[:300]),
            ("001.txt", b"a truncated clip"),
            ("002.webm", b"junk"),
            ("002.json", json.dumps({"question": "what colour?", "answers": ["grey"]}).encode()),
        ],
    )
    records = list(WebDatasetSource(str(shard)).iter_shard(str(shard)))
    assert [r.name for r in records] == ["000.mp4", "001.mp4", "002.webm"]
    assert records[0].image is None and records[0].video == good and records[0].captions == ("a grey clip",)
    assert records[2].question == "what colour?"

    cfg = load_config("tiny", ["data.frames=4"])
    (source,) = open_sources([DatasetConfig(path=str(shard))])
    batches, bad = fixed_batches(source, make_sample_maker(cfg, 32, train=False), 10, 8)
    assert bad == 2 and batches[0].pixels.shape == (1, 4, 3, 32, 32)
    assert frame_ids(batches[0].pixels[0], cfg) == [0, 2, 5, 7]
    assert all(loc.startswith(f"{shard}:00") for loc, _ in batches[0].bad)

    report = check_dataset(DatasetConfig(path=str(shard)))
    assert (report.usable, report.bad_videos, report.videos) == (1, 2, 1)
