"""The MLP projector baseline (LLaVA-1.5's `mlp2x_gelu`): every visual token, mapped into the LM.

Linear(Dv, D_llm) -> GELU -> Linear(D_llm, D_llm) on each of the N visual tokens, so the LM reads
all N of them (257 for a ViT at 224 px / 14). The module is a `nn.Sequential`, so its keys are
LLaVA's `mm_projector.{0,2}.*` under the name `connector`.

The VLM keeps its trainable `ln_vision` in front of it (LLaVA has none): our towers are cut before
their final norm, where the residual stream of a large ViT (EVA ViT-g) reaches large magnitudes, and
keeping the same normalised input for every connector kind makes the comparison one of connectors
alone, for 2 * Dv parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from evlgen.model.connector import TokenState


class MLPProjector(nn.Sequential):
    """x [B, N, Dv] (ln_vision's output) -> [B, N, D_llm]; the padding mask passes through unchanged."""

    # VLM glue: reads the tower width and writes the LM width, so neither vl_proj nor llm_proj is needed.
    reads_tower_width = True
    writes_llm_width = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features)
        )
        self.in_features = in_features
        self.out_features = out_features

    @property
    def input_size(self) -> int:
        return self.in_features

    @property
    def hidden_size(self) -> int:
        return self.out_features

    def forward_with_state(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, TokenState]:
        return self(x), TokenState(mask=mask)  # [B, N, D_llm]


def mlp_macs(num_tokens: int, in_features: int, out_features: int) -> int:
    """Linear-layer multiply-accumulates of the projector for one image of `num_tokens` tokens."""
    return num_tokens * (in_features * out_features + out_features * out_features)
