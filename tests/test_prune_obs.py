"""OBS and OBD against dense references in float64."""

import pytest
import torch
from prune_models import least_squares, mlp

import curvscope


def _hessian(model, loss_fn, data, name="weight"):
    return curvscope.HessianOperator(model, loss_fn, data, params=[name]).to_dense()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_obs_removes_one_weight_at_exactly_its_saliency(curvature):
    model, loss_fn, data = least_squares()
    w = model.weight.detach().reshape(-1).clone()
    inverse = torch.linalg.inv(_hessian(model, loss_fn, data))
    saliency = w**2 / (2 * inverse.diagonal())
    q = int(saliency.argmin())
    result = curvscope.prune(
        model, loss_fn, data, sparsity=1 / 6, method="obs", curvature=curvature, damping=0.0
    )
    torch.testing.assert_close(result.saliency["weight"].reshape(-1), saliency, rtol=1e-9, atol=0)
    expected_mask = torch.ones(6, dtype=torch.bool)
    expected_mask[q] = False
    assert torch.equal(result.masks["weight"].reshape(-1), expected_mask)
    expected = w - w[q] / inverse[q, q] * inverse[:, q]
    new = result.model.weight.detach().reshape(-1)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-12)
    assert new[q] == 0.0
    assert result.loss_after - result.loss_before == pytest.approx(float(saliency[q]), abs=1e-10)
    assert result.status == "ok"


def _greedy_reference(w, hessian, count):
    """Greedy OBS by re-inverting H restricted to the remaining weights at every step."""
    w, kept = w.clone(), torch.ones(len(w), dtype=torch.bool)
    for _ in range(count):
        index = torch.nonzero(kept).reshape(-1)
        inverse = torch.linalg.inv(hessian[index][:, index])
        saliency = w[index] ** 2 / (2 * inverse.diagonal())
        j = int(saliency.argmin())
        w[index] -= w[index[j]] / inverse[j, j] * inverse[:, j]
        w[index[j]] = 0.0
        kept[index[j]] = False
    return w, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_obs_equals_a_dense_greedy_reference_and_beats_magnitude(seed):
    model, loss_fn, data = least_squares(num=60, dim=10, seed=seed)
    hessian = _hessian(model, loss_fn, data)
    w = model.weight.detach().reshape(-1)
    expected, kept = _greedy_reference(w, hessian, 7)
    result = curvscope.prune(
        model, loss_fn, data, sparsity=0.7, method="obs", curvature="hessian", damping=0.0
    )
    assert torch.equal(result.masks["weight"].reshape(-1), kept)
    new = result.model.weight.detach().reshape(-1)
    torch.testing.assert_close(new, expected, atol=1e-10, rtol=0)
    delta = expected - w
    assert result.loss_after - result.loss_before == pytest.approx(
        float(0.5 * delta @ hessian @ delta), abs=1e-10
    )
    magnitude = curvscope.prune(model, loss_fn, data, sparsity=0.7, method="magnitude")
    assert result.loss_after <= magnitude.loss_after + 1e-12


