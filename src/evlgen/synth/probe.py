"""The frozen backbones' own ceilings on the synthetic world: what the tower's tokens hold, and what
the LM writes when it is handed the scene in words.

A connector can only pass on what the tower's tokens hold. For each object of a scene, the probe
averages the tower's output tokens over the patches inside the object's box and fits one linear
classifier per attribute (shape, colour, size) on training scenes; accuracy on unseen scenes says how
much of each attribute is linearly readable. The scene-level figure (every object's shape and colour
right) is the one to hold beside a caption's attribute accuracy: a connector scoring near it is
limited by the tower, one far below it by itself.

The LM's ceiling is the same score for captions the frozen LM writes from the true scene description
in the layout it was pretrained on (`</s> left: ... </s> caption:`), in the slots' trained order and
shuffled: what a connector could reach if its visual prefix said exactly what the words say.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from evlgen.synth import world
from evlgen.synth.backbones import _lm_ids, _pixels, object_patch_masks

ATTRIBUTES = ("shape", "colour", "size")
_VOCAB = {"shape": world.SHAPES, "colour": world.COLOURS, "size": world.SIZES}


@torch.no_grad()
def object_features(
    vision: Any, scenes: list[world.Scene], batch: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-object mean patch token, its attribute labels and the index of its scene.

    Returns ``(features [O, D], labels [O, 3], scene_index [O])`` over all objects of `scenes`.
    """
    grid = vision.image_size // vision.model.config.patch_size
    feats, labels, owner = [], [], []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        pixels = _pixels(chunk, vision.image_size).unsqueeze(1)  # [B, 1, 3, H, W]
        tokens = vision(pixels)[:, 0, vision.num_protected :].float()  # [B, G*G, D] patch tokens only
        for i, scene in enumerate(chunk):
            masks = object_patch_masks(scene, grid).float()  # [O, G*G]
            feats.append(masks @ tokens[i] / masks.sum(1, keepdim=True))  # [O, D]
            labels += [[_VOCAB[a].index(getattr(o, a)) for a in ATTRIBUTES] for o in scene.objects]
            owner += [start + i] * len(scene.objects)
    return torch.cat(feats), torch.tensor(labels), torch.tensor(owner)


def fit_linear(x: Tensor, y: Tensor, classes: int, steps: int = 300, weight_decay: float = 1e-4) -> Tensor:
    """Multinomial logistic regression by full-batch L-BFGS; returns [D + 1, classes] (last row: bias)."""
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # [O, D+1]
    w = torch.zeros(xb.shape[1], classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + weight_decay * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def tower_ceiling(
    vision: Any, *, train_scenes: int = 2000, test_scenes: int = 500, seed: int = 0
) -> dict[str, Any]:
    """Linear-probe accuracy of the tower on unseen scenes, per object and per scene.

    Scenes come from the training distribution (compositional hold-out excluded) under their own seeded
    streams, so the figure does not depend on any dataset written to disk.
    """
    rng_train, rng_test = random.Random(f"probe-train-{seed}"), random.Random(f"probe-test-{seed}")
    train = [world.sample_scene(rng_train) for _ in range(train_scenes)]
    test = [world.sample_scene(rng_test) for _ in range(test_scenes)]
    x_train, y_train, _ = object_features(vision, train)
    x_test, y_test, owner = object_features(vision, test)
    # Standardised features: one weight decay then suits every tower width and scale.
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    correct = {}
    for k, name in enumerate(ATTRIBUTES):
        w = fit_linear(x_train, y_train[:, k], len(_VOCAB[name]))
        logits = torch.cat([x_test, torch.ones(len(x_test), 1)], dim=1) @ w  # [O, classes]
        correct[name] = logits.argmax(1) == y_test[:, k]  # [O]
    both = correct["shape"] & correct["colour"]  # [O]
    # A scene counts only when every one of its objects is right.
    wrong = torch.zeros(test_scenes).index_add_(0, owner, (~both).float())  # [S] wrong objects per scene
    per_scene = wrong == 0
    return {
        "objects": len(y_test),
        "scenes": test_scenes,
        **{f"{name}_accuracy": correct[name].float().mean().item() for name in ATTRIBUTES},
        "scene_accuracy": per_scene.float().mean().item(),
    }


@torch.no_grad()
def lm_ceiling(
    lm: Any, tokenizer: Any, *, scenes: int = 200, seed: int = 0, num_beams: int = 3, max_new_tokens: int = 24
) -> dict[str, Any]:
    """Attribute accuracy of the LM's captions of unseen scenes from their slot descriptions, with the
    slots in column order (`in_order`) and shuffled per scene (`shuffled`)."""
    rng = random.Random(f"lm-ceiling-{seed}")
    test = [world.sample_scene(rng) for _ in range(scenes)]
    out: dict[str, Any] = {"scenes": scenes}
    for name, order in (("in_order", None), ("shuffled", random.Random(f"lm-ceiling-order-{seed}"))):
        right = 0
        for scene in test:
            ids, _ = _lm_ids(tokenizer, scene.slots(order), "caption:")
            prompt = torch.tensor([ids[:-1]])  # [1, L] without the closing </s>
            generated = lm.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )  # [1, L + new]
            text = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
            right += world.attribute_match(text, scene)["all"]
        out[name] = right / scenes
    return out
