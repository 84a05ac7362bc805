"""curvscope.derivatives (being built)."""

__all__: list[str] = []
