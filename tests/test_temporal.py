"""Video modules (model/temporal.py) on tiny random models: the init equality with the frame-averaged
image model for every tower family, what trains, frame-order (in)variance by brute force, and the
frame-concatenation layout."""

import pytest
import torch

from evlgen.config import ConfigError, DatasetConfig, load_config
from evlgen.data.features import cache_features
from evlgen.model.build import build_vlm, from_pretrained, init_from_pretrained, plan
from evlgen.model.merge import token_schedule
from evlgen.model.temporal import FrameTokens, TemporalAttention, concat_merge_schedule
from evlgen.model.vision import FAMILIES
from evlgen.smoke import fit

T = 4
SMALL = ["video.temporal_dim=8", "video.temporal_heads=2", f"data.frames={T}"]
# tiny: 17 tokens per frame, 2 connector layers. Concatenated: 68 tokens, 4 CLS protected.
CONCAT = ["video.frames_to_connector=concat", "video.r=[30, 10]"]
VARIANTS = {
    "paper": ["video.temporal=paper"],
    "time-embed": ["video.temporal=time-embed"],
    "concat": CONCAT,
    "time-embed+concat": ["video.temporal=time-embed", *CONCAT],
}


def tiny_vlm(*overrides: str, family: str = "clip"):
    torch.manual_seed(0)
    return build_vlm(load_config("tiny", [*SMALL, f"vision.family={family}", *overrides]), log_table=False)


