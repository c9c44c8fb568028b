"""`evlgen serve` without a browser: upload validation against the limits, and the request path (validate,
then `evlgen.infer`) on a tiny model, including the time limit. The page itself: test_serve_browser.py."""

import pytest
import torch
from PIL import Image

from evlgen.config import load_config
from evlgen.model.build import build_vlm
from evlgen.serve import Limits, Predictor, RequestTimeout, UploadError, validate_question, validate_upload

LIMITS = Limits(
    max_bytes=50_000, max_pixels=64 * 64, max_video_seconds=2.0, max_video_frames=30, timeout_s=30
)


def image_file(path, size=(48, 40), colour="red"):
    Image.new("RGB", size, colour).save(path)
    return path


def video_file(path, frames, fps=8, size=32):
    from evlgen.synth.video import write_mp4

    write_mp4(path, [Image.new("RGB", (size, size), (i * 10, 0, 0)) for i in range(frames)], fps=fps)
    return path


def test_good_image_is_decoded_once_upright_rgb(tmp_path):
    up = validate_upload(image_file(tmp_path / "a.png"), LIMITS, name="photo.png")
    assert up.image.size == (48, 40) and up.image.mode == "RGB" and up.name == "photo.png"


def write(path, data):
    path.write_bytes(data)
    return path


BAD_IMAGES = {
    "nothing": (lambda d: None, "Upload an image or a short video first"),
    "missing": (lambda d: d / "absent.png", "the upload did not arrive"),
    "empty": (lambda d: write(d / "empty.png", b""), "the file is empty"),
    "too many pixels": (
        lambda d: image_file(d / "big.png", (65, 64)),
        r"65x64 = 4160 pixels exceeds .*Downscale",
    ),
    "text as jpg": (lambda d: write(d / "x.jpg", b"hello"), "x.jpg: not an image this demo can read"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_get_clear_messages(tmp_path, case):
    make, message = BAD_IMAGES[case]
    with pytest.raises(UploadError, match=message):
        validate_upload(make(tmp_path), LIMITS)


def test_size_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG" + bytes(60_000))  # not even a valid PNG: the size check comes first
    with pytest.raises(
        UploadError, match=r"huge.png: the file is 0.1 MB; this demo takes files up to 0.05 MB"
    ):
        validate_upload(path, LIMITS)


def test_video_limits(tmp_path):
    pytest.importorskip("av")
    ok = validate_upload(video_file(tmp_path / "ok.mp4", 12), LIMITS)  # 1.5 s at 8 fps
    assert ok.image is None and ok.frames == 12 and ok.seconds == pytest.approx(1.5, abs=0.2)
    with pytest.raises(UploadError, match=r"long.mp4: the video is 2\.\d s long; .* up to 2 s"):
        validate_upload(video_file(tmp_path / "long.mp4", 20), LIMITS)
    with pytest.raises(UploadError, match="more than 30 frames"):
        validate_upload(video_file(tmp_path / "many.mp4", 40, fps=40), LIMITS)  # 1 s, but 40 frames
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(UploadError, match="junk.mp4: not a video this demo can read"):
        validate_upload(tmp_path / "junk.mp4", LIMITS)


def test_questions():
    assert validate_question("  what colour?  ", LIMITS) == "what colour?"
    with pytest.raises(UploadError, match="Type a question first"):
        validate_question("   ", LIMITS)
    with pytest.raises(UploadError, match="301 characters long"):
        validate_question("x" * 301, LIMITS)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_vlm(
        load_config(
            "tiny",
            ["caption.max_new_tokens=4", "caption.num_beams=1", "vqa.max_new_tokens=3", "vqa.num_beams=1"],
        ),
        log_table=False,
    )


def test_predictor_uses_infer_and_keeps_going_after_bad_files(tiny, tmp_path):
    pred = Predictor(tiny, LIMITS)
    path = image_file(tmp_path / "a.png")
    text, shown = pred.caption(str(path))
    assert text == tiny.caption([Image.open(path)])[0]  # the same as `evlgen caption`
    assert shown.size == (48, 40)
    with pytest.raises(UploadError, match="not an image"):
        pred.caption(str(write(tmp_path / "b.png", b"junk")))
    answer, _ = pred.answer(str(path), "what colour is it?")
    assert answer == tiny.answer([str(path)], ["what colour is it?"])[0]
    pytest.importorskip("av")
    text, strip = pred.caption(str(video_file(tmp_path / "v.mp4", 8)))
    assert text == tiny.caption([str(tmp_path / "v.mp4")])[0]
    assert strip.size == (4 * 32, 32)  # the 4 sampled frames side by side


def test_time_limit_is_an_error_not_a_truncated_caption(tiny, tmp_path):
    pred = Predictor(tiny, Limits(timeout_s=1e-6))
    with pytest.raises(RequestTimeout, match="longer than the 1e-06 s limit"):
        pred.caption(str(image_file(tmp_path / "a.png")))
