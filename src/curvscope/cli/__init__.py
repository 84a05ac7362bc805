"""The command-line interface (being built)."""


def main() -> None:
    raise SystemExit("curvscope: the command-line interface is not built yet")