def test_obs_damping_is_relative_to_the_mean_diagonal():
    model, loss_fn, data = least_squares(dim=8, seed=3)
    hessian = _hessian(model, loss_fn, data)
    damped = hessian + 0.3 * hessian.diagonal().mean() * torch.eye(8)
    w = model.weight.detach().reshape(-1)
    expected, kept = _greedy_reference(w, damped, 4)
    result = curvscope.prune(
        model, loss_fn, data, sparsity=0.5, method="obs", curvature="hessian", damping=0.3
    )
    assert torch.equal(result.masks["weight"].reshape(-1), kept)
    new = result.model.weight.detach().reshape(-1)
    torch.testing.assert_close(new, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher"])
def test_obd_saliency_is_half_w_squared_times_the_dense_diagonal(curvature):
    model, loss_fn, data = mlp()
    operator = {
        "ggn": curvscope.GGNOperator,
        "hessian": curvscope.HessianOperator,
        "fisher": curvscope.FisherOperator,
    }[curvature]
    result = curvscope.prune(model, loss_fn, data, sparsity=0.5, method="obd", curvature=curvature)
    for name in ["0.weight", "2.weight"]:
        diagonal = operator(model, loss_fn, data, params=[name]).to_dense().diagonal()
        w = dict(model.named_parameters())[name].detach()
        expected = 0.5 * w**2 * diagonal.reshape(w.shape)
        torch.testing.assert_close(result.saliency[name], expected, rtol=1e-9, atol=1e-14)
        removed = expected.reshape(-1).argsort()[: w.numel() // 2]
        assert not result.masks[name].reshape(-1)[removed].any()
        assert torch.equal(result.model.get_parameter(name), w * result.masks[name])


def test_obs_with_the_diagonal_curvature_is_damped_obd():
    model, loss_fn, data = mlp(seed=1)
    obs = curvscope.prune(
        model, loss_fn, data, sparsity=0.6, method="obs", curvature="diagonal", damping=0.0
    )
    obd = curvscope.prune(model, loss_fn, data, sparsity=0.6, method="obd", curvature="ggn")
    for name, mask in obd.masks.items():
        assert torch.equal(obs.masks[name], mask)
        torch.testing.assert_close(obs.saliency[name], obd.saliency[name], rtol=1e-9, atol=1e-14)


def test_global_obs_meets_the_overall_sparsity_and_loses_less_than_magnitude():
    model, loss_fn, data = mlp(seed=2)
    result = curvscope.prune(model, loss_fn, data, sparsity=0.7, method="obs", scope="global")
    total = sum(m.numel() for m in result.masks.values())
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    assert abs(zeros - 0.7 * total) <= 1
    assert float(result.sparsity) == pytest.approx(zeros / total)
    magnitude = curvscope.prune(
        model, loss_fn, data, sparsity=0.7, method="magnitude", scope="global"
    )
    assert result.loss_after < magnitude.loss_after


def test_block_diagonal_obs_for_large_layers(monkeypatch):
    """Layers above MAX_DENSE use blocks of BLOCK_SIZE weights: with the blocks as large as the
    layer, the result equals dense OBS; with small blocks, the sparsity still holds."""
    from curvscope.prune import methods as pruning

    model, loss_fn, data = mlp(seed=3)
    dense = curvscope.prune(model, loss_fn, data, sparsity=0.5, method="obs")
    monkeypatch.setattr(pruning, "MAX_DENSE", 10)
    monkeypatch.setattr(pruning, "BLOCK_SIZE", 96)  # both layers fit one (padded) block
    one_block = curvscope.prune(model, loss_fn, data, sparsity=0.5, method="obs")
    for name, mask in dense.masks.items():
        assert torch.equal(one_block.masks[name], mask)
        torch.testing.assert_close(
            one_block.model.get_parameter(name), dense.model.get_parameter(name), atol=1e-10, rtol=0
        )
    monkeypatch.setattr(pruning, "BLOCK_SIZE", 16)
    blocks = curvscope.prune(model, loss_fn, data, sparsity=0.5, method="obs", structure="2:4")
    for mask in blocks.masks.values():
        assert (mask.reshape(-1, 4).sum(dim=1) == 2).all()


def _single_datum_deep_linear():
    gen = torch.Generator().manual_seed(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(6, 3, bias=False)
        ).double()
    x = torch.randn(1, 4, generator=gen)
    y = torch.randn(1, 3, generator=gen)
    return model, torch.nn.MSELoss(), (x, y)


def test_kfac_obs_equals_ggn_obs_where_kfac_is_exact():
    """For a single datum KFAC(fisher="ggn") equals the GGN's layer blocks, so OBS agrees."""
    model, loss_fn, data = _single_datum_deep_linear()
    for method in ["obs", "obd"]:
        kfac = curvscope.prune(model, loss_fn, data, sparsity=0.5, method=method, curvature="kfac")
        ggn = curvscope.prune(model, loss_fn, data, sparsity=0.5, method=method, curvature="ggn")
        for name, mask in ggn.masks.items():
            torch.testing.assert_close(
                kfac.saliency[name], ggn.saliency[name], rtol=1e-8, atol=1e-12
            )
            assert torch.equal(kfac.masks[name], mask)
            torch.testing.assert_close(
                kfac.model.get_parameter(name), ggn.model.get_parameter(name), atol=1e-9, rtol=0
            )


def test_engine_falls_back_to_magnitude_where_the_inverse_breaks_down():
    from curvscope.prune.obs import GreedyOBS, run_greedy

    engine = GreedyOBS(
        torch.tensor([[3.0, -1.0, 2.0]]), torch.diag(torch.tensor([1.0, 0, 1]))[None]
    )
    order = []
    run_greedy([engine], [3], lambda count: order.append(engine.removed.clone()))
    assert [torch.nonzero(~r[0] ^ True).reshape(-1).tolist() for r in order] == [
        [2],
        [0, 2],
        [0, 1, 2],
    ]
    assert engine.broken == 1 and (engine.w == 0).all()


def test_damping_is_raised_until_the_block_is_positive_definite():
    from curvscope.prune.obs import damped_inverse

    inverse, used, raised = damped_inverse(torch.diag(torch.tensor([1.0, -1.0])), 0.0)
    assert raised and 1.0 < used <= 10.0
    torch.testing.assert_close(inverse, torch.diag(1 / (torch.tensor([1.0, -1.0]) + used)))


@pytest.mark.parametrize("block", [1, 8])
def test_engine_with_a_shrinking_inverse_equals_plain_downdates(monkeypatch, block):
    """A single large group drops removed rows/columns from its inverse as it goes; the
    result equals greedy OBS with full-size downdates (blocks of ``block`` removals)."""
    from curvscope.prune import obs

    monkeypatch.setattr(obs, "_SINGLE_STEP_ENTRIES", 0 if block > 1 else 2**30)
    monkeypatch.setattr(obs, "_BLOCK", block)
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(300, 400, generator=gen)
    inverse = torch.linalg.inv(a @ a.T / 400)
    w = torch.randn(300, generator=gen)
    engine = obs.GreedyOBS(w[None], inverse[None])
    obs.run_greedy([engine], [240], lambda count: None)
    assert len(engine.active) < 300  # the inverse did shrink
    expected, hinv, kept = w.clone(), inverse.clone(), torch.ones(300, dtype=torch.bool)
    for _ in range(240 // block):
        saliency = torch.where(
            kept, expected**2 / (2 * hinv.diagonal().clamp_min(1e-300)), torch.inf
        )
        chosen = saliency.argsort()[:block]
        columns = hinv[:, chosen]
        expected -= columns @ torch.linalg.solve(columns[chosen], expected[chosen])
        hinv -= columns @ torch.linalg.solve(columns[chosen], columns.T)
        expected[chosen], kept[chosen] = 0.0, False
        hinv[chosen, :], hinv[:, chosen] = 0.0, 0.0
    assert torch.equal(~engine.removed[0], kept)
    torch.testing.assert_close(engine.w[0], expected, atol=1e-9, rtol=0)
