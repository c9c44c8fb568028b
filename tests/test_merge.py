"""Merging functions against a brute-force, loop-based reference of ToMe bipartite matching."""

import pytest
import torch

from evlgen.model.merge import (
    bipartite_soft_matching,
    merge_masked_mean,
    merge_schedule,
    merge_wavg,
    token_schedule,
)


def brute_force_merge(metric, x, r, protected, size=None):
    """One sample at a time, plain Python loops: the rule as the paper states it.

    Returns the merged tokens in the reference order: kept A tokens by original position, then B.
    """
    out_x, out_size = [], []
    for m, xs, ss in zip(metric, x, size if size is not None else [None] * len(x), strict=True):
        n = m.shape[0]
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for i in a_idx:
            if protected and i == 0:
                continue
            sims = [torch.nn.functional.cosine_similarity(m[i], m[j], dim=0).item() for j in b_idx]
            j = max(range(len(b_idx)), key=lambda k: sims[k])
            best[i] = (sims[j], b_idx[j])
        merged = sorted(best, key=lambda i: -best[i][0])[:r]
        groups = {j: [j] for j in b_idx}
        for i in merged:
            groups[best[i][1]].append(i)
        kept = [i for i in a_idx if i not in merged]
        if ss is None:
            rows = [xs[i] for i in kept] + [torch.stack([xs[k] for k in groups[j]]).mean(0) for j in b_idx]
        else:
            rows = [xs[i] for i in kept]
            sizes = [ss[i] for i in kept]
            for j in b_idx:
                w = torch.stack([ss[k] for k in groups[j]])
                rows.append((torch.stack([xs[k] for k in groups[j]]) * w).sum(0) / w.sum())
                sizes.append(w.sum(0))
            out_size.append(torch.stack(sizes))
        out_x.append(torch.stack(rows))
    return torch.stack(out_x), (torch.stack(out_size) if size is not None else None)


@pytest.mark.parametrize("n,r,protected", [(17, 5, 1), (16, 8, 0), (257, 19, 1), (10, 4, 1), (9, 1, 0)])
def test_mean_merge_equals_brute_force(n, r, protected):
    g = torch.Generator().manual_seed(n * 31 + r)
    metric = torch.randn(3, n, 8, generator=g)
    x = torch.randn(3, n, 6, generator=g)
    merge, _ = bipartite_soft_matching(metric, r, protected)
    expected, _ = brute_force_merge(metric, x, r, protected)
    got = merge(x, mode="mean")
    assert got.shape == (3, n - r, 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_weighted_merge_equals_brute_force_and_preserves_mass():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 21, 8, generator=g)
    x = torch.randn(2, 21, 5, generator=g)
    size = torch.randint(1, 4, (2, 21, 1), generator=g).float()
    merge, _ = bipartite_soft_matching(metric, 7, 1)
    got_x, got_size = merge_wavg(merge, x, size)
    exp_x, exp_size = brute_force_merge(metric, x, 7, 1, size)
    torch.testing.assert_close(got_x, exp_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, exp_size)
    torch.testing.assert_close((got_size * got_x).sum(1), (size * x).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_size.sum(1), size.sum(1))


def test_r_zero_is_identity():
    x = torch.randn(2, 11, 4)
    merge, unmerge = bipartite_soft_matching(torch.randn(2, 11, 3), 0)
    assert merge(x) is x and unmerge(x) is x


def test_protected_token_stays_first_and_unmerged():
    # Make token 0 identical to token 1 so it would be the best match if it were not protected.
    metric = torch.randn(4, 15, 6)
    metric[:, 0] = metric[:, 1]
    x = torch.randn(4, 15, 3)
    merge, _ = bipartite_soft_matching(metric, 7, protected=1)
    out = merge(x)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    merge0, _ = bipartite_soft_matching(metric, 7, protected=0)
    assert not torch.allclose(merge0(x)[:, 0], x[:, 0])  # unprotected, token 0 does get merged


