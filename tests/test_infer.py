"""Inference API and commands: captions and answers for files, PIL images and videos."""

import json

import av
import numpy as np
import pytest
import torch

import evlgen
from evlgen.cli import main
from evlgen.config import load_config
from evlgen.eval.run import generation_kwargs
from evlgen.infer import pixels_for
from evlgen.model.build import build_vlm
from sample_data import make_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["caption.num_beams=2", "caption.max_new_tokens=6", "vqa.num_beams=1"])
    return build_vlm(cfg, log_table=False).save_pretrained(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for i, (colour, side) in enumerate([("red", "left"), ("blue", "right"), ("green", "left")]):
        paths.append(str(root / f"{i}.png"))
        make_image(colour, side).save(paths[-1])
    return paths


def write_still_video(path, image, frames=6):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = image.width, image.height, "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_caption_matches_generate_on_eval_pixels_and_batches_do_not_matter(model_dir, images):
    from PIL import Image

    from evlgen.data.pipeline import make_sample_maker

    vlm = evlgen.load(str(model_dir)).eval()
    maker = make_sample_maker(vlm.config, vlm.vision.image_size, train=False)
    pixels = torch.stack([maker.transform(Image.open(p).convert("RGB"), None) for p in images])[:, None]
    gen = generation_kwargs(vlm.config.caption)
    expected = [t.strip() for t in vlm.generate(pixels, [vlm.config.caption.prompt] * 3, **gen)]
    got = vlm.caption(images)
    assert got == expected
    assert vlm.caption(images, batch_size=1) == got
    assert vlm.caption([Image.open(images[1])]) == [got[1]]  # a PIL image like its file
    assert len(vlm.caption(images, max_new_tokens=2, min_new_tokens=1)[0].split()) <= 2


def test_a_still_video_captions_like_its_frame(model_dir, tmp_path):
    vlm = evlgen.load(str(model_dir)).eval()
    image = make_image("yellow", "right", size=48)
    image.save(tmp_path / "frame.png")
    write_still_video(tmp_path / "clip.mp4", image)
    video, still = (
        pixels_for(vlm, [str(tmp_path / "clip.mp4")]),
        pixels_for(vlm, [str(tmp_path / "frame.png")]),
    )
    assert video.shape[1] == vlm.config.data.frames and still.shape[1] == 1
    # mpeg4 is lossy: the frames are close to the PNG, not equal
    assert (video.mean(1) - still[:, 0]).abs().mean() < 0.05


def test_answer_uses_the_vqa_prompt_and_checks_counts(model_dir, images):
    vlm = evlgen.load(str(model_dir)).eval()
    prompt = vlm.config.vqa.prompt.format("what colour?")
    expected = vlm.generate(pixels_for(vlm, images[:1]), [prompt], **generation_kwargs(vlm.config.vqa))
    assert vlm.answer(images[:1], ["what colour?"]) == [expected[0].strip()]
    with pytest.raises(ValueError, match="2 inputs but 1 questions"):
        vlm.answer(images[:2], ["what colour?"])


def test_cli_caption_and_vqa(model_dir, images, capsys):
    assert main(["caption", "--checkpoint", str(model_dir), "--json", *images]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == images
    vlm = evlgen.load(str(model_dir)).eval()
    assert [r["caption"] for r in rows] == vlm.caption(images)
    assert main(["vqa", "--checkpoint", str(model_dir), *images[:2], "-q", "what colour?", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in rows] == ["what colour?"] * 2
    assert main(["vqa", "--checkpoint", str(model_dir), *images, "-q", "a?", "-q", "b?"]) == 2
    assert "3 files but 2 questions" in capsys.readouterr().err
