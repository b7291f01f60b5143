"""Comparison of a top-p selection with the reference that tolerates only float-rounding ties.

Implementations that sum in different orders may disagree on a token whose inclusion moves the
kept mass by less than the float rounding of the target (docs/design.md#topp_select). Everything else must match.
"""

import torch

import sparse_attn.reference as ref

# float32 rounding of the target p * total
TARGET_RTOL = 2.0**-23


def kept_sets(indices, counts):
    return [set(indices[r, : counts[r]].tolist()) for r in range(len(counts))]


def assert_selection_equivalent(indices, counts, scores, p, **kw):
    """indices/counts from the op (any device) vs the reference on the same inputs."""
    indices, counts, scores = indices.cpu(), counts.cpu(), scores.cpu()
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    p = p.cpu() if isinstance(p, torch.Tensor) else p
    ref_idx, ref_cnt = ref.topp_select(scores, p, **kw)
    R, L = scores.shape
    assert indices.shape == (R, L) and indices.dtype == torch.int32
    assert counts.shape == (R,) and counts.dtype == torch.int32
    for r in range(R):
        n = int(counts[r])
        row = indices[r]
        assert (row[n:] == -1).all(), f"row {r}: entries past counts must be -1"
        assert n < 2 or (row[1:n] > row[: n - 1]).all(), (
            f"row {r}: kept indices must be strictly ascending"
        )
    if torch.equal(indices, ref_idx) and torch.equal(counts, ref_cnt):
        return
    valid = kw.get("valid_mask")
    valid = torch.ones(R, L, dtype=torch.bool) if valid is None else valid
    forced = ref.forced_positions(
        valid, kw.get("keep_first", 0), kw.get("keep_last", 0), kw.get("candidate_mask")
    )
    p_rows = torch.as_tensor(p, dtype=torch.float32).expand(R).double()
    s = torch.where(valid, scores.double(), 0.0)
    for r, (ours, theirs) in enumerate(
        zip(kept_sets(indices, counts), kept_sets(ref_idx, ref_cnt))
    ):
        if ours == theirs:
            continue
        target = float(p_rows[r] * s[r].sum())
        assert set(forced[r].nonzero().flatten().tolist()) <= ours, (
            f"row {r}: a forced token was dropped"
        )
        # The candidates in greedy order; both sets must be forced + a prefix of it.
        cand = (valid[r] & ~forced[r]).nonzero().flatten()
        order = cand[torch.sort(s[r, cand], descending=True, stable=True).indices].tolist()
        forced_mass = float(s[r, forced[r]].sum())
        prefix_mass = [forced_mass]
        for j in order:
            prefix_mass.append(prefix_mass[-1] + float(s[r, j]))
        n_ours, n_ref = len(ours) - int(forced[r].sum()), len(theirs) - int(forced[r].sum())
        assert ours == set(forced[r].nonzero().flatten().tolist()) | set(order[:n_ours]), (
            f"row {r}: kept set is not the forced tokens plus a greedy prefix"
        )
        lo, hi = sorted((n_ours, n_ref))
        tol = TARGET_RTOL * max(target, 1e-30)
        for n in range(lo, hi):  # each disputed token: is the smaller set within rounding?
            assert abs(prefix_mass[n] - target) <= tol, (
                f"row {r}: selections differ by more than float rounding of the target "
                f"(ours {n_ours}, reference {n_ref} candidates, target {target}, "
                f"mass of the first {n}: {prefix_mass[n]})"
            )
