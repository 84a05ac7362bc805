"""Influence functions: which training examples made a prediction (Koh & Liang 2017)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_int, type_error, value_error
from ..estimators import trace
from ..estimators._results import Result
from ..operators import FisherOperator, GGNOperator, HessianOperator
from ..operators.data import check_data
from . import _setup
from ._setup import FUNC, ProgressBar
from .gradients import PerExampleGradients
from .solvers import SOLVERS, SolveStatus

_MODEL_CURVATURES = {"ggn": GGNOperator, "hessian": HessianOperator, "fisher": FisherOperator}
#: ``damping=None`` is this fraction of the mean eigenvalue ``trace(C) / P`` of the curvature.
DEFAULT_DAMPING_FRACTION = 0.1
#: Products of the Hutch++ trace estimate behind the default damping.
DAMPING_TRACE_MATVECS = 30


@dataclass(frozen=True, eq=False)
class InfluenceTop(Result):
    """The most helpful and most harmful training examples of each test example.

    Attributes:
        helpful_indices: (n_test, k) training indices, largest score first.
        helpful_scores: (n_test, k) their scores (positive: removing them raises the test loss).
        harmful_indices: (n_test, k) training indices, most negative score first.
        harmful_scores: (n_test, k) their scores.
    """

    helpful_indices: torch.Tensor
    helpful_scores: torch.Tensor
    harmful_indices: torch.Tensor
    harmful_scores: torch.Tensor


class InfluenceFunction:
    """Influence of every training example on the loss of test examples.

    With ``C`` the curvature of the MEAN training loss ``L = (1/n) Σ_j ℓ_j``, ``λ`` the damping
    and ``ℓ_j`` the loss of one example (``loss_fn`` on a batch of one), the score of training
    example j on test example i is

        score(i, j) = (1/n) ∇ℓ(z_i)ᵀ (C + λI)⁻¹ ∇ℓ(z_j),

    the predicted change of test example i's loss when j is removed and the model re-fitted,
    keeping the other examples' weight 1/n (Koh & Liang 2017, "Understanding black-box
    predictions via influence functions"). POSITIVE means j helped (removing it raises the test
    loss). For a model trained on the mean loss plus ``λ‖θ‖²/2``, passing that λ as ``damping``
    (with ``curvature="hessian"``) makes the prediction first-order exact. For a sum-reduced
    ``loss_fn`` the curvature is divided by n, so the convention is the same. With class weights
    the per-example loss of a batch of one drops the weight; use reduction="sum" for those. For
    losses averaged over positions (sequences) ``L = (1/n) Σ_j ℓ_j`` holds when every example
    counts the same number of positions (no ignored targets).

    Gradients are taken in eval mode on copies of the parameters; the model is never changed.
    Each test example's gradient is solved once (in chunks of ``max_batch_size``; only the
    solutions are kept), and training gradients are streamed in chunks of at most
    ``max_batch_size`` examples once per test batch and contracted layer by layer, so memory is
    the test batch's solutions plus one chunk, for any n.

    Args:
        model: the trained network.
        loss_fn: ``loss_fn(output, targets) -> scalar``, as for the curvature operators.
        train_data: an iterable of ``(inputs, targets)`` batches (fixed order), or one batch.
            Training index j counts examples in this order.
        curvature: ``"ggn"`` (default), ``"hessian"``, ``"fisher"`` (empirical), ``"kfac"``,
            ``"ekfac"``, ``"diagonal"`` (exact GGN diagonal), ``"identity"`` (gradient
            similarity, the baseline: C = I), or any curvscope operator (of the mean loss) on the
            model's parameters.
        damping: λ >= 0. None: ``0.1 · trace(C) / P`` (exact for the dense and structured
            solvers, else a seeded Hutch++ estimate of 30 products); 0 for ``"identity"``.
        solver: ``"exact"`` (the structured operator's exact ``inverse`` if it has one, else
            the dense matrix from P products), ``"cg"`` (conjugate gradients, every column of a
            block at once), ``"lowrank"`` (top ``rank`` eigenpairs, the rest at 1/λ),
            ``"lissa"`` (Neumann series), or ``"auto"``: ``"exact"`` for structured curvatures
            and up to 4,096 parameters, ``"cg"`` above.
        params: names of the parameters (None: all with requires_grad).
        max_batch_size: examples per chunk of per-example gradients (and per operator batch).
        seed: seed of every random choice (trace probes, Lanczos start vectors).
        progress: show progress bars on stderr.
        rank: eigenpairs for ``solver="lowrank"``.
        tol: relative residual of the iterative solvers (None: 1e-8 in float64, 1e-4 else).
        max_matvecs: iterations per column of "cg" and "lissa" (None: 1000).

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> f = curvscope.InfluenceFunction(model, torch.nn.MSELoss(), data, curvature="hessian",
        ...                                 damping=1.0)
        >>> [round(v, 6) for v in f.self_influence().tolist()]  # g = (2, 0), (0, 8); C = diag(1, 4)
        [1.0, 6.4]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        train_data: Any,
        *,
        curvature: str | Any = "ggn",
        damping: float | None = None,
        solver: str = "auto",
        params: Sequence[str] | None = None,
        max_batch_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        rank: int = 64,
        tol: float | None = None,
        max_matvecs: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise type_error(FUNC, "model", "a torch.nn.Module", model)
        if not callable(loss_fn):
            raise type_error(FUNC, "loss_fn", "a callable loss_fn(output, targets)", loss_fn)
        check_data(train_data, FUNC)
        self._curvature = _setup.check_curvature(curvature)
        self._solver_choice = check_choice(FUNC, "solver", solver, _setup.SOLVER_NAMES)
        damping = _setup.check_options(
            curvature, solver, damping, max_batch_size, seed, progress, rank, tol, max_matvecs
        )
        self._model, self._loss_fn, self._train_data = model, loss_fn, train_data
        self._damping_given, self._seed, self._bars = damping, seed, ProgressBar(progress)
        self._max_batch_size, self._params = max_batch_size, params
        self._op = self._operator_now()
        names = self._names()
        self._gradients = PerExampleGradients(
            model, loss_fn, names, max_batch_size=max_batch_size, func=FUNC
        )
        self._size = sum(dict(model.named_parameters())[n].numel() for n in names)
        eps_tol = 1e-8 if self._gradients.dtype == torch.float64 else 1e-4
        self._options = {
            "rank": rank,
            "seed": seed,
            "tol": eps_tol if tol is None else tol,
            "max_matvecs": 1000 if max_matvecs is None else max_matvecs,
        }
        self._solver_name = _setup.resolve_solver(solver, self._curvature, self._op, self._size)
        self._solver: Any = None
        self._num_train: int | None = None
        self._trace_matvecs = 0
        self.solver_status: SolveStatus | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _operator_now(self) -> Any:
        """The curvature operator when it is cheap to build now (None: identity or later)."""
        curvature = self._curvature
        if not isinstance(curvature, str):
            return curvature
        if curvature in _MODEL_CURVATURES:
            return _MODEL_CURVATURES[curvature](
                self._model,
                self._loss_fn,
                self._train_data,
                params=self._params,
                max_batch_size=self._max_batch_size,
            )
        return None

    def _names(self) -> list[str]:
        if self._op is not None and not isinstance(self._curvature, str):
            return _setup.operator_names(self._model, self._op, self._params)
        if self._op is not None:
            return list(self._op.param_names)
        return _setup.select_params(self._model, self._params)

    def _prepare(self) -> None:
        """Build the structured operator, the solver and the damping (first use only)."""
        if self._solver is not None:
            return
        if self._op is None and self._curvature in _setup.STRUCTURED:
            cls = _setup.STRUCTURED[self._curvature]
            self._op = cls(
                self._model,
                self._loss_fn,
                self._train_data,
                params=self._params,
                max_batch_size=self._max_batch_size,
                seed=self._seed,
            )
            if self._solver_choice == "auto":
                self._solver_name = "exact"
            self._gradients.names = _setup.same_names(self._op, self._gradients.names)
        n = self.num_train
        scale = float(n) if getattr(self._op, "reduction", "mean") == "sum" else 1.0
        solver = SOLVERS[self._solver_name](self._op, scale, 0.0, self._options)
        with self._bars.task(f"influence: {self._solver_name} set-up", 1) as advance:
            solver.setup_curvature()
            solver.set_damping(self._resolve_damping(solver, scale))
            advance()
        self._solver = solver

    def _resolve_damping(self, solver: Any, scale: float) -> float:
        if self._damping_given is not None:
            return self._damping_given
        if self._solver_name == "identity":
            return 0.0
        mean = solver.mean_eigenvalue()
        if mean is None:
            estimate = trace(
                self._op, method="hutch++", num_matvecs=DAMPING_TRACE_MATVECS, seed=self._seed
            )
            self._trace_matvecs += estimate.num_matvecs
            mean = estimate.value / scale / self._size
        damping = DEFAULT_DAMPING_FRACTION * abs(mean)
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(
                f"curvscope.{FUNC}(damping=None): the curvature's mean eigenvalue is {mean}, so "
                "no default damping relative to its scale exists. Pass damping=... explicitly."
            )
        return damping

    # -- public ------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        """λ, the damping used (the documented default when ``damping=None``)."""
        self._prepare()
        return self._solver.damping

    @property
    def solver(self) -> str:
        """The solver used: "exact", "cg", "lowrank", "lissa" or "identity"."""
        return self._solver_name

    @property
    def curvature(self) -> str:
        """The curvature's name (the operator's class name when an operator was passed)."""
        if isinstance(self._curvature, str):
            return self._curvature
        return type(self._curvature).__name__

    @property
    def operator(self) -> Any:
        """The curvature operator (None for "identity")."""
        self._prepare()
        return self._op

    @property
    def param_names(self) -> list[str]:
        """The parameters the gradients and curvature are taken with respect to, in order."""
        return list(self._gradients.names)

    @property
    def num_params(self) -> int:
        """P, their total number of entries."""
        return self._size

    @property
    def num_train(self) -> int:
        """n, the number of training examples."""
        if self._num_train is None:
            self._num_train = self._gradients.count(self._train_data)
            if self._num_train == 0:
                raise value_error(FUNC, "train_data", "at least one example", self._train_data)
        return self._num_train

    @property
    def num_matvecs(self) -> int:
        """Curvature products used so far (set-up, default damping and solves)."""
        used = self._solver.num_matvecs if self._solver is not None else 0
        return used + self._trace_matvecs

    def scores(self, test_data: Any) -> torch.Tensor:
        """Influence scores, (n_test, n_train): entry (i, j) as in the class docstring.

        Args:
            test_data: ``(inputs, targets)`` batches like the training data, or one batch.

        Returns:
            A tensor (n_test, n_train) in the model's dtype. ``solver_status`` then says how the
            inverse side was solved (a warning is raised when a solve did not converge).
        """
        self._prepare()
        n, rows, statuses = self.num_train, [], []
        for solutions in self._solved_test_batches(test_data, statuses):
            width = sum(solution.shape[1] for solution in solutions)
            row = solutions[0].new_empty(width, n)
            with self._bars.task("influence: training gradients", n) as advance:
                for offset, parts in self._train_chunks(flat=False):
                    count, column = parts[0].shape[0], 0
                    for solution in solutions:
                        block = _contract(parts, solution)  # (count, b_k)
                        row[column : column + block.shape[1], offset : offset + count] = block.T
                        column += block.shape[1]
                    del parts  # free before the next chunk is computed
                    advance(count)
            row /= n
            rows.append(row)
            del solutions
        self._record(statuses)
        if not rows:
            raise value_error(FUNC + ".scores", "test_data", "at least one example", test_data)
        return torch.cat(rows)

    def self_influence(self) -> torch.Tensor:
        """(n_train,): ``(1/n) ∇ℓ(z_j)ᵀ (C + λI)⁻¹ ∇ℓ(z_j)``, the usual mislabel score."""
        self._prepare()
        n, values, statuses = self.num_train, [], []
        with self._bars.task("influence: self-influence", n) as advance:
            for _, train_gradients in self._train_chunks():
                solution, status = self._solver(train_gradients.T)
                statuses.append(status)
                values.append((train_gradients.T * solution).sum(0) / n)
                advance(train_gradients.shape[0])
                del train_gradients, solution  # free before the next chunk is computed
        self._record(statuses)
        return torch.cat(values)

    def top(self, test_data: Any, k: int = 10) -> InfluenceTop:
        """The ``k`` most helpful and ``k`` most harmful training examples per test example."""
        check_int(FUNC + ".top", "k", k, minimum=1)
        if k > self.num_train:
            raise value_error(
                FUNC + ".top", "k", f"an integer <= n_train = {self.num_train}", k, "Ask for fewer."
            )
        scores = self.scores(test_data)
        helpful = torch.topk(scores, k, dim=1, largest=True, sorted=True)
        harmful = torch.topk(scores, k, dim=1, largest=False, sorted=True)
        return InfluenceTop(helpful.indices, helpful.values, harmful.indices, harmful.values)

    # -- streaming ---------------------------------------------------------------------------
    def _train_chunks(self, flat: bool = True) -> Iterator[tuple[int, Any]]:
        for _, offset, gradients in self._gradients.stream(
            self._train_data, "train_data", flat=flat
        ):
            yield offset, gradients
            del gradients

    def _solved_test_batches(
        self, test_data: Any, statuses: list[SolveStatus]
    ) -> Iterator[list[torch.Tensor]]:
        """``(C + λI)⁻¹`` applied to the per-example gradients of each batch of ``test_data``:
        one (P, b_k) solution per chunk of ``max_batch_size`` examples, the gradients freed as
        soon as they are solved (only the solutions of a batch are held at once)."""
        current, solutions = None, []
        for index, _, gradients in self._gradients.stream(test_data, "test_data"):
            if current is not None and index != current:
                yield solutions
                solutions = []
            current = index
            solution, status = self._solver(gradients.T)
            del gradients
            statuses.append(status)
            solutions.append(solution)
        if solutions:
            yield solutions

    def _record(self, statuses: list[SolveStatus]) -> None:
        if not statuses:
            return
        residuals = [s.max_relative_residual for s in statuses]
        known = [r for r in residuals if r is not None]
        worst = next((s.status for s in statuses if s.status == "not positive definite"), None)
        worst = worst or next((s.status for s in statuses if s.status == "not converged"), None)
        status = SolveStatus(
            solver=statuses[0].solver,
            num_columns=sum(s.num_columns for s in statuses),
            num_converged=sum(s.num_converged for s in statuses),
            max_relative_residual=max(known) if known else None,
            num_matvecs=sum(s.num_matvecs for s in statuses),
            status=worst or statuses[0].status,
        )
        self.solver_status = status
        if worst == "not positive definite":
            warnings.warn(
                f"curvscope.{FUNC}: the curvature plus damping ({self.damping:.3g}) is not "
                "positive definite: the scores are not those of a minimum. Raise damping, or use "
                "curvature='ggn' or 'fisher' (positive semi-definite).",
                RuntimeWarning,
                stacklevel=3,
            )
        elif worst is not None:
            warnings.warn(
                f"curvscope.{FUNC}: solver {status.solver!r}: {status.status} "
                f"({status.num_converged} of {status.num_columns} solves met tol, largest "
                f"relative residual {status.max_relative_residual:.3g}). Raise damping or "
                "max_matvecs, or use solver='exact'.",
                RuntimeWarning,
                stacklevel=3,
            )


def _contract(parts: list[torch.Tensor], solution: torch.Tensor) -> torch.Tensor:
    """``G @ solution`` for ``G`` given as its column blocks (one per parameter), layer by layer:
    the (count, P) matrix of training gradients is never formed."""
    start = parts[0].shape[1]
    total = parts[0] @ solution[:start]
    for part in parts[1:]:
        stop = start + part.shape[1]
        total.addmm_(part, solution[start:stop])
        start = stop
    return total
