"""The 2-2-1 tanh network: Hessian of its output w.r.t. all parameters and the input together.

y = w2 · tanh(W1 x + b1) + b2 with W1 (2, 2), b1 (2,), w2 (2,), b2 (1,) and input x (2,): 11
variables in all. The Hessian of y w.r.t. all of them at once (curvscope.hessian on a dict,
flat=True) is an 11 x 11 symmetric matrix; its eigenvalues are printed and drawn as a stem plot.

Usage: python examples/tanh_network_hessian.py [plot.png]   (default: a temporary directory)
"""

import sys
import tempfile
from pathlib import Path

import torch

import curvscope


def network_output(variables: dict[str, torch.Tensor]) -> torch.Tensor:
    """y = w2 · tanh(W1 x + b1) + b2, a scalar."""
    hidden = torch.tanh(variables["W1"] @ variables["x"] + variables["b1"])
    return variables["w2"] @ hidden + variables["b2"][0]


def main() -> None:
    variables = {
        "W1": torch.tensor([[0.5, -1.0], [1.5, 0.25]], dtype=torch.float64),
        "b1": torch.tensor([0.1, -0.2], dtype=torch.float64),
        "w2": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "b2": torch.tensor([0.3], dtype=torch.float64),
        "x": torch.tensor([0.8, -0.6], dtype=torch.float64),
    }
    hessian = curvscope.hessian(network_output, variables, flat=True)
    print(f"output y = {network_output(variables).item():.6f}")
    print(f"Hessian of y w.r.t. (W1, b1, w2, b2, x): shape {tuple(hessian.shape)}")
    print(f"symmetric: {torch.allclose(hessian, hessian.T)}")
    eigenvalues = torch.linalg.eigvalsh(hessian)
    print("eigenvalues:", ", ".join(f"{value:.6f}" for value in eigenvalues.tolist()))
    negative, positive = int((eigenvalues < -1e-12).sum()), int((eigenvalues > 1e-12).sum())
    print(f"negative: {negative}, positive: {positive} (a saddle in these variables)")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "stem.png"
    save_stem_plot(eigenvalues.tolist(), target)
    print(f"stem plot: {target}")


def save_stem_plot(eigenvalues: list[float], path: Path) -> None:
    """Draw the eigenvalues as a stem plot (matplotlib stays in the example, not the library)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.stem(range(1, len(eigenvalues) + 1), eigenvalues)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("index (ascending)")
    axis.set_ylabel("eigenvalue")
    axis.set_title("Hessian of the 2-2-1 tanh network's output")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
