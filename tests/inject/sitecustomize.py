"""Fault injection for fresh-process tests: Python imports this module at start-up when
tests/inject is on PYTHONPATH. $TORCHWARM_TEST_INJECT="module:attribute:action" replaces
one function of the code under test (the real code otherwise) with a fault:

    raise        a RuntimeError (any exception from anywhere)
    oserror      OSError EIO (an I/O error while reading)
    c-sleep      sleep in C for an hour (a call Python cannot interrupt)
    kill-self    SIGKILL this process (a worker the OOM killer took)
    roomy        os.statvfs that reports a huge free space (so the real disk fills up)
    slow         sleep 2 s, then the real call (a store that is slow to answer)

With $TORCHWARM_TEST_INJECT_ONLY set, only calls whose arguments' repr contains it get the
fault; the others run the real function. With $TORCHWARM_TEST_INJECT_SKIP=N, the first N
calls that would get the fault run the real function (to reach, say, a function's second
call, where its first would fault too).
"""

import os

_SPEC = os.environ.get("TORCHWARM_TEST_INJECT")


def _install(spec: str) -> None:
    import importlib
    import signal

    module_name, attribute, action = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    only = os.environ.get("TORCHWARM_TEST_INJECT_ONLY")
    skip = [int(os.environ.get("TORCHWARM_TEST_INJECT_SKIP", "0"))]

    def fault(*args, **kwargs):
        if only and only not in repr((args, kwargs)):
            return real(*args, **kwargs)
        if skip[0] > 0:
            skip[0] -= 1
            return real(*args, **kwargs)
        if action == "raise":
            raise RuntimeError("injected fault")
        if action == "oserror":
            raise OSError(5, "Input/output error (injected)")
        if action == "c-sleep":
            import ctypes

            ctypes.CDLL(None).sleep(3600)
        if action == "kill-self":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "slow":
            import time

            time.sleep(2)
        if action == "roomy":
            st = real(*args, **kwargs)
            return os.statvfs_result(
                (
                    st.f_bsize,
                    st.f_frsize,
                    1 << 40,
                    1 << 40,
                    1 << 40,
                    st.f_files,
                    st.f_ffree,
                    st.f_favail,
                    st.f_flag,
                    st.f_namemax,
                )
            )
        return real(*args, **kwargs)

    setattr(owner, name, fault)


if _SPEC:
    _install(_SPEC)
