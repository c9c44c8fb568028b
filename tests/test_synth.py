"""Tests for evlgen.synth.world and evlgen.synth.video: determinism, grammar coverage, parsing back, answers
recomputed from the scene, held-out splits, the written dataset read by evlgen's own readers, and clips."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from evlgen.data.sources import JsonlSource, WebDatasetSource
from evlgen.data.transforms import load_image
from evlgen.synth import video as V
from evlgen.synth import world as W

SMALL = {"train": 12, "val": 3, "test": 4, "comp": 5}


def _scenes(seed, n, **kw):
    rng = random.Random(seed)
    return [W.sample_scene(rng, **kw) for _ in range(n)]


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Determinism


def _sample_text(seed):
    rng = random.Random(seed)
    out = []
    for _ in range(50):
        scene = W.sample_scene(rng)
        out.append((scene, W.captions(scene, rng), W.questions(scene, rng)))
    return out


def test_same_seed_same_world_different_seed_different_world(tmp_path):
    assert _sample_text(0) == _sample_text(0)
    assert _sample_text(0) != _sample_text(1)
    scene = _scenes(3, 1)[0]
    assert W.render(scene).tobytes() == W.render(scene).tobytes()
    assert W.lm_corpus(random.Random(0), 20) == W.lm_corpus(random.Random(0), 20)

    a = W.write_world(tmp_path / "a", seed=5, sizes=SMALL, shards=True)
    b = W.write_world(tmp_path / "b", seed=5, sizes=SMALL, shards=True)
    assert not a["cached"] and not b["cached"]
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    W.write_world(tmp_path / "c", seed=6, sizes=SMALL)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


def test_splits_use_disjoint_streams(tmp_path):
    W.write_world(tmp_path / "w", seed=0, sizes={"train": 50, "val": 50, "test": 50, "comp": 5})
    scenes = {
        split: [json.dumps(json.loads(line)["scene"]) for line in open(tmp_path / "w" / f"{split}.jsonl")]
        for split in ("train", "val", "test")
    }
    # Jitter is part of the scene, so a shared random stream would show up as identical scenes.
    assert not set(scenes["train"]) & set(scenes["val"]) and not set(scenes["train"]) & set(scenes["test"])


# ---------------------------------------------------------------------------------------------
# Grammar


def test_grammar_coverage_and_distinct_captions():
    rng = random.Random(0)
    words, counts, group_sizes = Counter(), Counter(), Counter()
    for scene in _scenes(1, 400):
        caps = W.captions(scene, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert cap == cap.lower() and not cap.endswith(".") and cap == cap.strip()
            words.update(re.findall(r"[a-z]+", cap))
        counts[len(scene.objects)] += 1
        group_sizes.update(Counter((o.colour, o.shape) for o in scene.objects).values())
    vocabulary = [
        *W.SHAPES,
        *W.COLOURS,
        "small",
        "little",
        "large",
        "big",
        "left",
        "middle",
        "centre",
        "right",
    ]
    vocabulary += ["two", "three", "pair", "circles", "stars", "between", "objects", "single"]
    assert [w for w in vocabulary if words[w] == 0] == []
    assert set(counts) == {1, 2, 3}
    assert group_sizes[2] > 10 and group_sizes[3] > 3  # "two red circles" and "three ..." both occur
    assert "box" not in words  # shape words stay canonical


def test_describe_is_canonical():
    scene = W.Scene(
        (W.Obj("circle", "red", "large", "left"), W.Obj("star", "blue", "small", "middle", dx=0.01, dy=-0.1))
    )
    assert scene.describe() == "a large red circle on the left. a small blue star in the middle."
    assert scene.slots() == "left: a large red circle. middle: a small blue star. right: nothing."
    orders = {scene.slots(random.Random(k)) for k in range(20)}
    assert len(orders) == 6  # every order of the three named slots occurs, each slot intact
    slot = re.compile(r"\w+: [^.]*\.")
    assert all(sorted(slot.findall(o)) == sorted(slot.findall(scene.slots())) for o in orders)
    assert W.captions(scene, random.Random(0), 1) == [
        "a large red circle on the left and a small blue star in the middle"
    ]
    with pytest.raises(ValueError):
        W.Scene((W.Obj("circle", "red", "large", "right"), W.Obj("star", "blue", "small", "left")))
    with pytest.raises(ValueError):
        W.Obj("box", "red", "large", "left")


def test_parse_examples():
    assert W.parse_caption("two red circles") == [(2, None, "red", "circle")]
    assert W.parse_caption("a pair of big blue stars and a little white square") == [
        (2, "large", "blue", "star"),
        (1, "small", "white", "square"),
    ]
    assert W.parse_caption("three objects: a red circle, a blue star") == [
        (1, None, "red", "circle"),
        (1, None, "blue", "star"),
    ]
    # Model noise: unknown words are skipped, a dangling colour still counts as a mention.
    assert W.parse_caption("a red zorp circle and and the a green") == [
        (1, None, "red", "circle"),
        (1, None, "green", None),
    ]
    assert W.parse_caption("") == []


def test_every_generated_caption_parses_back_and_corruptions_fail_the_right_attribute():
    rng = random.Random(0)
    scenes = _scenes(2, 300) + _scenes(3, 100, compositional=True)
    for scene in scenes:
        for cap in W.captions(scene, rng):
            match = W.attribute_match(cap, scene)
            assert match == {"colour": True, "shape": True, "count": True, "all": True, "pairs": True}, cap
            colour = re.search(r"\b(" + "|".join(W.COLOURS) + r")\b", cap).group(1)
            other = next(c for c in W.COLOURS if c != colour)
            bad = W.attribute_match(re.sub(rf"\b{colour}\b", other, cap, count=1), scene)
            assert (bad["colour"], bad["shape"], bad["count"], bad["all"]) == (False, True, True, False), cap
            shape = re.search(r"\b(" + "|".join(W.SHAPES) + r")s?\b", cap).group(1)
            other = next(s for s in W.SHAPES if s != shape)
            bad = W.attribute_match(re.sub(rf"\b{shape}(s?)\b", rf"{other}\1", cap, count=1), scene)
            assert (bad["colour"], bad["shape"], bad["count"], bad["all"]) == (True, False, True, False), cap
            assert not W.attribute_match(cap + " and a white star", scene)["count"]
    assert W.attribute_match("", scenes[0]) == dict.fromkeys(
        ("colour", "shape", "count", "all", "pairs"), False
    )


# ---------------------------------------------------------------------------------------------
# Questions


def _answer(question, objs):
    """Recompute the answer from the objects alone, or None when the question is ambiguous."""
    at = {"on the left": "left", "in the middle": "middle", "on the right": "right"}

    def unique(found):
        return found[0] if len(found) == 1 else None

    number = ("zero", "one", "two", "three")
    patterns = [
        (
            r"what colour is the object (.+)\?",
            lambda p: unique([o.colour for o in objs if o.position == at[p]]),
        ),
        (r"what colour is the (\w+)\?", lambda s: unique([o.colour for o in objs if o.shape == s])),
        (
            r"what shape is the object (.+)\?",
            lambda p: unique([o.shape for o in objs if o.position == at[p]]),
        ),
        (r"what shape is the (\w+) object\?", lambda c: unique([o.shape for o in objs if o.colour == c])),
        (r"how many objects are there\?", lambda: number[len(objs)]),
        (r"how many (\w+) objects are there\?", lambda c: number[sum(o.colour == c for o in objs)]),
        (r"how many (\w+)s are there\?", lambda s: number[sum(o.shape == s for o in objs)]),
        (r"where is the (\w+) object\?", lambda c: unique([o.position for o in objs if o.colour == c])),
        (
            r"where is the (\w+) (\w+)\?",
            lambda c, s: unique([o.position for o in objs if (o.colour, o.shape) == (c, s)]),
        ),
        (r"where is the (\w+)\?", lambda s: unique([o.position for o in objs if o.shape == s])),
        (r"is there a (\w+) object\?", lambda c: "yes" if any(o.colour == c for o in objs) else "no"),
        (
            r"is there a (\w+) (\w+)\?",
            lambda c, s: "yes" if any((o.colour, o.shape) == (c, s) for o in objs) else "no",
        ),
        (r"is there a (\w+)\?", lambda s: "yes" if any(o.shape == s for o in objs) else "no"),
    ]
    for pattern, compute in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            return compute(*m.groups())
    raise AssertionError(f"question outside the grammar: {question!r}")


def test_answers_are_consistent_with_scenes():
    rng = random.Random(0)
    kinds, yes_no = Counter(), Counter()
    for scene in _scenes(4, 400) + _scenes(5, 100, compositional=True):
        qas = W.questions(scene, rng)
        assert len(qas) == 4 and len({q for q, _ in qas}) == 4
        for q, a in qas:
            assert _answer(q, scene.objects) == a, (q, a, scene)
            assert re.fullmatch(r"[a-z]+", a)
            kinds[q.split()[0] + " " + q.split()[1]] += 1
            if a in ("yes", "no"):
                yes_no[a] += 1
    assert set(kinds) == {"what colour", "what shape", "how many", "where is", "is there"}
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_lm_corpus_format():
    lines = W.lm_corpus(random.Random(0), 200)
    assert len(lines) == 200
    qa = [line for line in lines if " Question: " in line]
    assert 50 < len(qa) < 150
    for line in lines:
        assert re.fullmatch(
            r"(a (small|large) \w+ \w+ (on the left|in the middle|on the right)\. ?){1,3}",
            line.split(" caption: ")[0].split(" Question: ")[0] + " ",
        )
    assert all(re.fullmatch(r".+ Question: .+\? Short answer: [a-z]+", line) for line in qa)


# ---------------------------------------------------------------------------------------------
# Held-out combinations


def test_compositional_split():
    def held(scene):
        return any((o.colour, o.shape) in W.COMPOSITIONAL_HOLDOUT for o in scene.objects)

    assert not any(held(s) for s in _scenes(6, 2000))
    rng = random.Random(0)
    held_text = [f"{c} {s}" for c, s in W.COMPOSITIONAL_HOLDOUT]
    for scene in _scenes(8, 300):  # not even a negative question names a held-out pair outside "comp"
        text = " ".join(W.captions(scene, rng) + [q for q, _ in W.questions(scene, rng)])
        assert not any(h in text for h in held_text)
    assert all(held(s) for s in _scenes(7, 500, compositional=True))
    for colour, shape in W.COMPOSITIONAL_HOLDOUT:  # each word of a held-out pair is still seen in training
        assert any(o.colour == colour for s in _scenes(6, 200) for o in s.objects)
        assert any(o.shape == shape for s in _scenes(6, 200) for o in s.objects)


# ---------------------------------------------------------------------------------------------
# The written dataset, read back by evlgen's readers


def test_write_world_layout_readers_and_cache(tmp_path):
    out = tmp_path / "world"
    info = W.write_world(out, seed=1, sizes=SMALL, shards=True)
    assert not info["cached"] and info["counts"]["test"] == {"images": 4, "captions": 20, "questions": 16}
    meta = json.loads((out / "world.json").read_text())
    assert meta["seed"] == 1 and meta["sizes"] == SMALL and meta["format_version"] == W.FORMAT_VERSION
    assert sorted(map(tuple, meta["holdout"])) == sorted(W.COMPOSITIONAL_HOLDOUT)
    for split, n in SMALL.items():
        rows = [json.loads(line) for line in open(out / f"{split}.jsonl")]
        source = JsonlSource(out / f"{split}.jsonl")
        assert len(source) == n
        for i, row in enumerate(rows):
            rec = source.get(i)
            assert rec.key == f"{split}-{i:06d}" and list(rec.captions) == row["captions"]
            image = load_image(rec.image)
            assert image.size == (64, 64)
            scene = W.scene_from_dict(row["scene"])
            assert W.scene_to_dict(scene) == row["scene"]
            assert image.tobytes() == W.render(scene).tobytes()
            held = any((o.colour, o.shape) in W.COMPOSITIONAL_HOLDOUT for o in scene.objects)
            assert held == (split == "comp")
        vqa = JsonlSource(out / f"{split}_vqa.jsonl")
        assert len(vqa) == 4 * n
        for i in range(len(vqa)):
            rec, row = vqa.get(i), json.loads(open(out / f"{split}_vqa.jsonl").readlines()[i])
            assert rec.question and len(rec.answers) == 1 and rec.image.endswith(row["image"])
            assert _answer(rec.question, W.scene_from_dict(row["scene"]).objects) == rec.answers[0]
    shard = WebDatasetSource(out / "shards")
    records = [r for s in shard.shards for r in shard.iter_shard(s)]
    train = [json.loads(line) for line in open(out / "train.jsonl")]
    assert [list(r.captions) for r in records] == [row["captions"] for row in train]  # each caption once

    stamp = (out / "train.jsonl").stat().st_mtime_ns
    again = W.write_world(out, seed=1, sizes=SMALL, shards=True)
    assert again["cached"] and again["counts"] == info["counts"]
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    changed = W.write_world(out, seed=1, sizes={**SMALL, "test": 2}, shards=True)
    assert not changed["cached"] and len(JsonlSource(out / "test.jsonl")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folders left behind

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        W.write_world(tmp_path / "mine", sizes=SMALL)
    with pytest.raises(ValueError):
        W.write_world(tmp_path / "x", sizes={"training": 3})


# ---------------------------------------------------------------------------------------------
# Videos


def _centroid_x(frame, colour, band):
    """Mean x of the pixels close to ``colour`` in the object's band, or None when none are."""
    rows = np.asarray(frame, dtype=np.float64)[band * 32 : band * 32 + 32]
    near = np.abs(rows - np.array(W.RGB[colour])).sum(axis=-1) < 90
    return float(np.nonzero(near)[1].mean()) if near.any() else None


