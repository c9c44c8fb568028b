"""Token merging by bipartite soft matching (ToMe, Bolya et al. 2023), as pure functions.

`bipartite_soft_matching` looks at a similarity metric once and returns two closures, `merge` and
`unmerge`, that apply the chosen matching to any tensor aligned with the tokens (features, sizes,
masks). Nothing here holds state; the connector decides what to merge and with which rule.

Token order after a merge is the reference's: the set-A tokens that were kept, in their original
order (so a protected first token stays first), then every set-B token in order. Checkpoints trained
with the EVLGen code depend on this order, because the next layer re-splits tokens by position.
With p > 1 protected tokens (one CLS per frame when video frames are concatenated), the protected
ones, which fall in both sets, come first in their original order, then the rest in that order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MergeFn = Callable[..., Tensor]

MERGE_MODES = ("mean", "weighted", "proportional")


def _identity(x: Tensor, mode: str = "mean") -> Tensor:
    return x


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    protected: int = 1,
    mask: Tensor | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Match r tokens of set A (even positions) to their most similar token of set B (odd positions).

    metric: [B, N, C], compared by cosine similarity, never differentiated.
    protected: how many leading tokens (CLS tokens) are never merged and never merged into; they stay
      first, in order. 0 or 1 for an image.
    mask: optional [B, N] bool, True for real tokens. Padding is never chosen as a destination by a
      real token, and padded set-A tokens are merged away first (with zero weight, see
      `merge_masked_mean`/`merge_wavg`), so real tokens are only merged once padding is used up.
    Returns (merge, unmerge): merge maps [B, N, D] -> [B, N - r, D]; unmerge maps back, copying each
    merged token to all of its sources.
    """
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected <= metric.shape[1]:
        raise ValueError(f"protected must be an int in [0, {metric.shape[1]}], got {protected!r}")
    n_tokens = metric.shape[1]
    # Protected tokens in set A (even positions) and in set B (odd positions).
    pa, pb = (protected + 1) // 2, protected // 2
    # Where each protected token sits in cat([kept protected A, protected B]): back in original order.
    head_order = [i // 2 if i % 2 == 0 else pa + i // 2 for i in range(protected)]
    head_inverse = sorted(range(protected), key=head_order.__getitem__)
    if r <= 0:
        return _identity, _identity
    max_r = (n_tokens - protected) // 2
    if r > max_r:
        raise ValueError(
            f"cannot merge r={r} of {n_tokens} tokens with {protected} protected: at most {max_r} per layer"
        )

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]  # [B, Na, C], [B, Nb, C]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, 1::2], -math.inf)
            scores = scores.masked_fill(~mask[:, ::2, None], math.inf)
        if protected:
            scores[..., :pa, :] = -math.inf  # never merged away...
            scores[..., :, :pb] = -math.inf  # ...nor merged into

        node_max, node_idx = scores.max(dim=-1)  # [B, Na]
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # [B, Na, 1]
        unm_idx = edge_idx[..., r:, :].sort(dim=-2).values  # [B, Na - r, 1] kept, original order
        src_idx = edge_idx[..., :r, :]  # [B, r, 1] merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # [B, r, 1] their partners in B

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        """[B, N, D] -> [B, N - r, D]; mode is a scatter_reduce rule ("mean" = the paper's, "sum")."""
        src, dst = x[..., ::2, :], x[..., 1::2, :]  # [B, Na, D], [B, Nb, D]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))  # [B, Na - r, D]
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))  # [B, r, D]
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode, include_self=True)
        if pb == 0:  # the reference's order (0 or 1 protected token)
            return torch.cat([unm, dst], dim=1)  # [B, N - r, D]
        # Protected tokens fall in both sets: they move to the front, in their original order.
        head = torch.cat([unm[..., :pa, :], dst[..., :pb, :]], dim=1)[..., head_order, :]  # [B, p, D]
        return torch.cat([head, unm[..., pa:, :], dst[..., pb:, :]], dim=1)  # [B, N - r, D]

    def unmerge(x: Tensor) -> Tensor:
        """[B, N - r, D] -> [B, N, D]: every source gets the value of the token it was merged into."""
        unm_len = unm_idx.shape[1]
        head, x = x[..., :protected, :][..., head_inverse, :], x[..., protected:, :]  # see merge's order
        unm = torch.cat([head[..., :pa, :], x[..., : unm_len - pa, :]], dim=1)  # [B, Na - r, D]
        dst = torch.cat([head[..., pa:, :], x[..., unm_len - pa :, :]], dim=1)  # [B, Nb, D]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))  # [B, r, D]
        out = torch.zeros(n, n_tokens, c, device=x.device, dtype=x.dtype)  # [B, N, D]
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted merge: x [B, N, D], size [B, N, 1] (tokens each one stands for; 0 = padding).

    Preserves sum(size * x). Returns (x [B, N - r, D], size [B, N - r, 1]).
    """
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size.clamp_min(torch.finfo(size.dtype).tiny), size


def merge_masked_mean(merge: MergeFn, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's plain mean restricted to real tokens: x [B, N, D], mask [B, N] bool.

    A destination becomes the mean of itself and its real sources; padding contributes nothing.
    Returns (x [B, N - r, D], mask [B, N - r]).
    """
    w = mask[..., None].to(x.dtype)  # [B, N, 1]
    x, w = merge_wavg(merge, x, w)
    return x, w[..., 0] > 0


def merge_schedule(num_layers: int, r: int | Sequence[int], inflection: float = 0.0) -> list[int]:
    """Tokens merged per layer: a constant r, a linear ramp (r, inflection), or an explicit list.

    The ramp keeps the mean near r and goes from r * (1 - inflection) at the first layer to
    r * (1 + inflection) at the last: inflection < 0 merges more early, > 0 merges more late.
    """
    if isinstance(r, Sequence) and not isinstance(r, str):
        rs = [int(v) for v in r]
        if len(rs) != num_layers:
            raise ValueError(
                f"an explicit r schedule needs one entry per layer ({num_layers}), got {len(rs)}"
            )
        if inflection:
            raise ValueError("r_inflection applies to a constant r, not to an explicit list")
    elif inflection == 0.0 or num_layers == 1:
        rs = [int(r)] * num_layers
    else:
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"r_inflection must lie in [-1, 1], got {inflection}")
        lo = r * (1.0 - inflection)
        hi = 2 * r - lo
        step = (hi - lo) / (num_layers - 1)
        rs = [int(round(lo + step * i)) for i in range(num_layers)]
    if any(v < 0 for v in rs):
        raise ValueError(f"r must be >= 0 at every layer, got {rs}")
    return rs


def token_schedule(num_tokens: int, rs: Sequence[int], protected: int = 1) -> list[int]:
    """Token counts entering each layer, then the output count: [N, N - r0, ..., N - sum(r)].

    Raises ValueError naming the first layer whose r exceeds floor((t - protected) / 2); schedules are
    validated before any model is built rather than silently clamped.
    """
    counts = [num_tokens]
    for i, r in enumerate(rs):
        t = counts[-1]
        max_r = max((t - protected) // 2, 0)
        if r > max_r:
            raise ValueError(
                f"merge schedule {list(rs)} needs r={r} at layer {i} where only {t} tokens remain "
                f"({protected} protected): at most floor((t - protected) / 2) = {max_r} can be merged"
            )
        counts.append(t - r)
    return counts
