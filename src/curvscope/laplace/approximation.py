"""``curvscope.LaplaceApproximation``: a trained network's Gaussian posterior after the fact."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_choice, check_float, check_int, type_error, value_error
from .._random import gaussian, make_generator
from ..operators.data import check_data, tensor_leaves, to_device
from . import evidence as _evidence
from . import predictive as _predictive
from ._model import ModelFunction, select_subset
from .likelihood import likelihood_kind, measure
from .posterior import PosteriorPrecisionOperator
from .structures import STRUCTURES, build, group_slices, is_operator, layer_groups

_FUNC = "LaplaceApproximation"
#: Prior precisions tried by ``optimize_prior_precision("gridsearch")`` without a grid.
DEFAULT_GRID = tuple(float(x) for x in np.logspace(-4, 4, 33))
#: Points of the finer second grid of "gridsearch" (``refine=True``).
REFINE_POINTS = 17
#: Tried after DEFAULT_GRID when its largest value is the best: towards the MAP limit.
EXTENDED_GRID = tuple(float(x) for x in np.logspace(4.25, 8, 16))


class LaplaceApproximation:
    """The Laplace approximation ``N(θ_MAP, Λ⁻¹)`` of a trained network's posterior.

    Conventions (those of laplace-torch, so that results compare): N training examples,
    C_mean the curvature of the MEAN loss (the GGN; for regression it carries 1/σ²), δ the prior
    precision (prior N(0, δ⁻¹ I), per layer when a dict), P the parameters in the subset:

    - posterior precision ``Λ = N·C_mean + δ·I`` (the reduction of ``loss_fn`` does not matter:
      the likelihood is per example; see :mod:`curvscope.laplace.likelihood`);
    - ``log Z = Σ_n log p(y_n | f(x_n; θ_MAP)) − ½[log det Λ − P·log δ] − ½·δ·‖θ_MAP‖²``, with
      the Gaussian normaliser for regression;
    - predictive: see :mod:`curvscope.laplace.predictive` ("probit", "glm", "mc").

    ``nn.CrossEntropyLoss`` means classification, ``nn.MSELoss`` Gaussian regression with noise
    ``sigma_noise``. The model is never changed: everything runs on copies of the parameters
    through ``torch.func.functional_call``, in eval mode.

    Args:
        model: the trained network (θ_MAP are its current parameters).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (reduction "mean" or "sum").
        data: the training data, an iterable of ``(inputs, targets)`` batches or one batch.
        structure: "kfac" (``curvscope.KFACOperator``), "full" (the dense GGN), "diag" (the
            exact GGN diagonal), "lowrank" (top ``rank`` eigenpairs of the GGN, each to 1e-6 of
            the largest eigenvalue), or a curvscope operator used as the curvature of
            ``loss_fn``.
        subset: "all", "last_layer" (the last module with parameters) or a list of names.
        prior_precision: δ > 0, or a dict layer name -> δ (layers as in ``layer_names``).
        sigma_noise: σ > 0 of the Gaussian likelihood (regression only).
        rank: eigenpairs of "lowrank" (default 50, at most P).
        seed: seed of the Lanczos start vectors (and of any sampling inside the structure).
        progress: show progress bars while the curvature is computed.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> data = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
        >>> la = curvscope.LaplaceApproximation(model, torch.nn.MSELoss(), data,
        ...     structure="full", prior_precision=1.0)
        >>> float(la.posterior_precision.to_dense())  # Σ x² / σ² + δ = 5 + 1
        6.0
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        structure: Any = "kfac",
        subset: Any = "all",
        prior_precision: float | Mapping[str, float] = 1.0,
        sigma_noise: float = 1.0,
        rank: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise type_error(_FUNC, "model", "a torch.nn.Module", model)
        self._kind, spec = likelihood_kind(loss_fn, _FUNC)
        check_data(data, _FUNC)
        if not is_operator(structure):
            check_choice(_FUNC, "structure", structure, STRUCTURES)
        check_int(_FUNC, "rank", rank, minimum=1, allow_none=True)
        check_int(_FUNC, "seed", seed)
        if not isinstance(progress, bool):
            raise type_error(_FUNC, "progress", "True or False", progress)
        names = self._names(model, structure, subset)
        self._function = ModelFunction(model, names)
        self._layers = layer_groups(names)
        self._slices = group_slices(names, self._function.shapes)
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self._likelihood = measure(self._function, data, self._kind, spec, _FUNC)
        self._structure = build(
            structure, model, loss_fn, data, names, self._function.shapes,
            function=self._function, likelihood=self._likelihood,
            rank=rank, seed=seed, progress=progress, func=_FUNC,
        )  # fmt: skip
        if self._structure.num_params != self.num_params:
            raise value_error(
                _FUNC,
                "structure",
                f"an operator of shape ({self.num_params}, {self.num_params}) (the subset)",
                structure,
                "Build the operator on the same parameters as subset.",
            )
        self.structure = structure if isinstance(structure, str) else "operator"

    @staticmethod
    def _names(model: nn.Module, structure: Any, subset: Any) -> list[str]:
        if is_operator(structure) and subset == "all":
            op_names = list(getattr(structure, "param_names", []))
            if op_names and all(name in dict(model.named_parameters()) for name in op_names):
                return select_subset(model, op_names, _FUNC)
        return select_subset(model, subset, _FUNC)

    # -- attributes ----------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """P, the number of parameters in the subset."""
        return self._function.num_params

    @property
    def num_examples(self) -> int:
        """N, the number of training examples."""
        return self._likelihood.num_examples

    @property
    def likelihood(self) -> str:
        """ "classification" or "regression"."""
        return self._kind

    @property
    def param_names(self) -> list[str]:
        """The parameters of the subset, in model order."""
        return list(self._function.names)

    @property
    def layer_names(self) -> list[str]:
        """The layers (modules owning parameters of the subset): the keys of per-layer priors."""
        return list(self._layers)

    @property
    def theta_map(self) -> torch.Tensor:
        """θ_MAP, the flat (P,) subset parameters (a copy)."""
        return self._function.theta.clone()

    @property
    def prior_precision(self) -> float | dict[str, float]:
        """δ: a float, or a dict layer name -> δ."""
        return self._prior if isinstance(self._prior, float) else dict(self._prior)

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        self._prior = self._check_prior(value, "prior_precision")

    @property
    def sigma_noise(self) -> float:
        """σ of the Gaussian likelihood (unused for classification)."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value: Any) -> None:
        self._sigma = check_float(_FUNC, "sigma_noise", value, minimum=0.0, open_interval=True)

    @property
    def posterior_precision(self) -> PosteriorPrecisionOperator:
        """Λ = N·C_mean + δ·I as a curvscope operator (with ``logdet`` and ``solve``)."""
        return self._precision(self._prior, self._sigma)

    def _precision(self, prior: Any, sigma: float) -> PosteriorPrecisionOperator:
        scale = self._likelihood.curvature_scale(sigma)
        vector = self._prior_vector(prior)
        return PosteriorPrecisionOperator(self._structure, scale, vector, self._function.shapes)

    def _check_prior(self, value: Any, arg: str) -> float | dict[str, float]:
        fix = f"Pass a number > 0 or a dict with one number > 0 for each of {self.layer_names}."
        if isinstance(value, Mapping):
            if set(value) != set(self._layers):
                expected = f"a dict with exactly the layers {self.layer_names}"
                raise value_error(_FUNC, arg, expected, value, fix)
            return {key: self._check_prior(value[key], f"{arg}[{key!r}]") for key in self._layers}
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            error = value_error if isinstance(value, numbers.Real) else type_error
            raise error(_FUNC, arg, "a prior precision > 0 (or a dict by layer)", value, fix)
        return float(value)

    def _prior_vector(self, prior: Any) -> torch.Tensor:
        vector = torch.empty(self.num_params, dtype=self._function.dtype)
        for layer, part in self._slices.items():
            vector[part] = prior[layer] if isinstance(prior, dict) else prior
        return vector.to(self._function.device)

    # -- evidence --------------------------------------------------------------------------------
    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: float | None = None
    ) -> float:
        """log Z (see the class docstring) at the given δ and σ (default: the current ones)."""
        prior = (
            self._prior
            if prior_precision is None
            else self._check_prior(prior_precision, "prior_precision")
        )
        sigma = (
            self._sigma
            if sigma_noise is None
            else check_float(_FUNC, "sigma_noise", sigma_noise, minimum=0.0, open_interval=True)
        )
        return self._log_evidence(self._prior_vector(prior), sigma)

    def _log_evidence(self, prior: torch.Tensor, sigma: float) -> float:
        return _evidence.log_evidence(
            self._likelihood.log_likelihood(sigma),
            self._structure,
            self._likelihood.curvature_scale(sigma),
            prior,
            self._function.theta,
        )

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        val_data: Any = None,
        grid: Any = None,
        *,
        per_layer: bool | None = None,
        predictive: str = "probit",
        refine: bool = True,
    ) -> float | dict[str, float]:
        """Choose δ, store it in ``prior_precision`` and return it.

        Args:
            method: "marglik" maximises the evidence (a coarse grid, then L-BFGS-B in log δ);
                "gridsearch" minimises the negative log-likelihood of the ``predictive`` on
                ``val_data`` over ``grid``.
            val_data: validation batches (needed by "gridsearch").
            grid: prior precisions to try (default 33 values from 1e-4 to 1e4, log-spaced; when
                the largest is the best, 16 more up to 1e8, one more pass over ``val_data``:
                the validation NLL can still fall towards the MAP limit).
            per_layer: "marglik" with one δ per layer (default: when the current prior is a
                dict).
            predictive: the predictive of "gridsearch": "probit" or "glm" (then with
                ``n_samples=100``, seed 0).
            refine: "gridsearch" then searches a second grid, ``REFINE_POINTS`` log-spaced
                values between the best grid point's neighbours, and keeps the better of the
                two (one more pass over ``val_data``); ``False`` keeps the grid's best.

        Returns:
            The chosen prior precision (a float, or a dict by layer).
        """
        func = f"{_FUNC}.optimize_prior_precision"
        check_choice(func, "method", method, ("marglik", "gridsearch"))
        check_choice(func, "predictive", predictive, ("probit", "glm"))
        if method == "marglik":
            if per_layer is None:
                per_layer = isinstance(self._prior, dict)
            self._prior = self._marglik(bool(per_layer))
        else:
            self._prior = self._gridsearch(val_data, grid, predictive, func, refine)
        return self.prior_precision

    def _marglik(self, per_layer: bool) -> float | dict[str, float]:
        layers = self.layer_names if per_layer else ["all"]
        slices = [self._slices[k] for k in layers] if per_layer else [slice(0, self.num_params)]
        theta, sigma = self._function.theta, self._sigma
        scale = self._likelihood.curvature_scale(sigma)
        norms = np.asarray([float((theta[part] ** 2).sum()) for part in slices])
        sizes = np.asarray([part.stop - part.start for part in slices])

        def expand(values: np.ndarray) -> torch.Tensor:
            prior = values[0] if not per_layer else dict(zip(layers, values.tolist(), strict=True))
            return self._prior_vector(float(prior) if not per_layer else prior)

        def gradient(prior: torch.Tensor) -> np.ndarray:
            deltas = np.asarray([float(prior[part][0]) for part in slices])
            traces = _evidence.group_traces(self._structure, scale, prior, slices)
            return 0.5 * (sizes - deltas * traces - deltas * norms)

        best = _evidence.maximise(
            lambda prior: self._log_evidence(prior, sigma), gradient, expand, len(slices)
        )
        if not per_layer:
            return float(best[0])
        return {layer: float(value) for layer, value in zip(layers, best, strict=True)}

    def _gridsearch(
        self, val_data: Any, grid: Any, predictive: str, func: str, refine: bool
    ) -> float:
        if val_data is None:
            raise value_error(
                func, "val_data", "validation batches for method='gridsearch'", val_data,
                "Pass val_data=[(inputs, targets), ...], or use method='marglik'.",
            )  # fmt: skip
        check_data(val_data, func)
        grid = DEFAULT_GRID if grid is None else grid
        try:
            values = [self._check_prior(float(value), "grid") for value in grid]
        except (TypeError, ValueError) as error:
            raise value_error(
                func, "grid", "an iterable of prior precisions > 0", grid, str(error)
            ) from error
        if not values:
            raise value_error(func, "grid", "at least one prior precision", grid)
        scores = self._validation_nll(val_data, values, predictive, func)
        best = int(np.nanargmin(scores))
        if grid is DEFAULT_GRID and best == len(values) - 1:  # still falling at the grid's end
            values = values + list(EXTENDED_GRID)
            scores = scores + self._validation_nll(val_data, list(EXTENDED_GRID), predictive, func)
            best = int(np.nanargmin(scores))
        if not refine or len(values) < 2:
            return values[best]
        # A second pass, 16 times finer, between the best grid point's neighbours (in sorted
        # order): the grid's step (4 per decade by default) is coarse where the curve is flat.
        ordered = sorted(values)
        where = ordered.index(values[best])
        low, high = ordered[max(where - 1, 0)], ordered[min(where + 1, len(ordered) - 1)]
        fine = [float(v) for v in np.geomspace(low, high, REFINE_POINTS)]
        fine_scores = self._validation_nll(val_data, fine, predictive, func)
        finest = int(np.nanargmin(fine_scores))
        return fine[finest] if fine_scores[finest] < scores[best] else values[best]

    def validation_nll(
        self, val_data: Any, grid: Any = None, *, predictive: str = "probit"
    ) -> list[float]:
        """The mean negative log-likelihood of the predictive on ``val_data`` at each prior
        precision of ``grid`` (default as in ``optimize_prior_precision``): the curve that
        "gridsearch" minimises. Classification: per example; regression: per output element,
        with the predictive variance including σ²."""
        func = f"{_FUNC}.validation_nll"
        check_choice(func, "predictive", predictive, ("probit", "glm"))
        check_data(val_data, func)
        grid = DEFAULT_GRID if grid is None else grid
        values = [self._check_prior(float(value), "grid") for value in grid]
        return self._validation_nll(val_data, values, predictive, func)

    def _validation_nll(self, val_data: Any, values: list, predictive: str, func: str) -> list:
        priors = [self._prior_vector(value) for value in values]
        offsets = [self._offsets(prior, 100, 0) for prior in priors] if predictive == "glm" else []
        return _predictive.validation_nll(
            self._function, self._structure, val_data, priors, offsets,
            kind=self._kind, scale=self._likelihood.curvature_scale(self._sigma),
            sigma=self._sigma, func=func,
        )  # fmt: skip

    # -- predictions and samples -----------------------------------------------------------------
    def predict(self, x: Any, method: str = "probit", n_samples: int = 100, seed: int = 0) -> Any:
        """The posterior predictive on inputs ``x`` (one batch: a Tensor, tuple or dict).

        Args:
            x: model inputs for n examples (passed as ``model(x)``, ``model(*x)`` or
                ``model(**x)``).
            method: "probit" (closed form), "glm" (samples of the linearised model) or "mc"
                (samples of the network); see :mod:`curvscope.laplace.predictive`.
            n_samples: samples of "glm" and "mc".
            seed: seed of the samples.

        Returns:
            Classification: class probabilities (n, C). Regression: ``(mean, variance)`` shaped
            like the model output, the variance including the noise σ².
        """
        func = f"{_FUNC}.predict"
        check_choice(func, "method", method, _predictive.METHODS)
        check_int(func, "n_samples", n_samples, minimum=1)
        check_int(func, "seed", seed)
        x, size = self._inputs(x, func)
        shape = self._function.outputs(x).shape
        if self._kind == "classification" and len(shape) != 2:
            raise value_error(
                func, "x", "inputs on which the model returns logits of shape (n, C)", x,
                f"The model returned shape {tuple(shape)}; predict one position at a time.",
            )  # fmt: skip
        if method == "mc":
            thetas = self.sample(n_samples, seed=seed)
            samples = _predictive.network_samples(self._function, x, thetas, size)
            return self._shaped(_predictive.summarise_samples(samples, self._kind), shape)
        precision = self.posterior_precision
        mean, variance, jacobians = _predictive.linearised(self._function, precision.solve, x, size)
        if method == "probit":
            return self._shaped(_predictive.closed_form(self._kind, mean, variance), shape)
        offsets = self._offsets(precision.prior, n_samples, seed)
        samples = _predictive.glm_samples(mean, jacobians, offsets)
        return self._shaped(_predictive.summarise_samples(samples, self._kind), shape)

    def _shaped(self, prediction: Any, shape: torch.Size) -> Any:
        if self._kind == "classification":
            return prediction
        mean, variance = prediction
        return mean.reshape(shape), (variance + self._sigma**2).reshape(shape)

    def _inputs(self, x: Any, func: str) -> tuple[Any, int]:
        leaves = [t for t in tensor_leaves(x) if t.ndim > 0]
        if not leaves:
            raise type_error(
                func, "x", "model inputs: a Tensor, a tuple or a dict of Tensors", x,
                "Pass the inputs of one batch, e.g. la.predict(x_test).",
            )  # fmt: skip
        return to_device(x, self._function.device), leaves[0].shape[0]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` parameter vectors from ``N(θ_MAP, Λ⁻¹)``, shape (n, P); the same seed gives the
        same samples (the global RNG is not used)."""
        check_int(f"{_FUNC}.sample", "n", n, minimum=1)
        check_int(f"{_FUNC}.sample", "seed", seed)
        offsets = self._offsets(self._prior_vector(self._prior), n, seed)
        return (self._function.theta[:, None] + offsets).T

    def _offsets(self, prior: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """Λ^{-1/2}-type offsets (P, n): covariance Λ⁻¹, from standard normal noise."""
        noise = gaussian(
            (self.num_params, n), make_generator(seed),
            dtype=self._function.dtype, device=self._function.device,
        )  # fmt: skip
        scale = self._likelihood.curvature_scale(self._sigma)
        return self._structure.sqrt_inverse(scale, prior, noise)

    def __repr__(self) -> str:
        return (
            f"LaplaceApproximation(structure={self.structure!r}, likelihood={self._kind!r}, "
            f"num_params={self.num_params}, prior_precision={self.prior_precision!r})"
        )