def test_clip_captions_follow_frame_order():
    rng = random.Random(0)
    seen = Counter()
    for _ in range(60):
        clip = V.sample_clip(rng)
        frames = V.render_clip(clip)
        caps = V.clip_captions(clip, rng)
        assert len(frames) == clip.frames and len(set(caps)) == 5
        assert " moves " not in caps[1] and " appears" not in caps[1]  # an order-free caption
        back = V.clip_captions(clip.reversed(), rng)[0]
        for tr in clip.tracks:
            xs = [_centroid_x(f, tr.colour, tr.band) for f in frames]
            seen[tr.motion] += 1
            name = f"{tr.colour} {tr.shape}"
            if tr.motion in ("rightward", "leftward"):
                steps = np.diff(xs)
                assert (steps > 0).all() if tr.motion == "rightward" else (steps < 0).all()
                direction = "from left to right" if tr.motion == "rightward" else "from right to left"
                assert f"{name} moves {direction}" in caps[0].replace("large ", "").replace("small ", "")
                flipped = "from right to left" if tr.motion == "rightward" else "from left to right"
                assert f"{name} moves {flipped}" in back.replace("large ", "").replace("small ", "")
            elif tr.motion in ("appear", "disappear"):
                present = [x is not None for x in xs]
                assert present == [tr.visible(t) for t in range(clip.frames)]
                assert present[-1] == (tr.motion == "appear") and present[0] == (tr.motion == "disappear")
                word = "appears" if tr.motion == "appear" else "disappears"
                assert word in caps[0] and ("disappears" if word == "appears" else "appears") in back
            else:
                assert len({round(x, 3) for x in xs}) == 1
    assert set(seen) == set(V.MOTIONS)
    clip = V.sample_clip(random.Random(3))
    assert V.clip_from_dict(json.loads(json.dumps(V.clip_to_dict(clip)))) == clip
    assert clip.reversed().reversed() == clip


