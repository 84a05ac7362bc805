"""Bad input at the boundary, as one table: each row is a mistake, its error and a message phrase.

``API_CASES`` covers the Python API (derivatives, operators, estimators, analysis), ``CLI_CASES``
the command line. A new feature adds its rows here: an API row is
``ApiCase(id, call, error, phrase)`` where ``call(world)`` makes the bad call with the shared
tiny model and data of the ``world`` fixture; a CLI row is ``CliCase(id, args, phrase)``, with an
optional ``setup(tmp_path)`` that writes the files the arguments name (``{tmp}`` in an argument
is replaced by the test's directory).

Every API row must raise exactly that type (or a subclass), name the call in the house form
``curvscope.<call>...`` and contain the phrase. Every CLI row must exit with status 2, print exactly
one line on stderr (``curvscope: error: ...``, containing the phrase, no traceback) and write
nothing: no report directory, no other file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import user_model
from typer.testing import CliRunner

import curvscope
from curvscope.cli.app import app


@dataclass(frozen=True)
class World:
    """The shared fixture: a 26-parameter tanh network, its loss and data, small tensors."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]
    x: torch.Tensor  # a float64 vector of 3 entries
    dense: curvscope.DenseOperator  # a 4 x 4 symmetric float64 operator
    hessian: curvscope.HessianOperator  # over model, loss_fn, data (26 parameters)

    @property
    def args(self) -> tuple[Any, Any, Any]:
        return self.model, self.loss_fn, self.data


@pytest.fixture(scope="module")
def world() -> World:
    model = user_model.build_model()
    data = user_model.build_data()
    loss_fn = torch.nn.CrossEntropyLoss()
    return World(
        model=model,
        loss_fn=loss_fn,
        data=data,
        x=torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
        dense=curvscope.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))),
        hessian=curvscope.HessianOperator(model, loss_fn, data),
    )


@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[World], Any]
    error: type[Exception]
    phrase: str


def _square(x: torch.Tensor) -> torch.Tensor:
    return (x**2).sum()


