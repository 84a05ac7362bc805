"""Jacobian, JVP and VJP of f(x) = [x1 + x2, x1 * x2, x1^2] at x = (2, 3).

J = [[1, 1], [3, 2], [4, 0]]; J (1, 0) is the first column [1, 3, 4]; J^T (1, 10, 100) = [431, 21].
"""

import torch

import curvscope


def f(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])


def main() -> None:
    x = torch.tensor([2.0, 3.0], dtype=torch.float64)
    jac = curvscope.jacobian(f, x)
    _, jv = curvscope.jvp(f, x, torch.tensor([1.0, 0.0], dtype=torch.float64))
    _, vj = curvscope.vjp(f, x, torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
    print("J =", jac.tolist())
    print("J v =", jv.tolist())
    print("J^T u =", vj.tolist())


if __name__ == "__main__":
    main()
