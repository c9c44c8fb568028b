"""Tests for evlgen.model.vision on tiny random towers; checkpoints are saved to tmp dirs (no network)."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
)

from evlgen.model import vision
from evlgen.model.vision import FAMILIES, VisionTower, load_vision_model, random_vision_model

IMAGE = 32
PATCH = 8
PATCHES = (IMAGE // PATCH) ** 2
BLOCKS = 3
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=BLOCKS,
    num_attention_heads=2,
    image_size=IMAGE,
    patch_size=PATCH,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return random_vision_model(family, VISION)


def pixels(b: int = 2, t: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def tiny_composite(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "clip":
        return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    if family == "siglip":
        return SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    opt = dict(
        model_type="opt",
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=99,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    qformer = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        vocab_size=99,
    )
    config = Blip2Config(
        vision_config=dict(VISION, initializer_range=0.02),
        qformer_config=qformer,
        text_config=opt,
        num_query_tokens=4,
    )
    return Blip2ForConditionalGeneration(config)


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """One saved composite checkpoint per family, shared by the loading tests."""
    out = {}
    for family in FAMILIES:
        model = tiny_composite(family).eval()
        path = tmp_path_factory.mktemp(f"{family}_composite")
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


def rewrite_tensors(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint to `dst` with its tensors passed through `edit(dict) -> dict`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(
        edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"}
    )
    return dst


# ---------------------------------------------------------------- forward equals HF's own hidden states


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-1, -2, 1, 0, BLOCKS])
def test_output_equals_hf_hidden_states(family: str, layer: int) -> None:
    model = tiny(family)
    tower = VisionTower(model, family, layer=layer)
    x = pixels(b=2)
    with torch.no_grad():
        ref = model(x[:, 0], output_hidden_states=True).hidden_states[layer]
    out = tower(x)
    assert out.shape == (2, 1, tower.num_tokens, 32)
    torch.testing.assert_close(out[:, 0], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["siglip", "blip2"])
def test_post_layernorm_is_not_applied(family: str) -> None:
    # For these two HF's last_hidden_state is post_layernorm(last block); EVLGen wants the raw block.
    model = tiny(family)
    x = pixels()
    with torch.no_grad():
        normed = model(x[:, 0]).last_hidden_state
    out = VisionTower(model, family)(x)[:, 0]
    torch.testing.assert_close(model.post_layernorm(out), normed, rtol=0, atol=1e-5)
    assert not torch.allclose(out, normed, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_are_encoded_independently(family: str) -> None:
    tower = VisionTower(tiny(family), family, layer=-2)
    x = pixels(b=2, t=3)
    out = tower(x)
    assert out.shape == (2, 3, tower.num_tokens, 32)
    per_frame = torch.stack([tower(x[:, i : i + 1])[:, 0] for i in range(3)], dim=1)
    torch.testing.assert_close(out, per_frame, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "tokens", "protected"),
    [("clip", PATCHES + 1, 1), ("siglip", PATCHES, 0), ("blip2", PATCHES + 1, 1)],
)
def test_token_counts(family: str, tokens: int, protected: int) -> None:
    tower = VisionTower(tiny(family), family)
    assert (tower.num_tokens, tower.num_protected) == (tokens, protected)
    assert (tower.hidden_size, tower.image_size, tower.family) == (32, IMAGE, family)
    assert tower(pixels()).shape[2] == tokens


def test_pixels_are_cast_to_the_tower_dtype() -> None:
    tower = VisionTower(tiny("clip").to(torch.bfloat16), "clip")
    out = tower(pixels())
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------- freezing, grad tracking, train mode


@pytest.mark.parametrize("family", FAMILIES)
def test_no_graph_when_nothing_is_trainable(family: str) -> None:
    tower = VisionTower(tiny(family), family)
    assert not any(p.requires_grad for p in tower.parameters())
    x = pixels().requires_grad_()
    assert not tower(x).requires_grad


class ScaleFrames(nn.Module):
    """A trainable stand-in for a temporal adapter; records the shape it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))
        self.drop = nn.Dropout(0.5)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(h.shape))
        return h + self.alpha * h.mean(dim=1, keepdim=True)


def test_block_adapters_run_between_attention_and_mlp_and_get_gradients() -> None:
    model = tiny("clip")
    tower = VisionTower(model, "clip", layer=-2)
    x = pixels(b=2, t=3)
    with torch.no_grad():
        plain = tower(x)
    adapters = [ScaleFrames() for _ in range(tower.num_blocks)]
    tower.set_block_adapters(adapters)
    out = tower(x)
    assert [a.seen for a in adapters] == [[(2, 3, PATCHES + 1, 32)]] * (BLOCKS - 1)
    # alpha = 0: the video tower equals the image tower on each frame.
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert out.requires_grad
    out.square().mean().backward()
    assert all(a.alpha.grad is not None and a.alpha.grad != 0 for a in adapters)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="expected 2 block adapters"):
        tower.set_block_adapters([ScaleFrames()])


def test_hf_model_stays_in_eval_mode() -> None:
    tower = VisionTower(tiny("blip2"), "blip2")
    tower.set_block_adapters([ScaleFrames() for _ in range(BLOCKS)])
    tower.train()
    assert tower.training and tower.block_adapters.training
    assert all(a.drop.training for a in tower.block_adapters)
    assert not any(m.training for m in tower.model.modules())
    tower.eval()
    assert not any(m.training for m in tower.modules())


# ---------------------------------------------------------------- validation


