"""Higher derivatives of y = x^3 at x = 3 by nested forward mode: 27, 18, 6, then 0."""

import torch

import curvscope


def main() -> None:
    x = torch.tensor(3.0, dtype=torch.float64)
    for order in range(1, 5):
        value = curvscope.derivative(lambda t: t**3, x, order=order)
        print(f"order {order}: {value.item():g}")


if __name__ == "__main__":
    main()