def _ones(op: Any, size: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.ones(op.shape[0] if size is None else size, dtype=dtype)


API_CASES = [
    # derivatives
    ApiCase(
        "jacobian-f-not-callable",
        lambda w: curvscope.jacobian(3, w.x),
        TypeError,
        "curvscope.jacobian(f=...): expected a callable",
    ),
    ApiCase(
        "hessian-integer-x",
        lambda w: curvscope.hessian(_square, torch.tensor([1, 2])),
        TypeError,
        "expected floating-point Tensors (derivatives need real numbers)",
    ),
    ApiCase(
        "jacobian-complex-x",
        lambda w: curvscope.jacobian(lambda z: z * 2, w.x.to(torch.complex128)),
        TypeError,
        "torch.view_as_real",
    ),
    ApiCase(
        "jacobian-complex-output",
        lambda w: curvscope.jacobian(torch.fft.rfft, w.x),
        TypeError,
        "(not complex ones)",
    ),
    ApiCase(
        "jacobian-integer-output",
        lambda w: curvscope.jacobian(lambda z: z.argmax(-1, keepdim=True), w.x, mode="reverse"),
        TypeError,
        "have no derivative",
    ),
    ApiCase(
        "hvp-integer-output",
        lambda w: curvscope.hvp(lambda z: (z > 0).sum(), w.x, w.x),
        TypeError,
        "have no derivative",
    ),
    ApiCase(
        "jacobian-unknown-mode",
        lambda w: curvscope.jacobian(torch.sin, w.x, mode="fast"),
        ValueError,
        "curvscope.jacobian(mode=...): expected one of 'auto', 'forward', 'reverse'",
    ),
    ApiCase(
        "hvp-non-scalar-f",
        lambda w: curvscope.hvp(torch.sin, w.x, w.x),
        ValueError,
        "expected a function returning a scalar Tensor (one element)",
    ),
    ApiCase(
        "hvp-v-of-wrong-shape",
        lambda w: curvscope.hvp(_square, w.x, torch.ones(4, dtype=torch.float64)),
        ValueError,
        "curvscope.hvp(v=...): expected a Tensor like x: shape (3,)",
    ),
    ApiCase(
        "vjp-u-of-wrong-structure",
        lambda w: curvscope.vjp(torch.sin, w.x, (w.x,)),
        TypeError,
        "curvscope.vjp(u=...): expected the structure of f(x)",
    ),
    ApiCase(
        "hessian-chunk-size-0",
        lambda w: curvscope.hessian(_square, w.x, chunk_size=0),
        ValueError,
        "curvscope.hessian(chunk_size=...): expected an integer >= 1 or None, got 0",
    ),
    ApiCase(
        "derivative-order-0",
        lambda w: curvscope.derivative(torch.sin, w.x, order=0, direction=w.x),
        ValueError,
        "curvscope.derivative(order=...): expected an integer >= 1",
    ),
    ApiCase(
        "derivative-without-direction",
        lambda w: curvscope.derivative(torch.sin, w.x, order=2),
        ValueError,
        "Pass direction=v",
    ),
    ApiCase(
        "derivative-through-an-op-without-forward-mode",
        lambda w: curvscope.derivative(
            lambda z: torch.nn.functional.huber_loss(z, torch.zeros_like(z)),
            w.x,
            order=2,
            direction=w.x,
        ),
        NotImplementedError,
        "has no forward-mode derivative in torch",
    ),
    ApiCase(
        "batch-jacobian-unequal-batches",
        lambda w: curvscope.batch_jacobian(torch.sin, (torch.ones(2, 3), torch.ones(3, 3))),
        ValueError,
        "expected Tensors with one shared leading batch dimension",
    ),
    ApiCase(
        "flatten-mixed-dtypes",
        lambda w: curvscope.flatten((w.x, w.x.float())),
        ValueError,
        "curvscope.flatten(tree=...): expected Tensors of one dtype and device",
    ),
    # operators
    ApiCase(
        "operator-model-not-a-module",
        lambda w: curvscope.HessianOperator(lambda x: x, w.loss_fn, w.data),
        TypeError,
        "(model=...): expected a torch.nn.Module",
    ),
    ApiCase(
        "operator-loss-as-string",
        lambda w: curvscope.GGNOperator(w.model, "cross_entropy", w.data),
        TypeError,
        "(loss_fn=...): expected a callable",
    ),
    ApiCase(
        "operator-data-a-number",
        lambda w: curvscope.HessianOperator(w.model, w.loss_fn, 5),
        TypeError,
        "(data=...): expected an iterable of (inputs, targets) batches",
    ),
    ApiCase(
        "operator-data-a-bare-tensor",
        lambda w: curvscope.HessianOperator(w.model, w.loss_fn, torch.ones(3, 3)),
        TypeError,
        "(data=...): expected an iterable",
    ),
    ApiCase(
        "operator-data-a-generator",
        lambda w: curvscope.FisherOperator(w.model, w.loss_fn, (batch for batch in w.data)),
        TypeError,
        "expected data that can be iterated again",
    ),
    ApiCase(
        "operator-empty-data",
        lambda w: (lambda op: op @ _ones(op))(curvscope.HessianOperator(w.model, w.loss_fn, [])),
        ValueError,
        "(data=...): expected at least one example",
    ),
    ApiCase(
        "operator-inputs-that-do-not-fit",
        lambda w: curvscope.GGNOperator(
            w.model, w.loss_fn, [(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4).long())]
        ).gradient(),
        ValueError,
        "model(inputs) failed on batch 0",
    ),
    ApiCase(
        "operator-loss-without-reduction",
        lambda w: curvscope.HessianOperator(
            w.model, torch.nn.CrossEntropyLoss(reduction="none"), w.data
        ),
        ValueError,
        "(loss_fn=...): expected a loss that reduces",
    ),
    ApiCase(
        "operator-unknown-parameter",
        lambda w: curvscope.HessianOperator(*w.args, params=["0.weight", "nope"]),
        ValueError,
        "Unknown: ['nope']",
    ),
    ApiCase(
        "operator-params-a-string",
        lambda w: curvscope.GGNOperator(*w.args, params="0.weight"),
        TypeError,
        "(params=...): expected None or a list",
    ),
    ApiCase(
        "operator-empty-params",
        lambda w: curvscope.GGNOperator(*w.args, params=[]),
        ValueError,
        "non-empty list of distinct names",
    ),
    ApiCase(
        "operator-unknown-hvp-mode",
        lambda w: curvscope.HessianOperator(*w.args, hvp_mode="fast"),
        ValueError,
        "(hvp_mode=...): expected one of 'auto'",
    ),
    ApiCase(
        "operator-max-batch-size-0",
        lambda w: curvscope.GGNOperator(*w.args, max_batch_size=0),
        ValueError,
        "(max_batch_size=...): expected an integer >= 1",
    ),
    ApiCase(
        "fisher-unknown-kind",
        lambda w: curvscope.FisherOperator(*w.args, kind="true"),
        ValueError,
        "(kind=...): expected one of 'empirical'",
    ),
    ApiCase(
        "operator-vector-of-wrong-size",
        lambda w: w.hessian @ _ones(w.hessian, 27),
        ValueError,
        "matvec(v=...): expected a flat tensor of shape (26,)",
    ),
    ApiCase(
        "operator-vector-of-wrong-dtype",
        lambda w: w.hessian @ _ones(w.hessian, dtype=torch.float32),
        ValueError,
        "expected dtype torch.float64",
    ),
    ApiCase(
        "dense-operator-not-square",
        lambda w: curvscope.DenseOperator(torch.ones(2, 3)),
        ValueError,
        "square",
    ),
    ApiCase(
        "dense-operator-not-symmetric",
        lambda w: curvscope.DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]])),
        ValueError,
        "symmetric",
    ),
    # estimators
    ApiCase(
        "eigenvalues-of-a-bare-tensor",
        lambda w: curvscope.eigenvalues(torch.eye(3), k=1),
        TypeError,
        "Wrap an explicit matrix with curvscope.DenseOperator",
    ),
    ApiCase(
        "eigenvalues-k-0",
        lambda w: curvscope.eigenvalues(w.dense, k=0),
        ValueError,
        "curvscope.eigenvalues(k=...): expected an integer >= 1",
    ),
    ApiCase(
        "eigenvalues-unknown-which",
        lambda w: curvscope.eigenvalues(w.dense, k=1, which="top"),
        ValueError,
        "(which=...): expected one of 'largest'",
    ),
    ApiCase(
        "trace-unknown-method",
        lambda w: curvscope.trace(w.dense, method="fast"),
        ValueError,
        "curvscope.trace(method=...): expected one of 'hutch++'",
    ),
    ApiCase(
        "trace-too-few-matvecs",
        lambda w: curvscope.trace(w.dense, method="hutch++", num_matvecs=2),
        ValueError,
        "integer >= 3 for hutch++",
    ),
    ApiCase(
        "trace-seed-a-string",
        lambda w: curvscope.trace(w.dense, seed="a"),
        TypeError,
        "(seed=...): expected an integer seed or a torch.Generator",
    ),
    ApiCase(
        "diagonal-seed-none",
        lambda w: curvscope.diagonal(w.dense, seed=None),
        TypeError,
        "(seed=...): expected an integer seed",
    ),
    ApiCase(
        "solve-b-of-wrong-shape",
        lambda w: curvscope.solve(w.dense, torch.ones(3, dtype=torch.float64)),
        ValueError,
        "curvscope.solve(b=...): expected a tensor of shape (4,)",
    ),
    ApiCase(
        "solve-negative-damping",
        lambda w: curvscope.solve(w.dense, _ones(w.dense), damping=-1.0),
        ValueError,
        "(damping=...): expected a number >= 0",
    ),
    ApiCase(
        "spectral-density-no-probes",
        lambda w: curvscope.spectral_density(w.dense, num_probes=0),
        ValueError,
        "curvscope.spectral_density(num_probes=...): expected an integer",
    ),
    ApiCase(
        "frobenius-norm-confidence-above-1",
        lambda w: curvscope.frobenius_norm(w.dense, confidence=1.5),
        ValueError,
        "curvscope.frobenius_norm(confidence=...)",
    ),
    # analysis
    ApiCase(
        "analyze-model-not-a-module",
        lambda w: curvscope.analyze(lambda x: x, w.loss_fn, w.data),
        TypeError,
        "analyze(model=...): expected a torch.nn.Module",
    ),
    ApiCase(
        "analyze-top-k-0",
        lambda w: curvscope.analyze(*w.args, top_k=0),
        ValueError,
        "analyze(top_k=...): expected an integer >= 1",
    ),
    # the data boundary (issue 15)
    *[
        ApiCase(
            f"{cls.__name__}-empty-data",
            lambda w, cls=cls: cls(w.model, w.loss_fn, []),
            ValueError,
            f"{cls.__name__}(data=...): expected at least one example",
        )
        for cls in (curvscope.HessianOperator, curvscope.GGNOperator, curvscope.FisherOperator)
    ],
    ApiCase(
        "operator-all-batches-empty",
        lambda w: curvscope.GGNOperator(
            w.model, w.loss_fn, [(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))] * 2
        ),
        ValueError,
        "expected at least one example",
    ),
    ApiCase(
        "operator-inputs-do-not-fit-the-model",
        lambda w: (
            curvscope.HessianOperator(
                w.model, w.loss_fn, [(torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))]
            )
            @ torch.ones(26)
        ),
        ValueError,
        "inputs (5, 7) float64, targets (5,) int64. The model's first layer, '0', is Linear(",
    ),
    ApiCase(
        "operator-loss-none-class-targets",
        lambda w: curvscope.GGNOperator(w.model, None, w.data),
        TypeError,
        "Pass a loss module such as nn.CrossEntropyLoss()",
    ),
    ApiCase(
        "operator-loss-none-float-targets",
        lambda w: curvscope.GGNOperator(w.model, None, [(torch.zeros(5, 3), torch.zeros(5, 2))]),
        TypeError,
        "Pass a loss module such as nn.MSELoss()",
    ),
    # second-order training and tracking (issue 13)
    ApiCase(
        "hessian-free-negative-damping",
        lambda w: curvscope.optim.HessianFree(w.model, w.loss_fn, damping=-1.0),
        ValueError,
        "optim.HessianFree(damping=...): expected a number >= 0.0, got -1.0",
    ),
    ApiCase(
        "hessian-free-no-cg-iterations",
        lambda w: curvscope.optim.HessianFree(w.model, w.loss_fn, max_cg_iters=0),
        ValueError,
        "optim.HessianFree(max_cg_iters=...): expected an integer >= 1, got 0",
    ),
    ApiCase(
        "kfac-factor-decay-one",
        lambda w: curvscope.optim.KFACPreconditioner(w.model, w.loss_fn, factor_decay=1.0),
        ValueError,
        "optim.KFACPreconditioner(factor_decay=...): expected a number in [0, 1), got 1.0",
    ),
    ApiCase(
        "kfac-negative-damping",
        lambda w: curvscope.optim.KFACPreconditioner(w.model, w.loss_fn, damping=-0.1),
        ValueError,
        "optim.KFACPreconditioner(damping=...): expected a number >= 0.0",
    ),
    ApiCase(
        "tracker-every-0",
        lambda w: curvscope.SharpnessTracker(*w.args, every=0),
        ValueError,
        "SharpnessTracker(every=...): expected an integer >= 1, got 0",
    ),
    ApiCase(
        "tracker-k-0",
        lambda w: curvscope.SharpnessTracker(*w.args, k=0),
        ValueError,
        "SharpnessTracker(k=...): expected an integer >= 1, got 0",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[case.id for case in API_CASES])
