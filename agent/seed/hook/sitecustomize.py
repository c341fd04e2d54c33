"""torchwarm's precompile hook (torchwarm.seed.hook), run by Python at the start of every
process of a command workload that is warmed up as `precompile`: the folder holding this
file is first on that process's PYTHONPATH, and that is the only marker (the process gets
no TORCHWARM_* variable, and this file does nothing anywhere else because it is found
nowhere else).

At start: TORCH_CACHING_PRECOMPILE=1, before torch is imported (torch reads it once),
then the sitecustomize module this one shadows, if there is one. At exit, if the process
imported torch: torchwarm.seed.hook.at_exit (saves the Dynamo entries, records what was
imported, prints the counters). Standard library only until then, so that a process
that never imports torch pays nothing.
"""

import atexit
import os
import signal
import sys

os.environ["TORCH_CACHING_PRECOMPILE"] = "1"
_HERE = os.path.dirname(os.path.abspath(__file__))
_AT_START = frozenset(sys.modules)  # the interpreter's own start: site, .pth imports
_PATH_AT_START = tuple(sys.path)  # complete: site runs this module last


def _chain() -> None:
    """Run the sitecustomize that this one hides (a distribution's or the system's)."""
    import importlib.machinery
    import importlib.util

    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _at_exit() -> None:
    if "torch" not in sys.modules:
        return
    # Before anything more is imported: every module the command imported, submodules
    # too, by its file, or a namespace package (no file) by its folders.
    files = {}
    for name, module in list(sys.modules.items()):
        try:
            file = getattr(module, "__file__", None)
            if isinstance(file, str):
                files[name] = [file]
            elif module is not None and hasattr(module, "__path__"):
                files[name] = [p for p in module.__path__ if isinstance(p, str)]
        except Exception:  # a lazy or odd module object: nothing to say about its file
            continue
    try:
        from torchwarm.seed import hook
    except ImportError as e:
        print(
            f"torchwarm hook: torchwarm cannot be imported by {sys.executable} ({e}); "
            "run the command with the Python torchwarm is installed in",
            file=sys.stderr,
        )
        return
    hook.at_exit(files, _AT_START, _PATH_AT_START)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # exit handlers run; SIGTERM's default would skip them


_chain()
atexit.register(_at_exit)
# A server stopped with SIGTERM saves its entries too, unless it handles SIGTERM itself
# (then it exits its own way, and exit handlers run if it returns normally).
if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
