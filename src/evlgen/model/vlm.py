"""The EVLGen model: frozen vision tower -> ln_vision -> VL_proj -> connector -> LLM_proj -> frozen LM.

The only module that knows all three parts. It receives them already built (see build.py), owns the
small trainable glue (ln_vision and the two projections), decides what is frozen, and saves exactly
the trainable weights.

Connectors (TomeFormer, QFormer, MLPProjector) state which widths they bridge themselves:
`reads_tower_width` (no vl_proj: the Q-Former's cross-attention and the MLP read the tower width)
and `writes_llm_width` (no llm_proj: the MLP ends at the LM width); an absent projection is an
`nn.Identity` with no weights. Q-Former stage 1 (`stage1`, BLIP-2's ITC + ITM + ITG) has no LM at
all: `llm` is None and the forward returns the stage-1 losses.
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
from evlgen.model.mlp import MLPProjector
from evlgen.model.qformer import QFormer
from evlgen.model.qformer_stage1 import QFormerStage1, Stage1Output
from evlgen.model.temporal import FrameTokens, repeat_to_frames
from evlgen.model.vision import VisionTower

Connector = TomeFormer | QFormer | MLPProjector

log = logging.getLogger(__name__)

FROZEN_PARTS = ("vision", "llm")
# Trainable modules that live inside a frozen part: the temporal modules run inside the tower's blocks.
TRAINABLE_INSIDE = ("vision.block_adapters.",)


def is_trainable_key(key: str) -> bool:
    """Whether a state-dict key belongs to the trainable weights (what checkpoints hold)."""
    return key.split(".", 1)[0] not in FROZEN_PARTS or key.startswith(TRAINABLE_INSIDE)


class VLM(nn.Module):
    """Composes a frozen VisionTower, a trainable connector and a FrozenLM.

    pixels are [B, T, C, H, W] (images: T = 1); frame features are averaged over T after the tower,
    as in the paper's video path, unless `frame_tokens` is given: then all frames' tokens go to the
    connector side by side (model/temporal.py). Temporal modules, if any, are the tower's block
    adapters: they train although the tower is frozen.
    """

    def __init__(
        self,
        vision: VisionTower,
        connector: Connector,
        llm: FrozenLM | None,
        stage1: QFormerStage1 | None = None,
        frame_tokens: FrameTokens | None = None,
    ) -> None:
        super().__init__()
        if (llm is None) != (stage1 is not None):
            raise ValueError("a VLM has an LM (generative training) or Q-Former stage-1 heads, exactly one")
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.frame_tokens = frame_tokens
        dv = vision.hidden_size
        # Trainable and freshly initialised, as in the reference: BLIP-2's own trained ln_vision is
        # the tower's post_layernorm, which VisionTower never applies.
        self.ln_vision = nn.LayerNorm(dv)
        if connector.reads_tower_width:
            if connector.input_size != dv:
                raise ValueError(f"the connector reads width {connector.input_size}, the tower gives {dv}")
            self.vl_proj: nn.Module = nn.Identity()
        else:
            self.vl_proj = nn.Linear(dv, connector.hidden_size)
        if llm is None:
            self.llm_proj: nn.Module = nn.Identity()
        elif connector.writes_llm_width:
            if connector.hidden_size != llm.hidden_size:
                raise ValueError(
                    f"the connector writes width {connector.hidden_size}, the LM reads {llm.hidden_size}"
                )
            self.llm_proj = nn.Identity()
        else:
            self.llm_proj = nn.Linear(connector.hidden_size, llm.hidden_size)
        if stage1 is not None:
            self.stage1 = stage1
        self.config = None  # the resolved evlgen Config, attached by build.build_vlm

    # -- freezing ------------------------------------------------------------------------------

    def freeze(self, log_table: bool = True) -> str:
        """Freeze the tower and the LM, unfreeze everything else; returns (and logs) a table."""
        for name, module in self.named_children():
            module.requires_grad_(name not in FROZEN_PARTS)
        if self.vision.block_adapters is not None:
            self.vision.block_adapters.requires_grad_(True)
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
            part = getattr(self, name)
            if part is not None:
                part.eval()
        if self.vision.block_adapters is not None:
            self.vision.block_adapters.train(mode)
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Weights of every part that is not frozen (what a checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if is_trainable_key(k)}

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Strict load of the trainable weights: any missing, unexpected or mis-shaped key fails by name."""
        check_state_dict(self.trainable_state_dict(), state, source, "the trainable parts of VLM")
        # Frozen parts are absent on purpose; the check above made every other key exact.
        self.load_state_dict(state, strict=False)

    # -- forward -------------------------------------------------------------------------------

    def tower_features(self, pixels: Tensor) -> Tensor:
        """pixels [B, T, C, H, W] -> tower output averaged over frames [B, N, Dv] (with frame_tokens:
        every frame, [B, T, N, Dv], images repeated to the model's frame count).

        Without temporal modules this is all that depends on the frozen tower, hence what the feature
        cache stores.
        """
        if self.frame_tokens is not None:
            return self.vision(repeat_to_frames(pixels, self.frame_tokens.frames))  # [B, T, N, Dv]
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
        feats = features.to(self.ln_vision.weight.dtype)  # [B, N, Dv] or [B, T, N, Dv]
        x = self.vl_proj(self.ln_vision(feats))  # [B, N, Dc] or [B, T, N, Dc]
        if self.frame_tokens is not None:  # frames side by side: a TomeFormer with time embeddings
            x, positions = self.frame_tokens(x)  # [B, T*N, Dc], [T*N]
            x, state = self.connector.forward_with_state(x, positions=positions)  # [B, P, Dc]
        else:
            x, state = self.connector.forward_with_state(x)  # [B, P, Dc]
        return self.llm_proj(x), state.mask  # [B, P, D_llm]

    def forward(
        self, pixels: Tensor | None, prompts: list[str], targets: list[str], features: Tensor | None = None
    ) -> LMOutput | Stage1Output:
        """Next-token cross-entropy on the targets only; in Q-Former stage 1, its ITC + ITM + ITG
        losses on the targets (prompts are not read)."""
        if self.llm is None:
            if features is None:
                if pixels is None:
                    raise ValueError("forward needs pixels or features")
                features = self.tower_features(pixels)
            image = self.vl_proj(self.ln_vision(features.to(self.ln_vision.weight.dtype)))  # [B, N, Dv]
            return self.stage1(self.connector, image, targets)
        prefix, mask = self.encode(pixels, features)
        return self.llm(prefix, prompts, targets, prefix_mask=mask)

    @torch.no_grad()
    def generate(
        self, pixels: Tensor | None, prompts: list[str], features: Tensor | None = None, **kwargs: object
    ) -> list[str]:
        """Decoded continuations of each prompt; kwargs go to FrozenLM.generate (num_beams, ...)."""
        if self.llm is None:
            raise ValueError(
                "a Q-Former stage-1 model has no LM to generate with; train stage 2 from it "
                "(connector.init_from=<this model>)"
            )
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
