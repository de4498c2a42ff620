"""Float64 references of the Kronecker-factored optimizers, one parameter (and block) at a time with
plain loops, written from the papers and independent of metalcore.optim: SOAP (Vyas et al.,
arXiv:2409.11321, and its reference code) and Shampoo (Gupta et al., arXiv:1802.09568; distributed
Shampoo, arXiv:2309.06497). Used by tests/optim and bench/scripts/second_order_check.py."""

import itertools
import math

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


class ReferenceSOAP:
    """One parameter at a time, float64, loops over dimensions; the first bases are taken from the
    optimizer under test (see ``first``)."""

    def __init__(self, p, cfg):
        self.p, self.cfg, self.t = p.detach().to("cpu", torch.float64, copy=True), cfg, 0
        shape = list(p.shape) or [1]
        if cfg.get("merge_dims", False) and p.ndim > 1:
            shape = merge(shape, cfg["max_precond_dim"])
        self.shape = shape
        one_d = p.ndim <= 1 and not cfg.get("precondition_1d", False)
        self.axes = [] if one_d else [a for a, d in enumerate(shape) if d <= cfg["max_precond_dim"]]
        self.m = torch.zeros(shape, dtype=torch.float64)
        self.v = torch.zeros(shape, dtype=torch.float64)
        self.GG = {a: torch.zeros(shape[a], shape[a], dtype=torch.float64) for a in self.axes}
        self.Q = None

    def first(self, g, bases):
        """The first call: Gram matrices, then bases. A first Gram matrix has rank ≤ the product of
        the other dimensions, so its null space has no preferred basis: the reference adopts the
        optimizer's bases after checking that they diagonalize GG with descending eigenvalues."""
        G = g.double().reshape(self.shape)
        bs = self.cfg["betas"][1] if self.cfg.get("shampoo_beta") is None else self.cfg["shampoo_beta"]
        self.Q = {}
        for a in self.axes:
            self.GG[a] = self.GG[a] + (1 - bs) * (unfold(G, a) @ unfold(G, a).T - self.GG[a])
            Q = bases[a].to("cpu", torch.float64, copy=True)
            D = Q.T @ self.GG[a] @ Q
            scale = self.GG[a].abs().max().clamp_min(1e-300)
            assert (D - torch.diag(D.diagonal())).abs().max() <= 1e-5 * scale
            assert (D.diagonal()[1:] <= D.diagonal()[:-1] + 1e-5 * scale).all()
            self.Q[a] = Q

    def step(self, g):
        c = self.cfg
        beta1, beta2 = c["betas"]
        bs = beta2 if c.get("shampoo_beta") is None else c["shampoo_beta"]
        G = g.double().reshape(self.shape)
        self.t += 1
        gp = G
        for a in self.axes:
            gp = mode(gp, self.Q[a].T, a)
        self.m = beta1 * self.m + (1 - beta1) * gp
        self.v = beta2 * self.v + (1 - beta2) * gp * gp
        N = self.m / (self.v.sqrt() + c["eps"])
        for a in self.axes:
            N = mode(N, self.Q[a], a)
        if c.get("normalize_grads", False):
            N = N / (N.square().mean().sqrt() + 1e-30)
        step_size = c["lr"]
        if c.get("correct_bias", True):
            step_size = step_size * math.sqrt(1 - beta2**self.t) / (1 - beta1**self.t)
        p = self.p - step_size * N.reshape(self.p.shape)
        self.p = p * (1 - c["lr"] * c["weight_decay"])
        for a in self.axes:
            self.GG[a] = self.GG[a] + (1 - bs) * (unfold(G, a) @ unfold(G, a).T - self.GG[a])
        if self.axes and self.t % c["precondition_frequency"] == 0:
            m = self.m
            for a in self.axes:
                m = mode(m, self.Q[a], a)
            for a in self.axes:
                Q = self.Q[a]
                order = torch.argsort(torch.diag(Q.T @ self.GG[a] @ Q), descending=True)
                self.v = self.v.index_select(a, order)
                self.Q[a], _ = torch.linalg.qr(self.GG[a] @ Q[:, order])
            for a in self.axes:
                m = mode(m, self.Q[a].T, a)
            self.m = m


