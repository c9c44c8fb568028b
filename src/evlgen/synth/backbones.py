"""Tiny "pretrained" backbones for the synthetic world, trained by evlgen itself and then frozen.

The real setting has a vision tower pretrained on image-text pairs and an LLM pretrained on text; the
demo mirrors it at toy scale, from scratch, on a CPU:

* vision: a CLIP-layout ViT trained contrastively against captions of freshly rendered scenes, with
  a dense auxiliary head that names the shape, colour and size under each patch;
* LLM: an OPT-layout causal LM with its own byte-level BPE tokenizer, trained on text in which a
  scene described in words comes first and a caption or a question and its answer follow. A small LM
  pretrained on unconditional captions learns to ignore its context, and a frozen LM that ignores
  its context cannot be steered by a visual prefix (DESIGN.md, section 4); this one must read it.

The LM's text layout matches what EVLGen feeds it later: ``</s> description </s> caption: ... </s>``
(the description in per-column slots: ``left: a large red circle. middle: nothing. right: ...``)
against ``[visual prefix] </s> caption: ... </s>``, so the connector learns to stand in for the words.

Both are saved in transformers format and loaded by `build_vlm` like any checkpoint. They are cached
under the evlgen cache folder by a digest of their recipe, written atomically, and rebuilt
deterministically when missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from evlgen.config import CLIP_MEAN, CLIP_STD, ConfigError
from evlgen.data.sources import default_cache_dir
from evlgen.data.transforms import to_tensor
from evlgen.fsutil import exclusive_lock, fsync_tree
from evlgen.model.tokenizer import train_bpe_tokenizer
from evlgen.synth import world

log = logging.getLogger(__name__)

VERSION = 3
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the backbones' weights (its digest names the cache folder)."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    clip_steps: int = 500
    clip_batch: int = 96
    clip_lr: float = 5e-3
    text_lr: float = 1e-3
    aux_weight: float = 3.0
    vocab_size: int = 400
    lm_hidden: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    lm_steps: int = 700
    lm_batch: int = 64
    lm_lr: float = 3e-3
    corpus_scenes: int = 6000
    # Video variant (the synthetic-video benchmark): this many clips' descriptions and event captions
    # join the LM corpus, so the LM knows what "moves from left to right" or "appears" means. 0 = the
    # image demo's backbones; left out of the digest then, so their cache key is unchanged.
    video_clips: int = 0
    # List the LM context's three column slots in a random order per example, so that the LM must look a
    # slot up by its name instead of copying by position (see `lm_corpus`; an experiment, off in the demo).
    shuffle_slots: bool = False
    # Width of the LM's feed-forward layers; 0 = 4 x lm_hidden.
    lm_ffn: int = 0

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields added after a cache existed leave the digest at their old behaviour, so those caches
        # keep their key (the video benchmark's backbones predate `shuffle_slots`).
        for name, old in _DIGEST_LEGACY.items():
            if fields[name] == old:
                fields.pop(name)
        blob = json.dumps({"version": VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def vision_arch(self) -> dict[str, Any]:
        """The `vision.arch` a preset must state for this tower."""
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.vision_hidden,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "intermediate_size": 4 * self.vision_hidden,
        }

    def lm_arch(self, vocab_size: int) -> dict[str, Any]:
        """The `llm.arch` of the LM (OPT layout, ids as evlgen's tokenizers: pad 0, BOS = EOS 1)."""
        return {
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": self.lm_hidden,
            "num_hidden_layers": self.lm_layers,
            "num_attention_heads": self.lm_heads,
            "ffn_dim": self.lm_ffn or 4 * self.lm_hidden,
            "max_position_embeddings": 256,
            "word_embed_proj_dim": self.lm_hidden,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        }


_DIGEST_LEGACY = {"video_clips": 0, "shuffle_slots": False, "lm_ffn": 0}


def recipe_with(recipe: Recipe, changes: Sequence[str]) -> Recipe:
    """`recipe` with ``field=value`` changes (``lm_hidden=256``), each value parsed as its field's type."""
    updates: dict[str, Any] = {}
    for item in changes:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not hasattr(recipe, name):
            fields = sorted(f.name for f in dataclasses.fields(Recipe))
            raise ConfigError(
                f"backbones recipe change {item!r}: expected FIELD=VALUE with FIELD one of {fields}"
            )
        kind = type(getattr(recipe, name))
        try:
            if kind is bool:
                if raw.strip().lower() not in ("true", "false"):
                    raise ValueError(raw)
                updates[name] = raw.strip().lower() == "true"
            else:
                updates[name] = kind(raw)
        except ValueError:
            raise ConfigError(f"backbones recipe {name}: {raw!r} is not a valid {kind.__name__}") from None
    return dataclasses.replace(recipe, **updates)


def backbones_dir(recipe: Recipe, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "synth-backbones" / f"v{VERSION}-{recipe.digest()}"


def ensure_backbones(
    recipe: Recipe = Recipe(), cache_dir: str | Path | None = None, progress: Progress | None = None
) -> Path:
    """The folder holding `vision/` and `llm/`, training them first when they are not cached."""
    out = backbones_dir(recipe, cache_dir)
    if (out / "recipe.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time per recipe: a second process waits here, then finds the first one's result.
    with exclusive_lock(out.parent / f".{out.name}.lock"):
        if (out / "recipe.json").is_file():
            return out
        _build_backbones(recipe, out, progress)
    return out


def _build_backbones(recipe: Recipe, out: Path, progress: Progress | None) -> None:
    # One process, one part after the other, on every core: the LM and the tower built side by side in
    # two single-threaded processes took 2.3-3x longer per step each on a 2-vCPU machine, no faster.
    t0 = time.perf_counter()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    corpus = lm_corpus(recipe, rng)
    tokenizer = train_bpe_tokenizer((a + " " + b for a, b in corpus), recipe.vocab_size)
    lm, lm_loss = train_lm(recipe, tokenizer, corpus, progress)
    lm.save_pretrained(tmp / "llm")
    tokenizer.save_pretrained(tmp / "llm")
    vision, clip_loss = train_vision(recipe, tokenizer, random.Random(recipe.seed + 1), progress)
    vision.save_pretrained(tmp / "vision")
    info = {
        "version": VERSION,
        "recipe": dataclasses.asdict(recipe),
        "lm_final_loss": lm_loss,
        "clip_final_loss": clip_loss,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "recipe.json").write_text(json.dumps(info, indent=2))
    fsync_tree(tmp)
    if out.exists():  # a half-renamed leftover of a crashed build holds no recipe.json; replace it
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("synthetic-world backbones ready in %s (%.0f s)", out, info["seconds"])


# -------------------------------------------------------------------------------------------------
# LM


def lm_corpus(recipe: Recipe, rng: random.Random) -> list[tuple[str, str]]:
    """(scene description, continuation) pairs: 'caption: ...' and 'Question: ... Short answer: ...'."""
    pairs = []
    for _ in range(recipe.corpus_scenes):
        scene = world.sample_scene(rng)
        # The context names all three columns, empty ones included: a layout the spatial visual
        # prefix imitates more easily than free-running sentences (EVLGen test attribute accuracy 0.70
        # vs 0.61 with `describe()`, same steps). In the fixed order the LM copies slots into the
        # caption by position; shuffled, it must find each slot by name, as it must in a visual prefix
        # (docs/benchmarks.md: better binding when the LM learns it, but it needs ~3x the LM steps and
        # did not learn it reliably).
        order = rng if recipe.shuffle_slots else None  # a fresh order for every pair
        for cap in world.captions(scene, rng, 2):
            pairs.append((scene.slots(order), f"caption: {cap}"))
        for q, a in world.questions(scene, rng, 2):
            pairs.append((scene.slots(order), f"Question: {q} Short answer: {a}"))
    if recipe.video_clips:
        from evlgen.synth import video

        # A separate stream: the image part of the corpus stays exactly the image demo's.
        clip_rng = random.Random(f"{recipe.seed}-lm-clips")
        for _ in range(recipe.video_clips):
            clip = video.sample_clip(clip_rng)
            desc = video.clip_slots(clip)
            for cap in video.clip_captions(clip, clip_rng, 3, listing=False):
                pairs.append((desc, f"caption: {cap}"))
    rng.shuffle(pairs)
    return pairs


def _lm_ids(tokenizer: Any, desc: str, text: str) -> tuple[list[int], int]:
    """Token ids and the length of the context: ``</s> description </s>``, then ``text </s>``.

    The description stands where EVLGen puts its visual prefix, before the BOS-led prompt. The leading
    BOS gives attention a fixed place to rest that is not the first object's words (without it the
    LM often copied the second object into the first one's place: attribute accuracy of its captions
    from true descriptions 0.895 vs 0.955); in EVLGen the first visual token takes that place.
    """
    eos = tokenizer.eos_token_id
    context = [eos] + tokenizer(desc, add_special_tokens=False)["input_ids"] + [eos]
    return context + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], len(context)


def train_lm(
    recipe: Recipe, tokenizer: Any, corpus: list[tuple[str, str]], progress: Progress | None = None
) -> tuple[Any, float]:
    from transformers import AutoConfig, AutoModelForCausalLM

    # No dropout: the corpus is far larger than this LM can memorise, and dropout's masks cost a
    # fifth of its CPU step time.
    arch = {**recipe.lm_arch(len(tokenizer)), "dropout": 0.0, "attention_dropout": 0.0}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    seqs = [_lm_ids(tokenizer, d, t) for d, t in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lm_lr, weight_decay=0.01)
    model.train()
    loss_value = math.nan
    batches = _length_bucketed(
        [len(ids) for ids, _ in seqs], recipe.lm_batch, torch.Generator().manual_seed(recipe.seed)
    )
    for step in range(recipe.lm_steps):
        _set_lr(opt, recipe.lm_lr, step, recipe.lm_steps)
        batch = [seqs[i] for i in next(batches)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # [B, L]
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [B, L]
        for i, (s, n_context) in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            # Loss on the continuation only: a random scene's description cannot be predicted, and
            # learning to copy it faithfully is what the LM is for (0.895 vs 0.815 attribute accuracy
            # from true descriptions, same steps).
            labels[i, n_context : len(s)] = ids[i, n_context : len(s)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if progress is not None:
            progress("language model", step + 1, recipe.lm_steps)
    return model.eval(), loss_value


def _length_bucketed(lengths: list[int], batch: int, g: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: each epoch visits every sequence once, in batches cut from sorted
    windows of 8 batches of a fresh permutation, so padding stays small and sampling stays uniform."""
    while True:
        order = torch.randperm(len(lengths), generator=g).tolist()
        batches = []
        for w in range(0, len(order), 8 * batch):
            window = sorted(order[w : w + 8 * batch], key=lengths.__getitem__)
            batches += [window[i : i + batch] for i in range(0, len(window), batch)]
        for k in torch.randperm(len(batches), generator=g).tolist():
            yield batches[k]


# -------------------------------------------------------------------------------------------------
# Vision tower


def _pixels(scenes: list[Any], size: int) -> Tensor:
    return torch.stack(
        [to_tensor(world.render(s, size), CLIP_MEAN, CLIP_STD) for s in scenes]
    )  # [B, 3, H, W]


def train_vision(
    recipe: Recipe, tokenizer: Any, rng: random.Random, progress: Progress | None = None
) -> tuple[Any, float]:
    """CLIP contrastive training on fresh scenes; returns the vision half as a CLIPVisionModel."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    eos = tokenizer.eos_token_id
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": recipe.text_hidden,
            "intermediate_size": 4 * recipe.text_hidden,
            "num_hidden_layers": recipe.text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            # Pooling takes the first EOS; the captions carry no BOS, so that is their last token.
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": eos,
        },
        vision_config={**recipe.vision_arch(), "initializer_range": 0.02},
        projection_dim=recipe.vision_hidden,
    )
    clip = CLIPModel(config)
    # Auxiliary dense head: the shape, colour and size of the object under each patch. Contrastive
    # batches of random scenes are told apart by colour, size and position alone, so contrastive
    # training by itself leaves shape out of the tower (linear probe ~0.6 per object); a real CLIP
    # learns shape from hundreds of millions of pairs, this one gets a segmentation-style signal
    # on the very tokens the connector reads (per-object shape ~0.96-0.99 on unseen scenes).
    aux = torch.nn.Linear(recipe.vision_hidden, len(world.SHAPES) + len(world.COLOURS) + len(world.SIZES) + 3)
    # The tower learns shape only at a high rate; the contrastive text side diverges at that rate.
    tower = {id(p) for p in clip.vision_model.parameters()}
    groups = [
        {"params": [*clip.vision_model.parameters(), *aux.parameters()], "scale": 1.0},
        {
            "params": [p for p in clip.parameters() if id(p) not in tower],
            "scale": recipe.text_lr / recipe.clip_lr,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=recipe.clip_lr, weight_decay=0.05)
    clip.train()
    loss_value = math.nan
    for step in range(recipe.clip_steps):
        _set_lr(opt, recipe.clip_lr, step, recipe.clip_steps)
        scenes = [world.sample_scene(rng) for _ in range(recipe.clip_batch)]
        texts = [world.captions(s, rng, 1)[0] for s in scenes]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:63] + [eos] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        pixels = _pixels(scenes, recipe.image_size)  # [B, 3, H, W]
        out = clip(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            return_loss=True,
            output_hidden_states=True,
        )
        patches = out.vision_model_output.hidden_states[-1][:, 1:]  # [B, N, D]
        targets = patch_targets(scenes, recipe.image_size // recipe.patch_size)  # [B, N, 3]
        loss = out.loss + recipe.aux_weight * _dense_attribute_loss(aux, patches, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        loss_value = out.loss.item()
        if progress is not None:
            progress("vision encoder", step + 1, recipe.clip_steps)
    vision = CLIPVisionModel(config.vision_config)
    # transformers 5's CLIPVisionModel is the bare transformer: the same modules as clip.vision_model.
    vision.load_state_dict(clip.vision_model.state_dict())
    return vision.eval(), loss_value


def object_patch_masks(scene: world.Scene, grid: int) -> Tensor:
    """[objects, grid * grid] bool: the patches whose centre lies in each object's box, row-major like
    the tower's patch tokens."""
    centres = (torch.arange(grid) + 0.5) / grid  # [G] patch centres as fractions of the side
    masks = []
    for o in scene.objects:
        cx, cy = world.centre(o)
        half = world.half_extent(o)
        inside = ((centres - cy).abs() <= half)[:, None] & ((centres - cx).abs() <= half)[None, :]  # [G, G]
        masks.append(inside.flatten())
    return torch.stack(masks)  # [O, G*G]


def patch_targets(scenes: list[world.Scene], grid: int) -> Tensor:
    """[B, grid * grid, 3] (shape, colour, size) index of the object whose box holds each patch centre,
    row-major like the tower's patch tokens; the last index of each attribute (its length) is background."""
    out = torch.empty(len(scenes), grid * grid, 3, dtype=torch.long)  # [B, G*G, 3]
    out[..., 0], out[..., 1], out[..., 2] = len(world.SHAPES), len(world.COLOURS), len(world.SIZES)
    for i, scene in enumerate(scenes):
        for o, inside in zip(scene.objects, object_patch_masks(scene, grid), strict=True):
            label = (world.SHAPES.index(o.shape), world.COLOURS.index(o.colour), world.SIZES.index(o.size))
            out[i][inside] = torch.tensor(label)
    return out


_BACKGROUND_WEIGHT = 0.2  # most patches are background; at full weight they drown the objects' few


def _dense_attribute_loss(head: torch.nn.Linear, patches: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropies of shape, colour and size per patch (background down-weighted)."""
    logits = head(patches)  # [B, N, S+1 + C+1 + Z+1]
    sizes = (len(world.SHAPES) + 1, len(world.COLOURS) + 1, len(world.SIZES) + 1)
    weight = torch.where(targets[..., 0] == len(world.SHAPES), _BACKGROUND_WEIGHT, 1.0).flatten()  # [B*N]
    loss = patches.new_zeros(())
    for k, part in enumerate(logits.split(sizes, dim=-1)):
        ce = F.cross_entropy(part.flatten(0, 1), targets[..., k].flatten(), reduction="none")  # [B*N]
        loss = loss + (ce * weight).sum() / weight.sum()
    return loss


def _set_lr(opt: torch.optim.Optimizer, peak: float, step: int, total: int) -> None:
    warm = max(1, total // 20)
    lr = (
        peak * (step + 1) / warm
        if step < warm
        else peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    )
    for group in opt.param_groups:
        group["lr"] = lr * group.get("scale", 1.0)
