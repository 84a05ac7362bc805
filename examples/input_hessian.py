"""Hessian of a classifier's negative log-likelihood with respect to its input, and its diagonal.

The built-in digits MLP (64-32-10, tanh) is trained briefly; for one image x with label y the
NLL is -log softmax(f(x))_y. Its 64 x 64 input Hessian (curvscope.hessian) and its diagonal
(curvscope.hessian_diagonal, without forming the matrix) are computed and compared.
"""

import torch

import curvscope


def main() -> None:
    model, _, data = curvscope.digits_example(steps=100, dtype=torch.float64)
    inputs, labels = data[0]
    image, label = inputs[0], labels[0]

    def nll(x: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(model(x), dim=-1)[label]

    hessian = curvscope.hessian(nll, image)
    diagonal = curvscope.hessian_diagonal(nll, image)
    print(f"NLL of image 0 (label {int(label)}): {nll(image).item():.6f}")
    print(f"input Hessian: shape {tuple(hessian.shape)}, symmetric: "
          f"{torch.allclose(hessian, hessian.T)}")  # fmt: skip
    eigenvalues = torch.linalg.eigvalsh(hessian)
    print("largest eigenvalues:", ", ".join(f"{v:.4g}" for v in eigenvalues.flip(0)[:3].tolist()))
    print("smallest eigenvalues:", ", ".join(f"{v:.4g}" for v in eigenvalues[:3].tolist()))
    gap = (diagonal - hessian.diagonal()).abs().max().item()
    print(f"diagonal: min {diagonal.min().item():.4g}, max {diagonal.max().item():.4g}, "
          f"max |diagonal - diag(H)| = {gap:.2g}")  # fmt: skip
    pixel = int(diagonal.abs().argmax())
    print(f"most curved pixel: {pixel} (row {pixel // 8}, column {pixel % 8})")


if __name__ == "__main__":
    main()
