"""Hessian and Hessian-vector product of f(x) = x0^2 + x0 x1 + 3 x1^2 at (1, 2).

H = [[2, 1], [1, 6]] and H (1, 0.5) = (2.5, 4), the latter without forming H.
"""

import torch

import curvscope


def f(x: torch.Tensor) -> torch.Tensor:
    return x[0] ** 2 + x[0] * x[1] + 3 * x[1] ** 2


def main() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.5], dtype=torch.float64)
    print("H =", curvscope.hessian(f, x).tolist())
    print("H v =", curvscope.hvp(f, x, v).tolist())
    print("diag(H) =", curvscope.hessian_diagonal(f, x).tolist())


if __name__ == "__main__":
    main()
