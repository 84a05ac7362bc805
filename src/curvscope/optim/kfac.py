"""A KFAC preconditioner for ordinary torch.optim loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_float, check_int, type_error, value_error
from .._random import make_generator
from ..operators.losses import resolve_loss
from ._common import check_loss_fn, check_model
from ._kfac_factors import batch_factors, find_layers

_FUNC = "optim.KFACPreconditioner"
_FISHERS = ("monte_carlo", "empirical", "ggn")


class KFACPreconditioner:
    """Replaces gradients by KFAC-preconditioned ones: ``g ← (K + λI)⁻¹ g`` per layer.

    Use it between the backward pass and the optimiser's step::

        loss_fn(model(x), y).backward()
        precond.step((x, y))
        optimizer.step()

    Every ``update_every`` calls (the first included), ``step(batch)`` runs its own forward and
    backward pass on ``batch`` to refresh the Kronecker factors ``A`` (layer inputs) and ``G``
    (output gradients) of each supported layer, as an exponential moving average
    ``F ← factor_decay · F + (1 − factor_decay) · F_batch`` (the first refresh sets them). Its
    own pass, in eval mode, back-propagates what ``fisher`` says, from the labels it says:
    ``"monte_carlo"`` labels drawn from the model (the true Fisher in expectation),
    ``"empirical"`` the true labels, ``"ggn"`` a square root of the loss Hessian (exact type-2);
    the user's backward pass only supplies the gradient to precondition. The factors follow
    ``KFACOperator``'s conventions (weight and bias share one factorisation with the input
    augmented by 1; ``A = E[ā āᵀ]``, ``G`` on the scale of the loss as ``loss_fn`` reduces it,
    the mean for the usual losses), so ``K = G ⊗ A`` per layer (Martens & Grosse, 2015).

    Each call then replaces the ``.grad`` of every supported parameter with the exact damped
    solve ``(G ⊗ A + λI)⁻¹ g``, through the eigendecompositions ``A = Q_A Λ_A Q_Aᵀ``,
    ``G = Q_G Λ_G Q_Gᵀ``: ``Q_G [(Q_Gᵀ M Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ`` for the layer's
    gradient matrix ``M = [∇W | ∇b]`` (not the heuristic that splits λ between the factors).

    Supported: Linear, Conv1d and Conv2d (groups=1, zero padding). Other trainable parameters
    (and tied ones) keep their gradients; they are listed once in a warning. It never changes
    the parameters; sampling uses its own generator, never the global RNG.

    Args:
        model: the network.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (any loss for ``"empirical"``).
        damping: λ >= 0 added to each layer's block.
        factor_decay: the moving average's decay, in [0, 1).
        update_every: refresh the factors every this many calls.
        fisher: ``"monte_carlo"``, ``"empirical"`` or ``"ggn"``.
        seed: seed of the label sampling (``"monte_carlo"``).

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> x, y = torch.tensor([[2.0]]).double(), torch.zeros(1, 1).double()
        >>> precond = curvscope.optim.KFACPreconditioner(
        ...     model, torch.nn.MSELoss(), damping=0.0, fisher="ggn")
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> g = model.weight.grad.clone()
        >>> precond.step((x, y))  # K = 2 · 2² = 8: the exact Newton step of this quadratic
        >>> torch.allclose(model.weight.grad, g / 8)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        update_every: int = 10,
        fisher: str = "monte_carlo",
        seed: int = 0,
    ) -> None:
        self._model = check_model(_FUNC, model)
        self._loss_fn = check_loss_fn(_FUNC, loss_fn)
        self._damping = check_float(_FUNC, "damping", damping, minimum=0.0)
        self._decay = check_float(_FUNC, "factor_decay", factor_decay, minimum=0.0, maximum=1.0)
        if self._decay == 1.0:
            raise value_error(
                _FUNC, "factor_decay", "a number in [0, 1)", factor_decay, "1 never updates."
            )
        self._update_every = check_int(_FUNC, "update_every", update_every, minimum=1)
        self._fisher = check_choice(_FUNC, "fisher", fisher, _FISHERS)
        self._seed = check_int(_FUNC, "seed", seed, minimum=0)
        self._spec = resolve_loss(loss_fn, None, _FUNC)
        if fisher != "empirical" and not self._spec.samplable:
            raise value_error(
                _FUNC,
                "loss_fn",
                f"nn.CrossEntropyLoss (no class weights or label smoothing) or nn.MSELoss for "
                f"fisher={fisher!r}",
                loss_fn,
                "Use fisher='empirical' for other losses.",
            )
        self._layers, others = find_layers(model)
        named = dict(model.named_parameters())
        self._params = [
            (layer, named.get(layer.weight), named.get(layer.bias)) for layer in self._layers
        ]
        if others:
            why = "belong to modules KFAC does not support"
            warnings.warn(_untouched(others, why), stacklevel=2)
        self._generator = make_generator(seed)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._eigen: dict[str, tuple[torch.Tensor, ...]] = {}
        self._num_steps = 0
        self._num_updates = 0

    @property
    def layers(self) -> list[str]:
        """Names of the modules whose gradients are preconditioned."""
        return [layer.name for layer in self._layers]

    @property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module name, its current factors ``(A, G)`` (moving averages)."""
        return {name: (a.clone(), g.clone()) for name, (a, g) in self._factors.items()}

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def num_updates(self) -> int:
        """Factor refreshes so far."""
        return self._num_updates

    def step(self, batch: Any) -> None:
        """Refresh the factors if due, then precondition the gradients in place (see above)."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise type_error(
                f"{_FUNC}.step", "batch", "an (inputs, targets) pair", batch, "Pass (x, y)."
            )
        if self._num_steps % self._update_every == 0:
            self._refresh(tuple(batch))
        self._precondition()
        self._num_steps += 1

    def _refresh(self, batch: tuple[Any, Any]) -> None:
        new, miscalled = batch_factors(
            self._model,
            self._loss_fn,
            self._spec,
            batch,
            self._layers,
            self._fisher,
            self._generator,
        )
        if miscalled:
            names = [n for layer in self._layers if layer.name in miscalled for n in layer.names()]
            why = "belong to modules not called exactly once"
            warnings.warn(_untouched(names, why), stacklevel=3)
            self._layers = [layer for layer in self._layers if layer.name not in miscalled]
            self._params = [entry for entry in self._params if entry[0].name not in miscalled]
        for name, (a, g) in new.items():
            if name in self._factors:
                old_a, old_g = self._factors[name]
                a = self._decay * old_a + (1 - self._decay) * a
                g = self._decay * old_g + (1 - self._decay) * g
            self._factors[name] = (a.detach(), g.detach())
        self._decompose()
        self._num_updates += 1

    def _decompose(self) -> None:
        """Per layer: ``(Q_A, Q_G, 1 / (λ_G λ_Aᵀ + λ))`` from the current factors."""
        self._eigen = {}
        for name, (a, g) in self._factors.items():
            values_a, vectors_a = torch.linalg.eigh(a)
            values_g, vectors_g = torch.linalg.eigh(g)
            spectrum = torch.outer(values_g.clamp_min(0), values_a.clamp_min(0))
            self._eigen[name] = (vectors_a, vectors_g, 1.0 / (spectrum + self._damping))

    @torch.no_grad()
    def _precondition(self) -> None:
        """``M ← Q_G [(Q_Gᵀ M Q_A) ⊙ 1/(λ_G λ_Aᵀ + λ)] Q_Aᵀ`` per layer, in the ``.grad``s."""
        for layer, weight, bias in self._params:
            eigen = self._eigen.get(layer.name)
            grads = [p.grad for p in (weight, bias) if p is not None]
            if eigen is None or any(grad is None for grad in grads):
                continue
            vectors_a, vectors_g, scale = eigen
            rows = grads[0].shape[0]
            pieces = [grad.reshape(rows, -1) for grad in grads]
            matrix = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            rotated = torch.linalg.multi_dot([vectors_g.T, matrix, vectors_a]).mul_(scale)
            solved = torch.linalg.multi_dot([vectors_g, rotated, vectors_a.T])
            for grad, piece in zip(
                grads, solved.split([p.shape[1] for p in pieces], 1), strict=True
            ):
                grad.copy_(piece.reshape(grad.shape))

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, counters and the sampling generator's state."""
        return {
            "factors": {name: (a.clone(), g.clone()) for name, (a, g) in self._factors.items()},
            "num_steps": self._num_steps,
            "num_updates": self._num_updates,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``: the next ``step`` is the one the saved run would take."""
        func = f"{_FUNC}.load_state_dict"
        keys = {"factors", "num_steps", "num_updates", "generator"}
        if not isinstance(state, dict) or set(state) != keys:
            raise type_error(
                func, "state", f"a dict with keys {sorted(keys)}", state, "Pass a state_dict()."
            )
        unknown = sorted(set(state["factors"]) - set(self.layers))
        if unknown:
            raise value_error(
                func,
                "state",
                f"factors of the layers {self.layers}",
                state["factors"],
                f"Unknown layers: {unknown}; was it saved from another model?",
            )
        self._factors = {name: (a.clone(), g.clone()) for name, (a, g) in state["factors"].items()}
        self._num_steps = check_int(func, "state['num_steps']", state["num_steps"], minimum=0)
        self._num_updates = check_int(func, "state['num_updates']", state["num_updates"], minimum=0)
        self._generator.set_state(state["generator"])
        self._decompose()


def _untouched(names: list[str], why: str) -> str:
    return (
        f"curvscope.{_FUNC}: these parameters {why}; their gradients are left untouched: {names}."
    )