def clip_pixels(b: int = 3, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [B, T, C, H, W]


def batch(b: int = 3):
    return (
        clip_pixels(b),
        [""] * b,
        ["a red circle moves to the left", "two stars appear", "a blue square"][:b],
    )


def hf_frame_mean(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """Independent reference: transformers' own vision model on each frame, hidden state of the tower's
    last run block, averaged over frames."""
    model = vlm.vision.model
    frames = pixels.flatten(0, 1)  # [B*T, C, H, W]
    with torch.no_grad():
        hidden = model(pixel_values=frames, output_hidden_states=True).hidden_states[vlm.vision.layer]
    return hidden.unflatten(0, pixels.shape[:2]).mean(dim=1)  # [B, N, D]


def randomise_gates(vlm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vlm.vision.block_adapters:
            m.gate.fill_(float(torch.rand((), generator=g)) + 0.5)


# ---------------------------------------------------------------- init equality


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temporal", ["paper", "time-embed"])
def test_video_model_at_init_equals_the_image_model_averaged_over_frames(family, temporal):
    vlm = tiny_vlm(f"video.temporal={temporal}", family=family)
    assert len(vlm.vision.block_adapters) == vlm.vision.num_blocks
    pixels = clip_pixels()
    with torch.no_grad():
        feats = vlm.tower_features(pixels)  # [B, N, D]
        torch.testing.assert_close(feats, hf_frame_mean(vlm, pixels), rtol=1e-5, atol=1e-5)
        # The whole prefix equals the image path on the frame mean.
        prefix, _ = vlm.encode(pixels)
        expected, _ = vlm.encode(None, features=hf_frame_mean(vlm, pixels))
    torch.testing.assert_close(prefix, expected, rtol=1e-5, atol=1e-5)
    # Not vacuous: a gate away from 0 changes the features.
    randomise_gates(vlm)
    with torch.no_grad():
        assert (vlm.tower_features(pixels) - feats).abs().max() > 1e-3


def test_temporal_attention_against_a_loop_over_positions():
    torch.manual_seed(0)
    m = TemporalAttention(width=12, dim=8, heads=2, frames=5)
    with torch.no_grad():
        m.gate.fill_(0.7)
    x = torch.randn(2, 3, 4, 12)  # [B, T, N, D]
    out = m(x)
    ref = torch.empty_like(x)
    for b in range(2):
        for n in range(4):
            frames = x[b, :, n]  # [T, D]
            h = frames + m.time[:3]
            q, k = m.query(h), m.key(h)  # [T, 8]
            for head in range(2):
                qh, kh = q[:, head * 4 : (head + 1) * 4], k[:, head * 4 : (head + 1) * 4]
                attn = torch.softmax(qh @ kh.T / 2.0, dim=-1)  # [T, T], sqrt(4) = 2
                ref[b, :, n, head * 6 : (head + 1) * 6] = frames[:, head * 6 : (head + 1) * 6] + 0.7 * (
                    attn @ frames[:, head * 6 : (head + 1) * 6]
                )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="time embedding knows 5"):
        m(torch.randn(1, 6, 4, 12))
    with pytest.raises(ValueError, match="divisible"):
        TemporalAttention(width=10, dim=8, heads=4)


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("variant", ["paper", "time-embed+concat"])
def test_only_temporal_modules_ln_vision_projections_and_connector_train(variant):
    vlm = tiny_vlm(*VARIANTS[variant])
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    expected_roots = {"ln_vision", "vl_proj", "connector", "llm_proj"}
    if "concat" in variant:
        expected_roots.add("frame_tokens")
    for name in trainable:
        assert name.split(".")[0] in expected_roots or name.startswith("vision.block_adapters."), name
    assert any(n.startswith("vision.block_adapters.") and n.endswith("gate") for n in trainable)
    assert {n.split(".")[0] for n in trainable} == expected_roots | {"vision"}
    assert not any(
        p.requires_grad for n, p in vlm.named_parameters() if n.startswith(("vision.model.", "llm."))
    )
    assert set(vlm.trainable_state_dict()) == trainable  # checkpoints hold exactly these

    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if k.startswith(("vision.model.", "llm."))}
    before = {k: v.clone() for k, v in vlm.trainable_state_dict().items()}
    fit(vlm, *batch(), steps=3, lr=1e-2)
    for k, v in vlm.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen tensor {k} changed"
    after = vlm.trainable_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(m.gate.item() != 0 for m in vlm.vision.block_adapters)
    assert any(k.startswith("vision.block_adapters.") and k.endswith("query.weight") for k in changed)
    assert vlm.vision.model.training is False and vlm.llm.training is False


def test_modes_follow_train_and_eval():
    vlm = tiny_vlm("video.temporal=paper")
    vlm.train()
    assert vlm.vision.block_adapters.training and not vlm.vision.model.training
    vlm.eval()
    assert not vlm.vision.block_adapters.training


# ---------------------------------------------------------------- frame order


@pytest.mark.parametrize("variant", ["none", "paper", "time-embed", "concat", "time-embed+concat"])
def test_frame_order_blindness_by_brute_force(variant):
    vlm = tiny_vlm(*VARIANTS.get(variant, []))
    if vlm.vision.block_adapters is not None:
        randomise_gates(vlm)
    pixels = clip_pixels(b=2)
    with torch.no_grad():
        base, _ = vlm.encode(pixels)
        gaps = []
        for perm in ([3, 2, 1, 0], [1, 0, 2, 3], [2, 3, 0, 1]):
            gaps.append((vlm.encode(pixels[:, perm])[0] - base).abs().max().item())
    if variant in ("none", "paper"):
        assert max(gaps) < 1e-4, gaps  # the paper's module cannot tell a clip from its reverse
    else:
        assert min(gaps) > 1e-3, gaps


# ---------------------------------------------------------------- concatenated frames


def test_frame_tokens_layout_positions_and_time_embedding():
    ft = FrameTokens(hidden=2, frames=3, protected=1)
    with torch.no_grad():
        ft.time.copy_(torch.tensor([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]]))
    # token value = 10 * frame + index within the frame
    x = torch.tensor([[[[10.0 * t + i, 0.0] for i in range(4)] for t in range(3)]])  # [1, T=3, N=4, 2]
    tokens, positions = ft(x)
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert tokens[0, :, 0].tolist() == [110.0 * t + i for t, i in order]
    assert positions.tolist() == [i for _, i in order]
    with pytest.raises(ValueError, match="built for 3 frames"):
        ft(x[:, :2])


def test_concat_plan_and_images_as_still_clips():
    cfg = load_config("tiny", [*SMALL, *CONCAT])
    p = plan(cfg)
    assert p.protected == T and p.token_schedule == [68, 38, 28]
    vlm = tiny_vlm(*CONCAT)
    assert vlm.connector.protected == T
    image = clip_pixels(t=1)
    with torch.no_grad():
        torch.testing.assert_close(vlm.encode(image)[0], vlm.encode(image.expand(-1, T, -1, -1, -1))[0])
    with pytest.raises(ValueError, match="exactly 4 frames"):
        vlm.encode(clip_pixels(t=2))
    with pytest.raises(ConfigError, match="frames_to_connector=concat"):
        plan(load_config("tiny", [*SMALL, "video.r=3"]))


