"""The synthetic-video benchmark's pieces: clip captions parsed back by the grammar, order-dependent
scoring (a reversed clip's caption is wrong exactly on order-dependent motions), the LM's clip
descriptions, and the video backbones' separate cache key."""

import dataclasses
import random

from evlgen.synth import video
from evlgen.synth.backbones import Recipe, lm_corpus
from evlgen.synth.video_demo import VARIANTS, render_table, video_recipe


def test_event_captions_parse_back_to_their_clip():
    rng = random.Random(0)
    for _ in range(300):
        clip = video.sample_clip(rng)
        captions = video.clip_captions(clip, rng, 5, listing=False)
        for cap in captions:
            m = video.clip_match(cap, clip)
            assert m["objects"] and all(t["correct"] and t["kind_correct"] for t in m["tracks"]), cap
        # Played backwards, the same caption is wrong exactly where the motion needs frame order.
        m = video.clip_match(captions[0], clip.reversed())
        for t in m["tracks"]:
            assert t["correct"] == (t["motion"] not in video.ORDER_MOTIONS)
            assert t["kind_correct"]


def test_parser_on_hand_written_captions():
    assert video.parse_clip_caption(
        "a small red circle disappears from the left while a blue star appears"
    ) == [
        ("red", "circle", "disappear"),
        ("blue", "star", "appear"),
    ]
    assert video.parse_clip_caption("two green squares slide to the right") == [
        ("green", "square", "rightward")
    ]
    assert video.parse_clip_caption("a yellow triangle") == [("yellow", "triangle", None)]
    clip = video.Clip((video.Track("star", "blue", "small", "leftward", "right", 0),))
    m = video.clip_match("a blue star moves from left to right", clip)
    assert m["objects"] and m["tracks"] == [{"motion": "leftward", "kind_correct": True, "correct": False}]
    assert not video.clip_match("a red star moves to the left", clip)["objects"]


def test_clip_slots_name_every_band():
    clip = video.Clip((video.Track("circle", "red", "large", "rightward", "left", 1),))
    assert video.clip_slots(clip) == "top: nothing. bottom: a large red circle moves from left to right."


def test_video_backbones_have_their_own_cache_key_and_the_image_corpus_is_unchanged():
    image, vid = Recipe(), video_recipe()
    # Pinned: a recipe change must change the key, or an old cache would pass for the new recipe. Fields
    # added later are left out of the digest at their old value, so older caches keep their keys.
    assert image.video_clips == 0 and not image.shuffle_slots and image.digest() == "b667ece6a6023097"
    assert vid.digest() == "6194885f5fb61064"
    assert dataclasses.replace(image, shuffle_slots=True).digest() not in ("b667ece6a6023097", vid.digest())
    narrow = dataclasses.replace(image, lm_ffn=256)  # an FFN narrower than 4 x hidden: its own key
    assert narrow.digest() != image.digest()
    assert (narrow.lm_arch(400)["ffn_dim"], image.lm_arch(400)["ffn_dim"]) == (256, 512)
    small = dataclasses.replace(image, corpus_scenes=20)
    plain = lm_corpus(small, random.Random(0))
    with_clips = lm_corpus(dataclasses.replace(small, video_clips=10), random.Random(0))
    assert len(with_clips) == len(plain) + 30
    assert sorted(plain) == sorted(p for p in with_clips if not p[0].startswith("top:"))
    assert all(d.startswith("left:") for d, _ in plain)
    shuffled = lm_corpus(dataclasses.replace(small, shuffle_slots=True), random.Random(0))
    assert {d.split(":")[0] for d, _ in shuffled} == {"left", "middle", "right"}  # any slot may come first
    assert any("moves from" in text for _, text in with_clips)


def test_render_table_averages_seeds():
    row = {
        "cider": 1.0,
        "objects": 0.9,
        "still": 0.8,
        "motion_kind": 0.7,
        "order": 0.5,
        "order_given_kind": 0.6,
        "train_seconds": 100.0,
    }
    table = render_table({"paper/seed0": row, "paper/seed1": row | {"order": 0.7}})
    assert "| paper | 2 | 1.000 (1.00-1.00)" in table and "0.600 (0.50-0.70)" in table
    assert set(VARIANTS) >= {"frame-mean", "paper", "time-embed", "concat"}
