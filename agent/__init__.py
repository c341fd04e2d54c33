"""torchwarm: ship torch.compile caches from a warm seed machine to every new node, verified."""

__version__ = "0.1.0"
