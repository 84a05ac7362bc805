"""Closed forms on a random 2x2 input: the Jacobian of elementwise log is diag(1/x), and the
Hessian of sum(sqrt(x)) is diag(-x^(-3/2) / 4)."""

import torch

import curvscope


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, generator=generator, dtype=torch.float64) + 0.5
    jac = curvscope.jacobian(torch.log, x, flat=True)
    hess = curvscope.hessian(lambda y: torch.sqrt(y).sum(), x, flat=True)
    log_error = (jac - torch.diag(1 / x.reshape(-1))).abs().max().item()
    sqrt_error = (hess - torch.diag(-0.25 * x.reshape(-1) ** -1.5)).abs().max().item()
    print("x =", x.tolist())
    print(f"max |J_log - diag(1/x)| = {log_error:.1e}")
    print(f"max |H_sqrt - diag(-x^-1.5/4)| = {sqrt_error:.1e}")


if __name__ == "__main__":
    main()
