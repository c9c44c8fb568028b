"""The EVLGen model: frozen vision tower -> ln_vision -> VL_proj -> TomeFormer -> LLM_proj -> frozen LM.

The only module that knows all three parts. It receives them already built (see build.py), owns the
small trainable glue (ln_vision and the two projections), decides what is frozen, and saves exactly
the trainable weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evlgen.model.connector import TomeFormer, check_state_dict
from evlgen.model.llm import FrozenLM, LMOutput
from evlgen.model.vision import VisionTower

log = logging.getLogger(__name__)

FROZEN_PARTS = ("vision", "llm")


class VLM(nn.Module):
    """Composes a frozen VisionTower, a trainable connector and a FrozenLM.

    pixels are [B, T, C, H, W] (images: T = 1); frame features are averaged over T after the tower,
    as in the paper's video path.
    """

    def __init__(self, vision: VisionTower, connector: TomeFormer, llm: FrozenLM) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        # Trainable and freshly initialised, as in the reference: BLIP-2's own trained ln_vision is
        # the tower's post_layernorm, which VisionTower never applies.
        self.ln_vision = nn.LayerNorm(vision.hidden_size)
        self.vl_proj = nn.Linear(vision.hidden_size, connector.hidden_size)
        self.llm_proj = nn.Linear(connector.hidden_size, llm.hidden_size)
        self.config = None  # the resolved evlgen Config, attached by build.build_vlm

    # -- freezing ------------------------------------------------------------------------------

    def freeze(self, log_table: bool = True) -> str:
        """Freeze the tower and the LM, unfreeze everything else; returns (and logs) a table."""
        for name, module in self.named_children():
            module.requires_grad_(name not in FROZEN_PARTS)
        self.train(self.training)
        table = self.parameter_table()
        if log_table:
            log.info("parameters:\n%s", table)
        return table

    def parameter_table(self) -> str:
        rows = []
        for name, module in self.named_children():
            n = sum(p.numel() for p in module.parameters())
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            rows.append((name, trainable, n - trainable))
        total_t, total_f = sum(r[1] for r in rows), sum(r[2] for r in rows)
        lines = [f"{'part':<12} {'trainable':>14} {'frozen':>16}"]
        lines += [f"{n:<12} {t:>14,} {f:>16,}" for n, t, f in rows]
        lines.append(f"{'total':<12} {total_t:>14,} {total_f:>16,}")
        return "\n".join(lines)

    def train(self, mode: bool = True) -> VLM:
        # Frozen parts stay in eval mode whatever the caller asks: no dropout, fixed norm statistics.
        super().train(mode)
        for name in FROZEN_PARTS:
            getattr(self, name).eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Weights of every part that is not frozen (what a checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] not in FROZEN_PARTS}

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Strict load of the trainable weights: any missing, unexpected or mis-shaped key fails by name."""
        check_state_dict(self.trainable_state_dict(), state, source, "the trainable parts of VLM")
        # Frozen parts are absent on purpose; the check above made every other key exact.
        self.load_state_dict(state, strict=False)

    # -- forward -------------------------------------------------------------------------------

    def tower_features(self, pixels: Tensor) -> Tensor:
        """pixels [B, T, C, H, W] -> frozen tower output averaged over frames [B, N, Dv].

        This is all that depends on the frozen tower, hence what the feature cache stores.
        """
        feats = self.vision(pixels)  # [B, T, N, Dv]
        if feats.shape[1] == 1:
            return feats[:, 0]  # [B, N, Dv]
        # A low-precision tower's frames are averaged in float32.
        return feats.mean(dim=1, dtype=torch.float32)  # [B, N, Dv]

    def encode(self, pixels: Tensor | None, features: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """pixels [B, T, C, H, W] (or cached tower features [B, N, Dv]) -> (prefix [B, P, D_llm], mask)."""
        if features is None:
            if pixels is None:
                raise ValueError("encode needs pixels or features")
            features = self.tower_features(pixels)
        feats = features.to(self.ln_vision.weight.dtype)  # [B, N, Dv]
        x = self.vl_proj(self.ln_vision(feats))  # [B, N, Dc]
        x, state = self.connector.forward_with_state(x)  # [B, P, Dc]
        return self.llm_proj(x), state.mask  # [B, P, D_llm]

    def forward(
        self, pixels: Tensor | None, prompts: list[str], targets: list[str], features: Tensor | None = None
    ) -> LMOutput:
        """Next-token cross-entropy on the targets only."""
        prefix, mask = self.encode(pixels, features)
        return self.llm(prefix, prompts, targets, prefix_mask=mask)

    @torch.no_grad()
    def generate(
        self, pixels: Tensor | None, prompts: list[str], features: Tensor | None = None, **kwargs: object
    ) -> list[str]:
        """Decoded continuations of each prompt; kwargs go to FrozenLM.generate (num_beams, ...)."""
        prefix, mask = self.encode(pixels, features)
        return self.llm.generate(prefix, prompts, prefix_mask=mask, **kwargs)

    def caption(self, items: list[Any], **kwargs: Any) -> list[str]:
        """Captions for image / video files or PIL images; see `evlgen.infer.caption`."""
        from evlgen.infer import caption

        return caption(self, items, **kwargs)

    def answer(self, items: list[Any], questions: list[str], **kwargs: Any) -> list[str]:
        """Answers to one question per image / video; see `evlgen.infer.answer`."""
        from evlgen.infer import answer

        return answer(self, items, questions, **kwargs)

    # -- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Trainable weights (safetensors) + resolved config + model card; see build.save_pretrained."""
        from evlgen.model.build import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary folder and upload it to a Hugging Face repo; see evlgen.hub.push_to_hub."""
        import tempfile

        from evlgen.hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(self.save_pretrained(Path(tmp) / "model"), repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VLM:
        """Rebuild the frozen parts from their sources and load the trainable weights strictly."""
        from evlgen.model.build import from_pretrained

        return from_pretrained(directory)