def test_videos_written_and_readable(tmp_path):
    pytest.importorskip("av")
    from evlgen.data.video import load_video_frames

    W.write_world(tmp_path / "w", seed=0, sizes={"train": 2, "val": 1, "test": 1, "comp": 1}, videos=4)
    rows = [json.loads(line) for line in open(tmp_path / "w" / "train_video.jsonl")]
    assert len(rows) == 4 and (tmp_path / "w" / "test_video.jsonl").exists()
    source = JsonlSource(tmp_path / "w" / "train_video.jsonl")
    for i, row in enumerate(rows):
        rec = source.get(i)
        assert rec.video and list(rec.captions) == row["captions"]
        frames = load_video_frames(rec.video, 8, train=False, generator=None, max_pixels=1 << 20)
        clip = V.clip_from_dict(row["clip"])
        for decoded, drawn in zip(frames, V.render_clip(clip), strict=True):
            assert decoded.size == (64, 64)
            assert np.abs(np.asarray(decoded, float) - np.asarray(drawn, float)).mean() < 6
    V.write_videos(tmp_path / "again", "train", 4, 0)
    assert (tmp_path / "again" / "train_video.jsonl").read_bytes() == (
        tmp_path / "w" / "train_video.jsonl"
    ).read_bytes()
    for i in range(4):
        name = f"videos/train/{i:06d}.mp4"
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "w" / name).read_bytes()
