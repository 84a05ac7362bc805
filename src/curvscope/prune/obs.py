"""Greedy Optimal Brain Surgeon over independent groups of weights, each with its own inverse.

For a quadratic model ½ δwᵀ C δw of the loss around the weights w, removing weight q (setting
w_q to 0) at least cost gives the saliency and the compensating update (Hassibi & Stork, 1993,
"Second order derivatives for network pruning: Optimal Brain Surgeon")

    ρ_q = w_q² / (2 [C⁻¹]_qq),    δw = −(w_q / [C⁻¹]_qq) C⁻¹ e_q,

and the inverse of C restricted to the remaining weights is the downdate
C⁻¹ − C⁻¹ e_q e_qᵀ C⁻¹ / [C⁻¹]_qq. Removing a set S jointly costs ½ w_Sᵀ ([C⁻¹]_SS)⁻¹ w_S with
δw = −C⁻¹_{:,S} ([C⁻¹]_SS)⁻¹ w_S. The same engine serves ``"obs"`` (one group per layer, or
blocks of a large layer, as in WoodFisher, Singh & Alistarh 2020) and ``"layer_obs"`` (one group
per output row sharing H = 2 X Xᵀ, as in Optimal Brain Compression, Frantar & Alistarh 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: Groups whose inverses hold more entries than this remove weights in small blocks at a time.
_SINGLE_STEP_ENTRIES = 2**20
_BLOCK = 8


def relative_damping(matrix: torch.Tensor, damping: float) -> float:
    """λ = damping · |mean(diag C)| for a (d, d) matrix."""
    return damping * abs(float(matrix.diagonal().mean()))


def damped_inverse(matrix: torch.Tensor, lam: float) -> tuple[torch.Tensor, float, bool]:
    """(C + λ I)⁻¹ for a batch of symmetric (…, d, d) matrices.

    When C + λ I is not positive definite (an indefinite Hessian, or damping 0 on a singular
    matrix) λ is raised tenfold (from at least 1e-10 of the mean absolute diagonal) until the
    Cholesky factorisation succeeds. Returns (inverse, the largest λ used, whether it was raised).
    """
    matrix = (matrix + matrix.transpose(-1, -2)) / 2
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1).clamp_min(1e-300)
    lam = torch.full_like(scale, lam)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    raised = False
    for _ in range(40):
        factor, info = torch.linalg.cholesky_ex(matrix + lam[..., None, None] * eye)
        if not bool((info != 0).any()):
            return torch.cholesky_inverse(factor), float(lam.max()), raised
        bad = info != 0
        lam = torch.where(bad, torch.maximum(lam * 10, 1e-10 * scale), lam)
        raised = True
    raise ValueError(
        "curvscope.prune: the curvature block stays singular under any damping; it is not finite."
    )


class GreedyOBS:
    """Greedy OBS on ``weights`` (G, d) with inverses ``inverse`` (G, d, d) of independent groups.

    ``blocked`` (G, d) marks weights that may never be removed (padding). With ``n_of_m``, every
    m consecutive weights of a group lose exactly n (the rest of an m-block is locked once n of
    it are gone). ``saliency`` holds the current costs (inf for removed or locked weights).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        inverse: torch.Tensor,
        blocked: torch.Tensor | None = None,
        n_of_m: tuple[int, int] | None = None,
    ) -> None:
        self.w = weights.clone()
        self.hinv = inverse.clone()
        groups, size = self.w.shape
        # one group: the inverse is shrunk to the weights still present now and then, so later
        # downdates cost less (``active``: the positions its rows and columns stand for)
        self.active = torch.arange(size, device=self.w.device)
        self.removed = torch.zeros_like(self.w, dtype=torch.bool)
        self.blocked = torch.zeros_like(self.removed) if blocked is None else blocked.clone()
        self.n_of_m = n_of_m
        if n_of_m is not None:
            blocks = size // n_of_m[1]
            self.counts = torch.zeros(groups, blocks, dtype=int, device=self.w.device)
        self.broken = 0
        self.block = 1 if groups * size * size <= _SINGLE_STEP_ENTRIES else _BLOCK
        self.saliency = torch.empty_like(self.w)
        for group in range(groups):
            self._refresh(group)
        self.initial_saliency = self.saliency.clone()

    def _diagonal(self, group: int) -> torch.Tensor:
        diag = torch.zeros_like(self.w[group])
        diag[self.active] = self.hinv[group].diagonal()
        return diag

    def _refresh(self, group: int) -> None:
        diag = self._diagonal(group)
        value = self.w[group] ** 2 / (2 * diag.clamp_min(1e-300))
        value[(diag <= 0) | self.removed[group] | self.blocked[group]] = math.inf
        self.saliency[group] = value
        self._best: tuple[float, int] | None = None

    def _compact(self) -> None:
        """Drop the rows and columns of removed weights from a single group's inverse."""
        present = ~self.removed[0, self.active]
        if self.w.shape[0] != 1 or len(self.active) < 256 or present.sum() > 0.8 * len(present):
            return
        keep = torch.nonzero(present).reshape(-1)
        self.hinv = self.hinv[:, keep][:, :, keep].contiguous()
        self.active = self.active[keep]

    def best(self) -> tuple[float, int]:
        """(lowest saliency, its group) among the weights still removable."""
        if self._best is None:
            flat = int(torch.argmin(self.saliency))
            self._best = (float(self.saliency.view(-1)[flat]), flat // self.w.shape[1])
        return self._best

    def remove(self, budget: int) -> int:
        """Remove up to ``min(budget, block)`` weights of the best group; returns how many."""
        value, group = self.best()
        if math.isinf(value):
            return self._remove_by_magnitude(budget)
        order = torch.argsort(self.saliency[group], stable=True).tolist()
        chosen = self._admissible(group, order, min(budget, self.block))
        self._remove_set(group, chosen)
        return len(chosen)

    def _admissible(self, group: int, order: list[int], count: int) -> list[int]:
        chosen: list[int] = []
        extra: dict[int, int] = {}
        for index in order:
            if len(chosen) == count or math.isinf(float(self.saliency[group, index])):
                break
            if self.n_of_m is not None:
                n, m = self.n_of_m
                block = index // m
                if int(self.counts[group, block]) + extra.get(block, 0) >= n:
                    continue
                extra[block] = extra.get(block, 0) + 1
            chosen.append(index)
        return chosen

    def _local(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the (possibly shrunk) inverse for weight positions ``index``."""
        if len(self.active) == self.w.shape[1]:
            return index
        return torch.searchsorted(self.active, index)

    def _remove_set(self, group: int, chosen: list[int]) -> None:
        index = torch.tensor(chosen, device=self.w.device)
        local = self._local(index)
        hinv, w = self.hinv[group], self.w[group]
        columns = hinv[:, local]
        inner = columns[local]
        try:
            shift = torch.linalg.solve(inner, w[index])
            w[self.active] -= columns @ shift
            hinv.addmm_(columns, torch.linalg.solve(inner, columns.T), alpha=-1.0)
        except RuntimeError:  # a singular block: drop the weights without an update
            self.broken += len(chosen)
        self._mark(group, index)

    def _mark(self, group: int, index: torch.Tensor) -> None:
        local = self._local(index)
        self.w[group, index] = 0.0
        self.hinv[group, local, :] = 0.0
        self.hinv[group, :, local] = 0.0
        self.removed[group, index] = True
        if self.n_of_m is not None:
            n, m = self.n_of_m
            for block in (index // m).tolist():
                self.counts[group, block] += 1
            full = (self.counts[group] >= n).repeat_interleave(m)
            self.blocked[group] |= full & ~self.removed[group]
        self._compact()
        self._refresh(group)

    def _remove_by_magnitude(self, budget: int) -> int:
        """The inverse broke down for every candidate: remove the smallest |w| left, no update."""
        free = ~(self.removed | self.blocked)
        if not bool(free.any()):
            return 0
        score = torch.where(free, self.w.abs(), torch.full_like(self.w, math.inf))
        flat = int(torch.argmin(score))
        group, index = divmod(flat, self.w.shape[1])
        self.broken += 1
        self._mark(group, torch.tensor([index], device=self.w.device))
        return 1


def run_greedy(
    engines: list[GreedyOBS], counts: list[int] | int, tick: Callable[[int], None]
) -> None:
    """Remove ``counts[i]`` weights from engine i (scope "layer"), or ``counts`` weights in all
    from whichever engine holds the lowest saliency at each step (scope "global")."""
    if isinstance(counts, list):
        for engine, count in zip(engines, counts, strict=True):
            left = count
            while left > 0:
                done = engine.remove(left)
                if done == 0:
                    break
                left -= done
                tick(done)
        return
    left = counts
    while left > 0 and engines:
        engine = min(engines, key=lambda e: e.best()[0])
        if math.isinf(engine.best()[0]):  # every candidate broke down: fall back to magnitude
            free = [e for e in engines if bool((~(e.removed | e.blocked)).any())]
            if not free:
                break
            engine = min(free, key=lambda e: float(e.w[~(e.removed | e.blocked)].abs().min()))
        done = engine.remove(1 if len(engines) > 1 else left)
        if done == 0:
            break
        left -= done
        tick(done)


def joint_removal(
    weights: torch.Tensor, inverse: torch.Tensor, remove: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Remove the flat indices ``remove`` of ``weights`` (d,) at once with the OBS update
    δw = −C⁻¹_{:,S} ([C⁻¹]_SS)⁻¹ w_S; returns (new weights, whether the update was applied)."""
    w = weights.clone()
    if remove.numel() == 0:
        return w, True
    columns = inverse[:, remove]
    try:
        w -= columns @ torch.linalg.solve(columns[remove], w[remove])
        applied = True
    except RuntimeError:
        applied = False
    w[remove] = 0.0
    return w, applied


def row_saliency(weights: torch.Tensor, inverse: torch.Tensor, rows: int) -> torch.Tensor:
    """½ w_rᵀ ([C⁻¹]_rr)⁻¹ w_r for every output row r of a layer flattened row-major:
    ``weights`` (rows·cols,), ``inverse`` (rows·cols, rows·cols); returns (rows,)."""
    cols = weights.numel() // rows
    blocks = inverse.view(rows, cols, rows, cols).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    w = weights.view(rows, cols)
    return 0.5 * (w * torch.linalg.solve(blocks, w.unsqueeze(-1)).squeeze(-1)).sum(dim=1)
