"""torchwarm: ship torch.compile caches from a warm seed machine to every new node, verified.

The command line is `torchwarm`; from Python, `torchwarm.pull(...)` and
`torchwarm.activate(report)` (api.py). Importing this package imports neither torch nor
a cloud SDK.
"""

from torchwarm.api import activate, app_env, pull

__version__ = "0.1.0"
__all__ = ["activate", "app_env", "pull", "__version__"]
