"""Plain helpers for the float64 references of the Kronecker-factored optimizers (SOAP, Shampoo),
written from the papers and independent of metalcore.optim._preconditioner."""

import torch


def merge(shape, max_dim):
    """The reference code's merge_dims: grow the current dimension while the product stays ≤ max_dim."""
    out, cur = [], 1
    for d in shape:
        if cur * d > max_dim and cur > 1:
            out.append(cur)
            cur = d
        elif cur * d > max_dim:
            out.append(d)
        else:
            cur *= d
    if cur > 1 or not out:
        out.append(cur)
    return out


def mode(X, M, a):
    """X ×_a M: M applied to every fibre of X along dimension a."""
    return torch.movedim(torch.tensordot(M, X, dims=([1], [a])), 0, a)


def unfold(X, a):
    """The mode-a unfolding: dimension a as rows, every other dimension flattened into columns."""
    return torch.movedim(X, a, 0).reshape(X.shape[a], -1)