def test_api_bad_input(case: ApiCase, world: World) -> None:
    with pytest.raises(case.error) as caught:
        case.call(world)
    text = str(caught.value)
    assert case.phrase in text, text
    assert text.startswith("curvscope."), text  # names the call, in the house form


def test_the_api_table_is_large_and_its_ids_unique() -> None:
    ids = [case.id for case in API_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@dataclass(frozen=True)
class CliCase:
    id: str
    args: list[str]
    phrase: str
    setup: Callable[[Path], None] | None = None
    command: str = "analyze"


USER = ["--model", "user_model:build_model", "--data", "user_model:build_data"]


def _save_a_tensor(directory: Path) -> None:
    torch.save(torch.ones(3), directory / "tensor.pt")


CLI_CASES = [
    CliCase("device-unknown", [*USER, "--device", "tpu"], "--device 'tpu': unknown"),
    CliCase("curvature-in-capitals", [*USER, "--curvature", "HESSIAN"], "expected one of hessian"),
    CliCase("dtype-unknown", [*USER, "--dtype", "bfloat16"], "--dtype 'bfloat16': unknown"),
    CliCase("loss-module-missing", [*USER, "--loss", "no_such_module:f"], "cannot import module"),
    CliCase("loss-name-missing", [*USER, "--loss", "user_model:nothing"], "has no attribute"),
    CliCase(
        "loss-that-does-not-fit",
        [*USER, "--loss", "user_model:build_model"],
        "the first batch does not fit the model and loss",
    ),
    CliCase(
        "data-not-callable",
        ["--model", "user_model:build_model", "--data", "user_model:NOT_CALLABLE"],
        "expected a callable factory, got int",
    ),
    CliCase(
        "data-factory-raises",
        ["--model", "user_model:build_model", "--data", "user_model:build_broken"],
        "the factory raised RuntimeError: cannot build",
    ),
    CliCase(
        "data-without-a-name",
        ["--model", "user_model:build_model", "--data", "user_model:"],
        "expected 'package.module:name'",
    ),
    CliCase(
        "data-not-pairs",
        ["--model", "user_model:build_model", "--data", "user_model:build_model"],
        "each batch must be a pair (inputs, targets)",
    ),
    CliCase("model-missing", ["--data", "user_model:build_data"], "--model is missing"),
    CliCase(
        "checkpoint-a-tensor",
        [*USER, "--checkpoint", "{tmp}/tensor.pt"],
        "expected a state dict (name -> tensor), got Tensor",
        setup=_save_a_tensor,
    ),
    CliCase("checkpoint-a-directory", [*USER, "--checkpoint", "{tmp}"], "unreadable"),
    CliCase("params-matching-nothing", [*USER, "--params", "[bad"], "matches no parameter"),
    CliCase("option-below-minimum", ["--top-k", "0"], "Invalid value for '--top-k'"),
    CliCase("option-not-a-number", ["--top-k", "abc"], "valid integer"),
    CliCase("option-unknown", ["--no-such-option"], "No such option: --no-such-option"),
    CliCase(
        "influence-curvature-unknown",
        ["--curvature", "bogus"],
        "--curvature 'bogus': unknown; expected one of ggn, hessian",
        command="influence",
    ),
    CliCase(
        "influence-damping-negative",
        ["--damping", "-1"],
        "--damping -1.0: expected a number >= 0",
        command="influence",
    ),
    CliCase(
        "prune-sparsity-one-or-more",
        ["--sparsity", "1.5"],
        "--sparsity 1.5: expected numbers in [0, 1)",
        command="prune",
    ),
    CliCase(
        "prune-method-unknown",
        ["--methods", "bogus"],
        "--methods 'bogus': unknown; expected one of magnitude",
        command="prune",
    ),
    CliCase("track-lr-0", ["--lr", "0"], "--lr 0.0: expected a learning rate > 0", command="track"),
    CliCase(
        "track-steps-0", ["--steps", "0"], "--steps 0: expected an integer >= 1", command="track"
    ),
    CliCase(
        "track-every-0", ["--every", "0"], "--every 0: expected an integer >= 1", command="track"
    ),
    CliCase(
        "track-optimizer-unknown",
        ["--optimizer", "adam"],
        "expected one of gd, momentum",
        command="track",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_cli_bad_input(case: CliCase, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "report"
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in case.args]
    if "--device" not in args:
        args += ["--device", "cpu"]
    result = CliRunner().invoke(app, [case.command, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curvscope: error: ") and case.phrase in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists() and sorted(tmp_path.iterdir()) == before