class ReferenceShampoo:
    """One parameter at a time, float64: a loop over its blocks (slices of at most B per dimension)
    and, inside, over the block's dimensions."""

    def __init__(self, p, cfg):
        self.p, self.cfg, self.t = p.detach().to("cpu", torch.float64, copy=True), cfg, 0
        B = cfg["max_preconditioner_dim"]
        shape = list(p.shape) or [1]
        self.shape = merge(shape, B) if cfg["merge_dims"] else shape
        ranges = [[slice(s, min(s + B, d)) for s in range(0, d, B)] for d in self.shape]
        self.blocks = list(itertools.product(*ranges))
        self.F = [[torch.zeros(s.stop - s.start, s.stop - s.start, dtype=torch.float64) for s in b]
                  for b in self.blocks]
        self.R = [[torch.zeros_like(f) for f in fs] for fs in self.F]
        self.m = torch.zeros(self.shape, dtype=torch.float64)
        self.v = torch.zeros(self.shape, dtype=torch.float64)

    def step(self, g):
        c = self.cfg
        beta1, beta2 = c["betas"]
        start = c["start_preconditioning_step"] or c["precondition_frequency"]
        t = self.t = self.t + 1
        G = g.double().reshape(self.shape)
        for n, b in enumerate(self.blocks):
            for a in range(len(b)):
                U = unfold(G[b], a)
                self.F[n][a] = self.F[n][a] + U @ U.T if beta2 == 1 else beta2 * self.F[n][a] + (1 - beta2) * U @ U.T
        m_hat = G
        if beta1 > 0:
            self.m = beta1 * self.m + (1 - beta1) * G
            m_hat = self.m / (1 - beta1**t) if c["use_bias_correction"] else self.m
        D = m_hat
        if c["grafting"] == "adam":
            b2 = c["grafting_beta2"]
            self.v = b2 * self.v + (1 - b2) * G * G
            v_hat = self.v / (1 - b2**t) if c["use_bias_correction"] else self.v
            D = m_hat / (v_hat.sqrt() + c["grafting_epsilon"])
        if t == start or (t > start and t % c["precondition_frequency"] == 0):
            corr = 1 - beta2**t if c["use_bias_correction"] and beta2 < 1 else 1.0
            for n, b in enumerate(self.blocks):
                for a in range(len(b)):
                    L, Q = torch.linalg.eigh(self.F[n][a] / corr)
                    self.R[n][a] = Q @ torch.diag((L.clamp_min(0) + c["epsilon"]) ** (-1 / (2 * len(b)))) @ Q.T
        if t >= start:
            update = torch.empty_like(G)
            for n, b in enumerate(self.blocks):
                P = m_hat[b]
                for a in range(len(b)):
                    P = mode(P, self.R[n][a], a)
                if c["grafting"] is not None:
                    P = P * D[b].norm() / (P.norm() + 1e-16)
                update[b] = P
        else:
            update = D if c["grafting"] is not None else m_hat
        self.p = self.p * (1 - c["lr"] * c["weight_decay"]) - c["lr"] * update.reshape(self.p.shape)

    def blocks_as_state(self, which):
        """The per-block matrices in the optimizer's state layout: for each region (blocks of one
        shape: full or remainder along each dimension) and dimension, a stack in row-major block order."""
        B = self.cfg["max_preconditioner_dim"]
        segments = [[seg for seg in ("full", "rest") if (seg == "full" and d >= B) or (seg == "rest" and d % B)]
                    for d in self.shape]
        out = []
        for region in itertools.product(*segments):
            members = [n for n, b in enumerate(self.blocks)
                       if all(("full" if s.stop - s.start == B else "rest") == r for s, r in zip(b, region))]
            for a in range(len(region)):
                out.append(torch.stack([which[n][a] for n in members]))
        return out