def test_output_order_kept_a_then_b():
    # Positions as features: the kept A tokens must come out ascending, then all B tokens in order.
    n, r = 13, 4
    metric = torch.randn(1, n, 5)
    pos = torch.arange(n, dtype=torch.float32)[None, :, None]
    merge, _ = bipartite_soft_matching(metric, r, protected=1)
    out = merge(pos, mode="amax")[0, :, 0].tolist()
    kept, b = out[: (n + 1) // 2 - r], out[(n + 1) // 2 - r :]
    assert kept == sorted(kept) and kept[0] == 0 and all(int(v) % 2 == 0 for v in kept)
    assert len(b) == n // 2
    assert all(v >= 2 * i + 1 for i, v in enumerate(b))  # B token i, possibly absorbing later A tokens


def test_unmerge_restores_each_source_to_its_destination():
    metric = torch.randn(2, 9, 4)
    x = torch.randn(2, 9, 3)
    merge, unmerge = bipartite_soft_matching(metric, 3, 1)
    out = merge(x)
    back = unmerge(out)
    assert back.shape == x.shape
    # Every restored token is one of the merged tokens, and re-merging groups of equal tokens is exact.
    assert all((out[b] - back[b, i]).abs().sum(-1).min() < 1e-6 for b in range(2) for i in range(9))
    torch.testing.assert_close(merge(back), out)


def test_gradients_flow_to_x():
    x = torch.randn(2, 17, 4, requires_grad=True)
    metric = torch.randn(2, 17, 4)
    merge, _ = bipartite_soft_matching(metric, 6, 1)
    merge(x).square().sum().backward()
    assert x.grad is not None and (x.grad.abs().sum(-1) > 0).all()


def test_too_many_merges_is_an_error():
    with pytest.raises(ValueError, match="at most 8"):
        bipartite_soft_matching(torch.randn(1, 17, 4), 9, protected=1)


def test_masked_mean_ignores_padding_and_matches_unmasked_when_all_real():
    g = torch.Generator().manual_seed(3)
    metric, x = torch.randn(2, 15, 6, generator=g), torch.randn(2, 15, 4, generator=g)
    full = torch.ones(2, 15, dtype=torch.bool)
    merge, _ = bipartite_soft_matching(metric, 5, 1, mask=full)
    got, got_mask = merge_masked_mean(merge, x, full)
    torch.testing.assert_close(got, merge(x, mode="mean"))
    assert got_mask.all()

    mask = full.clone()
    mask[0, 9:] = False  # sample 0 has 9 real tokens and 6 padded ones
    merge, _ = bipartite_soft_matching(metric, 5, 1, mask=mask)
    out, out_mask = merge_masked_mean(merge, x, mask)
    # The 3 padded A tokens (10, 12, 14) are merged away first at no cost, then 2 real ones: 9 - 2 = 7.
    assert out_mask[1].all() and out_mask[0].sum() == 7
    x2 = x.clone()
    x2[0, 9:] = 1e6  # garbage in the padding changes no real output
    merge2, _ = bipartite_soft_matching(metric, 5, 1, mask=mask)
    out2, _ = merge_masked_mean(merge2, x2, mask)
    torch.testing.assert_close(out2[0][out_mask[0]], out[0][out_mask[0]])


def test_schedules():
    assert merge_schedule(12, 19) == [19] * 12
    assert merge_schedule(3, [5, 4, 3]) == [5, 4, 3]
    ramp = merge_schedule(5, 10, inflection=-0.5)
    assert ramp == [15, 12, 10, 8, 5] and sum(ramp) == 50  # inflection < 0 merges more early
    assert token_schedule(257, [19] * 12) == [257 - 19 * i for i in range(13)]
    assert token_schedule(257, [19] * 12)[-1] == 29
    with pytest.raises(ValueError, match="one entry per layer"):
        merge_schedule(3, [1, 2])
    with pytest.raises(ValueError, match="layer 3"):
        token_schedule(17, [8, 4, 2, 2])  # 17 -> 9 -> 5 -> 3; floor((3 - 1) / 2) = 1 < 2
    with pytest.raises(ValueError, match="layer 1"):
        token_schedule(17, [8, 5])  # 17 -> 9; floor((9 - 1) / 2) = 4 < 5


@pytest.mark.parametrize("n,r,protected", [(68, 30, 4), (67, 20, 3), (20, 8, 2), (12, 3, 5)])
def test_several_protected_tokens_stay_first_and_are_never_matched(n, r, protected):
    """Video frames side by side protect one CLS per frame: brute force with a protected set."""
    g = torch.Generator().manual_seed(n + r + protected)
    metric = torch.randn(2, n, 8, generator=g)
    metric[:, 1] = metric[:, protected]  # a protected B token would be the best match if it could be one
    x = torch.randn(2, n, 3, generator=g)
    merge, unmerge = bipartite_soft_matching(metric, r, protected)
    expected = []
    for m, xs in zip(metric, x, strict=True):
        a_idx = [i for i in range(protected, n) if i % 2 == 0]
        b_idx = [j for j in range(protected, n) if j % 2 == 1]
        best = {}
        for i in a_idx:
            sims = [torch.nn.functional.cosine_similarity(m[i], m[j], dim=0).item() for j in b_idx]
            k = max(range(len(b_idx)), key=sims.__getitem__)
            best[i] = (sims[k], b_idx[k])
        merged = sorted(best, key=lambda i: -best[i][0])[:r]
        groups = {j: [j] for j in b_idx}
        for i in merged:
            groups[best[i][1]].append(i)
        rows = [xs[i] for i in range(protected)] + [xs[i] for i in a_idx if i not in merged]
        rows += [torch.stack([xs[k] for k in groups[j]]).mean(0) for j in b_idx]
        expected.append(torch.stack(rows))
    got = merge(x)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # unmerge puts every token back where it came from (protected ones unchanged)
    back = unmerge(got)
    torch.testing.assert_close(back[:, :protected], x[:, :protected])
    assert back.shape == x.shape
