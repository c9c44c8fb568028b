"""Video modules: attention across frames inside the frozen ViT; frames side by side for the connector.

`TemporalAttention` is the paper's temporal module. It runs inside every block of the frozen tower,
between the attention residual and the MLP (installed with `VisionTower.set_block_adapters`): for
each spatial position, the T frames attend to each other (queries and keys are Linear(width -> 256),
8 heads, values are the input itself), and `x + gate * attention(x)` goes on, with a scalar gate that
starts at 0, so that at initialisation the video model is exactly the image model on each frame.

Without a time position this attention is permutation-equivariant over frames, and the frame mean
after the tower is permutation-invariant: the paper's video model cannot tell a clip from the same
clip played backwards. Two order-aware options:

* `time_embed`: a learned embedding per frame index added to the input of the query and key
  projections (not to the values, so gate 0 still gives the image model);
* `FrameTokens` (`frames_to_connector: concat`): instead of averaging, all T x N tokens go to the
  TomeFormer, which merges similar tokens across frames too. Each frame's tokens get a learned time
  embedding; spatial positions repeat per frame (ids 0..N-1, inside BERT's table); the T CLS tokens
  come first and are all protected from merging, so every frame keeps its summary and the connector's
  first token stays a CLS as in the image path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "FrameTokens",
    "TemporalAttention",
    "concat_merge_schedule",
    "repeat_to_frames",
    "temporal_modules",
]


class TemporalAttention(nn.Module):
    """Per-position attention across frames: [B, T, N, D] -> [B, T, N, D], identity while gate = 0.

    `frames` > 0 adds a learned time embedding (one per frame index < frames) to the queries' and keys'
    input, making the module order-aware; 0 is the paper's module.
    """

    def __init__(self, width: int, dim: int = 256, heads: int = 8, frames: int = 0) -> None:
        super().__init__()
        if dim % heads or width % heads:
            raise ValueError(
                f"temporal attention with {heads} heads needs a query/key size ({dim}) and a tower width "
                f"({width}) divisible by {heads}"
            )
        self.heads = heads
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        # Trained in fp32 whatever the tower's dtype; the gate makes the whole module a no-op at init.
        self.gate = nn.Parameter(torch.zeros(()))
        self.time = nn.Parameter(torch.randn(frames, width) * 0.02) if frames > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        b, t, n, d = x.shape
        h = x.to(self.query.weight.dtype)  # [B, T, N, D]
        values = h
        if self.time is not None:
            if t > self.time.shape[0]:
                raise ValueError(
                    f"clip of {t} frames, but the time embedding knows {self.time.shape[0]} (data.frames)"
                )
            h = h + self.time[:t, None, :]  # [B, T, N, D]

        def split(z: Tensor) -> Tensor:
            return z.unflatten(-1, (self.heads, -1)).permute(0, 2, 3, 1, 4)  # [B, N, H, T, d_head]

        q, k, v = split(self.query(h)), split(self.key(h)), split(values)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, N, H, T, T]
        mixed = scores.softmax(dim=-1) @ v  # [B, N, H, T, D/H]
        mixed = mixed.permute(0, 3, 1, 2, 4).flatten(3)  # [B, T, N, D]
        return x + (self.gate * mixed).to(x.dtype)  # [B, T, N, D]


def temporal_modules(
    kind: str, width: int, num_blocks: int, *, dim: int, heads: int, frames: int
) -> list[TemporalAttention] | None:
    """One TemporalAttention per run block for `video.temporal` = kind (None for "none")."""
    if kind == "none":
        return None
    if kind not in ("paper", "time-embed"):
        raise ValueError(f"unknown temporal module {kind!r}; expected none, paper or time-embed")
    time = frames if kind == "time-embed" else 0
    return [TemporalAttention(width, dim, heads, time) for _ in range(num_blocks)]


class FrameTokens(nn.Module):
    """[B, T, N, D] frame tokens -> ([B, T*N, D] one sequence, [T*N] position ids) for the connector.

    Order: the T CLS tokens (frame order), then frame 1's patches, ..., frame T's patches. Each token
    gets its frame's time embedding; position ids repeat the per-frame ids 0..N-1. Clips must have
    exactly `frames` frames (images are repeated to `frames` before the tower, see VLM.tower_features).
    """

    def __init__(self, hidden: int, frames: int, protected: int) -> None:
        super().__init__()
        self.frames = frames
        self.per_frame_protected = protected
        # BERT-style init, like the connector's own position table.
        self.time = nn.Parameter(torch.randn(frames, hidden) * 0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, n, d = x.shape
        if t != self.frames:
            raise ValueError(f"frames_to_connector=concat was built for {self.frames} frames, got {t}")
        p = self.per_frame_protected
        x = x + self.time[:, None, :].to(x.dtype)  # [B, T, N, D]
        ids = torch.arange(n, device=x.device)  # [N]
        tokens = torch.cat([x[:, :, :p].flatten(1, 2), x[:, :, p:].flatten(1, 2)], dim=1)  # [B, T*N, D]
        positions = torch.cat([ids[:p].repeat_interleave(t), ids[p:].repeat(t)])  # [T*N]
        return tokens, positions


def concat_merge_schedule(num_tokens: int, num_layers: int, final: int, protected: int) -> list[int]:
    """Tokens merged per layer going geometrically from `num_tokens` to `final` (each layer keeps the
    same fraction), the default `video.r` of frames_to_connector=concat. Raises when ToMe cannot merge
    that fast (at most half of the unprotected tokens per layer)."""
    if not protected <= final <= num_tokens:
        raise ValueError(f"cannot go from {num_tokens} to {final} tokens with {protected} protected")
    counts = [round(num_tokens * (final / num_tokens) ** (i / num_layers)) for i in range(num_layers + 1)]
    counts[-1] = final
    rs = [a - b for a, b in zip(counts, counts[1:], strict=False)]
    for i, r in enumerate(rs):
        if r > (counts[i] - protected) // 2:
            raise ValueError(
                f"{num_layers} connector layers cannot merge {num_tokens} tokens down to {final} "
                f"(layer {i} would merge {r} of {counts[i]}): set video.r explicitly or merge less"
            )
    return rs


def repeat_to_frames(pixels: Tensor, frames: int) -> Tensor:
    """[B, 1, C, H, W] images -> [B, frames, C, H, W] still clips; clips of `frames` pass unchanged."""
    t = pixels.shape[1]
    if t == frames:
        return pixels
    if t != 1:
        raise ValueError(
            f"this model concatenates exactly {frames} frames (data.frames) for the connector, got {t}"
        )
    return pixels.expand(-1, frames, *pixels.shape[2:])  # [B, T, C, H, W]