def test_concat_default_schedule_is_geometric_and_feasible():
    rs = concat_merge_schedule(4 * 257, 12, 29 + 3, protected=4)
    counts = token_schedule(4 * 257, rs, protected=4)  # raises if any layer merges too much
    assert counts[-1] == 32 and sorted(rs, reverse=True) == rs
    ratios = [b / a for a, b in zip(counts, counts[1:], strict=False)]
    assert max(ratios) - min(ratios) < 0.02
    p = plan(load_config("paper-opt2.7b", ["video.frames_to_connector=concat"]))
    assert p.token_schedule[0] == 1028 and p.token_schedule[-1] == 32 and p.protected == 4
    with pytest.raises(ValueError, match="cannot merge"):
        concat_merge_schedule(68, 2, 12, protected=4)


# ---------------------------------------------------------------- persistence, init, cache


def test_save_load_round_trip_keeps_the_temporal_modules(tmp_path):
    vlm = tiny_vlm("video.temporal=time-embed", *CONCAT)
    fit(vlm, *batch(), steps=2, lr=1e-2)
    pixels = clip_pixels()
    with torch.no_grad():
        before = vlm.encode(pixels)[0]
    vlm.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.encode(pixels)[0], before)


def test_init_from_an_image_checkpoint(tmp_path):
    image = tiny_vlm()
    fit(image, *batch(), steps=2, lr=1e-2)
    image.save_pretrained(tmp_path / "image")
    video = tiny_vlm("video.temporal=paper")
    fresh = init_from_pretrained(video, tmp_path / "image")
    assert fresh and all(k.startswith("vision.block_adapters.") for k in fresh)
    pixels = clip_pixels()
    with torch.no_grad():  # gate 0: the fine-tuning starts exactly at the image model on the frame mean
        torch.testing.assert_close(video.encode(pixels)[0], image.encode(pixels)[0], rtol=1e-5, atol=1e-5)
    other = tiny_vlm("connector.arch.intermediate_size=48")
    with pytest.raises(KeyError, match="shape mismatches"):
        init_from_pretrained(other, tmp_path / "image")


@pytest.mark.parametrize("override", ["video.temporal=paper", "video.frames_to_connector=concat"])
def test_feature_cache_refuses_trainable_or_per_frame_tower_output(tmp_path, override):
    cfg = load_config("tiny", [*SMALL, override])
    with pytest.raises(ConfigError, match="cannot be cached|stores their mean"):
        cache_features(cfg, DatasetConfig(path=str(tmp_path / "none.jsonl")), tmp_path / "out")


def test_video_config_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown config key 'video.temporl'"):
        load_config("tiny", ["video.temporl=paper"])
    with pytest.raises(ConfigError, match="video.temporal' must be one of"):
        load_config("tiny", ["video.temporal=yes"])
    with pytest.raises(ConfigError, match="must divide the tower width"):
        plan(load_config("tiny", ["video.temporal=paper", "video.temporal_heads=3", "video.temporal_dim=9"]))


def test_video_presets():
    cfg = load_config("paper-video-opt2.7b")
    v, t = cfg.video, cfg.train
    assert (v.temporal, v.temporal_dim, v.temporal_heads, v.frames_to_connector) == ("paper", 256, 8, "mean")
    assert (cfg.data.frames, t.lr, t.min_lr, t.warmup_steps, t.batch_size) == (4, 1e-5, 1e-6, 1000, 4)
    assert cfg.data.train[0].format == "msrvtt" and t.init_from is not None
    assert cfg.vision == load_config("paper-opt2.7b").vision  # the image model's tower, unchanged
    # The demo's variants all plan (concat: 4 x 65 tokens down to 25 + 3 CLS in 4 layers).
    for overrides in ([], ["video.temporal=time-embed"], ["video.frames_to_connector=concat"]):
        p = plan(load_config("demo-video", overrides))
        assert p.token_schedule[-1] == (28 if overrides and "concat" in overrides[0] else 25)