def test_rejects_bad_arguments() -> None:
    model = tiny("clip")
    with pytest.raises(ValueError, match="unknown vision tower family"):
        VisionTower(model, "eva")
    with pytest.raises(ValueError, match="expects a SiglipVisionModel"):
        VisionTower(model, "siglip")
    for layer in (BLOCKS + 1, -(BLOCKS + 2), True, 1.0):
        with pytest.raises(ValueError, match="layer must be an int"):
            VisionTower(model, "clip", layer=layer)
    tower = VisionTower(model, "clip", layer=-(BLOCKS + 1))
    assert tower.num_blocks == 0
    with pytest.raises(ValueError, match=r"\[B, T, 3, 32, 32\]"):
        tower(torch.zeros(2, 3, IMAGE, IMAGE))
    with pytest.raises(ValueError, match=r"\[B, T, 3, 32, 32\]"):
        tower(torch.zeros(2, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown vision tower family"):
        random_vision_model("vit", VISION)


# ---------------------------------------------------------------- loading


def assert_same_weights(loaded: nn.Module, reference: nn.Module) -> None:
    got, ref = loaded.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_composite_checkpoint(family: str, composites: dict) -> None:
    composite, path = composites[family]
    loaded = load_vision_model(family, str(path))
    assert isinstance(loaded, type(composite.vision_model)) and not loaded.training
    assert_same_weights(loaded, composite.vision_model)
    x = pixels()
    torch.testing.assert_close(
        VisionTower(loaded, family)(x), VisionTower(composite.vision_model, family)(x), rtol=0, atol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_load_vision_only_checkpoint(family: str, tmp_path: Path) -> None:
    model = tiny(family, seed=3)
    model.save_pretrained(tmp_path)
    assert_same_weights(load_vision_model(family, str(tmp_path)), model)


def test_load_casts_to_dtype(composites: dict) -> None:
    for family in ("clip", "blip2"):
        loaded = load_vision_model(family, str(composites[family][1]), dtype=torch.bfloat16)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_missing_vision_tensor_raises(family: str, composites: dict, tmp_path: Path) -> None:
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    bad = rewrite_tensors(
        composites[family][1], tmp_path / "bad", lambda sd: {k: v for k, v in sd.items() if k != key}
    )
    with pytest.raises(RuntimeError, match=r"missing: \['encoder\.layers\.1\.mlp\.fc1\.weight'\]"):
        load_vision_model(family, str(bad))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_wrong_shape_raises(family: str, composites: dict, tmp_path: Path) -> None:
    key = "vision_model.encoder.layers.0.mlp.fc2.bias"
    bad = rewrite_tensors(composites[family][1], tmp_path / "bad", lambda sd: {**sd, key: torch.zeros(5)})
    with pytest.raises(
        RuntimeError, match=r"wrong shape: \['encoder\.layers\.0\.mlp\.fc2\.bias \(checkpoint \[5\]"
    ):
        load_vision_model(family, str(bad))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_unexpected_vision_tensor_raises(family: str, composites: dict, tmp_path: Path) -> None:
    # A checkpoint with more blocks than its config says: the extra block must not be silently dropped.
    extra = "vision_model.encoder.layers.3.mlp.fc1.bias"
    bad = rewrite_tensors(composites[family][1], tmp_path / "bad", lambda sd: {**sd, extra: torch.zeros(64)})
    with pytest.raises(RuntimeError, match=r"unexpected: \[.*encoder\.layers\.3\.mlp\.fc1\.bias"):
        load_vision_model(family, str(bad))


def test_load_sharded_blip2_reads_only_vision_shards(tmp_path: Path) -> None:
    composite = tiny_composite("blip2").eval()
    composite.save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {s for k, s in weight_map.items() if k.startswith("vision_model.")}
    other_shards = set(weight_map.values()) - vision_shards
    assert other_shards, "the test needs shards without vision tensors"
    # Deleting the language-model shards proves the loader never opens them.
    for shard in other_shards:
        (tmp_path / shard).unlink()
    assert_same_weights(load_vision_model("blip2", str(tmp_path)), composite.vision_model)


def test_hub_download_fetches_only_vision_shards_at_revision(tmp_path: Path, monkeypatch) -> None:
    # No network here: a fake hf_hub_download serves a saved sharded checkpoint as if it were a hub repo.
    composite = tiny_composite("blip2").eval()
    composite.save_pretrained(tmp_path, max_shard_size="20KB")
    requested = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None) -> str:
        requested.append((repo_id, filename, revision))
        if not (tmp_path / filename).is_file():
            raise LocalEntryNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(vision, "hf_hub_download", fake_download)
    state = vision._read_prefixed_tensors("org/blip2", "abc123", "vision_model.")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {s for k, s in weight_map.items() if k.startswith("vision_model.")}
    assert {r[0] for r in requested} == {"org/blip2"} and {r[2] for r in requested} == {"abc123"}
    assert sorted(r[1] for r in requested) == sorted(["model.safetensors.index.json", *vision_shards])
    assert len(vision_shards) < len(set(weight_map.values()))
    ref = composite.vision_model.state_dict()
    assert sorted(state) == sorted(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_load_rejects_wrong_family_and_pickle_only(composites: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds a CLIPConfig"):
        load_vision_model("siglip", str(composites["clip"][1]))
    (tmp_path / "config.json").write_text((composites["blip2"][1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_vision_model("blip2", str(tmp_path))


def test_saved_checkpoint_is_really_composite(composites: dict) -> None:
    # Guards the loading tests: the blip2 checkpoint must hold the OPT weights next to the vision ones.
    with safe_open(composites["blip2"][1] / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("language_model.") for k in keys)
    assert any(k.startswith("vision_model.") for k in keys)
