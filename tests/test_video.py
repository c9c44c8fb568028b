"""Tests for evlgen.data.video: which frames are sampled, determinism, and bad clips."""

import numpy as np
import pytest
import torch

from evlgen.data.transforms import ImageLoadError
from evlgen.data.video import check_video, load_video_frames, sample_frame_indices

av = pytest.importorskip("av")

STEP = 15  # frame i is solid grey i * STEP, so a decoded frame tells which source frame it was


def _write_clip(path, n=16, codec="mpeg4", size=32):
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * STEP, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _ids(frames):
    return [int(round(np.asarray(f, dtype=np.float64).mean() / STEP)) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_eval_indices_are_segment_centres():
    # Exact centres 1.5, 5.5, 9.5, 13.5: halfway cases go towards the nearer end of the clip.
    assert sample_frame_indices(16, 4, train=False) == [1, 5, 10, 14]
    assert sample_frame_indices(10, 3, train=False) == [1, 4, 8]  # centres 1.17, 4.5, 7.83
    assert sample_frame_indices(8, 4, train=False) == [0, 2, 5, 7]
    assert sample_frame_indices(1, 4, train=False) == [0, 0, 0, 0]
    assert sample_frame_indices(3, 4, train=False) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="Generator"):
        sample_frame_indices(16, 4, train=True)


def test_train_indices_one_per_segment():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = sample_frame_indices(17, 4, train=True, generator=g)
        # Segments of 17 frames into 4: [0,4) [4,8) [8,12) [12,17).
        for j, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12), (12, 17)]):
            assert lo <= idx[j] < hi
    state = torch.random.get_rng_state()
    sample_frame_indices(16, 4, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never used


def test_eval_indices_mirror_under_reversal():
    # A clip played backwards gets the mirrored frames: frame order is the only difference.
    for total in range(1, 60):
        for n in range(1, 9):
            idx = sample_frame_indices(total, n, train=False)
            mirrored = [total - 1 - i for i in reversed(idx)]
            if n % 2 == 0 or total % 2 == 1:
                assert idx == mirrored, (total, n)
            else:  # the middle sample sits between two frames: one of them must be chosen
                assert sum(a != b for a, b in zip(idx, mirrored, strict=True)) <= 1, (total, n)


def test_head_tail_train_sampling():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        idx = sample_frame_indices(17, 4, train=True, generator=g, mode="head-tail")
        assert idx == sorted(idx) and len(set(idx)) == 4
        assert all(i < 8 for i in idx[:2]) and all(8 <= i < 17 for i in idx[2:])
        seen.update(idx)
    assert seen == set(range(17))  # every frame can be drawn
    assert sample_frame_indices(3, 4, train=True, generator=g, mode="head-tail")[-1] <= 2
    assert sample_frame_indices(16, 4, train=False, mode="head-tail") == [1, 5, 10, 14]  # eval: centres
    with pytest.raises(ValueError, match="sampling mode"):
        sample_frame_indices(16, 4, train=True, generator=g, mode="uniform")


def test_clip_from_bytes(clip):
    data = open(clip, "rb").read()
    frames = load_video_frames(data, 4, train=False, generator=None, max_pixels=10_000, name="shard.tar:k")
    assert _ids(frames) == [1, 5, 10, 14]
    check_video(data, 10_000, name="shard.tar:k")
    with pytest.raises(ImageLoadError, match="shard.tar:k"):
        load_video_frames(
            data[: len(data) // 2], 4, train=False, generator=None, max_pixels=10_000, name="shard.tar:k"
        )


def test_eval_frames(clip):
    frames = load_video_frames(clip, 4, train=False, generator=None, max_pixels=10_000)
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    assert _ids(frames) == [1, 5, 10, 14]
    assert _ids(load_video_frames(clip, 1, train=False, generator=None, max_pixels=10_000)) == [7]


def test_train_frames_deterministic_per_seed(clip):
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return _ids(load_video_frames(clip, 4, train=True, generator=g, max_pixels=10_000))

    first = draw(3)
    assert first == draw(3)
    assert all(4 * j <= i < 4 * (j + 1) for j, i in enumerate(first))
    draws = {tuple(draw(seed)) for seed in range(8)}
    assert len(draws) > 1
    # The frames chosen are exactly the indices the sampler draws from the same generator state.
    assert first == sample_frame_indices(16, 4, train=True, generator=torch.Generator().manual_seed(3))


def test_frame_count_unknown_to_container(tmp_path):
    # Matroska stores no frame count, so the clip is counted by decoding first.
    path = _write_clip(tmp_path / "clip.mkv", n=12)
    with av.open(path) as container:
        assert not container.streams.video[0].frames
    assert _ids(load_video_frames(path, 3, train=False, generator=None, max_pixels=10_000)) == [1, 5, 10]


def test_container_overstating_its_frame_count(clip, monkeypatch):
    import evlgen.data.video as V

    class Stream:
        def __init__(self, real):
            self.real = real

        frames = 40  # the clip really has 16

        def __getattr__(self, name):
            return getattr(self.real, name)

    class Container:
        def __init__(self, real):
            self.real = real

        def decode(self, stream):
            return self.real.decode(stream.real)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    real_open = V._open

    def lying_open(av_module, source, max_pixels, path=""):
        container, stream = real_open(av_module, source, max_pixels, path)
        return Container(container), Stream(stream)

    monkeypatch.setattr(V, "_open", lying_open)
    # Centres of 4 segments of 40 would be 4-5, 14-15, 24-25, 34-35; frames from 16 on do not exist, so
    # the clip is sampled again over the 16 frames that were decoded.
    assert _ids(load_video_frames(clip, 4, train=False, generator=None, max_pixels=10_000)) == [1, 5, 10, 14]


def test_libx264_if_available(tmp_path):
    if "libx264" not in av.codecs_available:
        pytest.skip("libx264 not available")
    path = _write_clip(tmp_path / "h264.mp4", n=8, codec="libx264")
    assert _ids(load_video_frames(path, 2, train=False, generator=None, max_pixels=10_000)) == [1, 6]


def test_bad_clips(tmp_path, clip):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a video" * 200)
    with pytest.raises(ImageLoadError, match="garbage.mp4"):
        load_video_frames(str(garbage), 4, train=False, generator=None, max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="garbage.mp4"):
        check_video(str(garbage), 10_000)
    half = tmp_path / "half.mp4"
    data = open(clip, "rb").read()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="half.mp4"):
        load_video_frames(str(half), 4, train=False, generator=None, max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="missing.mp4"):
        load_video_frames(str(tmp_path / "missing.mp4"), 4, train=False, generator=None, max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="exceeds the pixel limit"):
        load_video_frames(clip, 4, train=False, generator=None, max_pixels=32 * 32 - 1)
    check_video(clip, 10_000)


def test_argument_errors(clip):
    with pytest.raises(ValueError, match="Generator"):
        load_video_frames(clip, 4, train=True, generator=None, max_pixels=10_000)
    with pytest.raises(ValueError, match="num_frames"):
        load_video_frames(clip, 0, train=False, generator=None, max_pixels=10_000)
    with pytest.raises(ValueError, match="max_pixels"):
        load_video_frames(clip, 4, train=False, generator=None, max_pixels=0)
