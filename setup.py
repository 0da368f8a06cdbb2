"""Builds metroline._C, the packed-weight matmul kernels (csrc/), as a torch C++ extension.

Everything else lives in pyproject.toml. The extension is optional: when torch is missing at
build time or the compiler fails, the install goes on without it and metroline runs its
pure-torch path (metroline.kernels says why). Building needs torch importable by the build,
so install with `pip install --no-build-isolation -e .` (scripts/setup.sh does).
"""

from __future__ import annotations

import os
import re
import sys

from setuptools import setup

SOURCES = [
    "csrc/ops.cpp",
    "csrc/module.cpp",
    "csrc/qmm_scalar.cpp",
    "csrc/qmm_avx2.cpp",
    "csrc/qmm_avx512.cpp",
    *[f"csrc/{n}_{p}.cpp" for n in ("attention", "fused") for p in ("ops", "scalar", "avx2", "avx512")],
    "csrc/layers_ops.cpp",
]
# No -march: each ISA's code is compiled for its target by a pragma in its own file, and
# picked at run time, so one build runs on any x86-64. -ffp-contract=off keeps dequant
# bit-identical to gguf's (no fused d*q+m). -fopenmp is required: this torch's at::parallel_for
# is an inline OpenMP region in the headers and runs serially without it; the library then
# needs libgomp.so.1, which resolves to the one torch already loaded (same soname), so the
# kernels share torch's thread pool and torch.set_num_threads governs them.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]
HINT = "To fix: install a C++17 compiler (g++ >= 9) and run `pip install --no-build-isolation -e .`"
HERE = os.path.dirname(os.path.abspath(__file__))
# pip hides a successful build's output; scripts/setup.sh prints this file when _C is missing.
WARNING_FILE = os.path.join(HERE, "build", "metroline-kernels-warning.txt")


def describe(e: BaseException) -> str:
    """A short reason: a failed compiler command line is hundreds of characters long."""
    msg = " ".join(str(e).split())
    cmd = re.match(r"Command '\[?'?([^',\]]+)", msg)
    src = re.search(r"([\w/.-]+\.cpp)", msg)
    if cmd:
        what = f"compiling {os.path.relpath(src.group(1), HERE)}" if src else "the compiler check"
        return f"{type(e).__name__}: {what} with `{cmd.group(1)}` failed"
    if "compil" in msg.lower():  # ninja's failure names no command: say which compiler
        return f"{type(e).__name__}: {msg} with `{os.environ.get('CXX', 'c++')}`"
    return f"{type(e).__name__}: {msg}"


def warn(reason: str) -> None:
    reason = " ".join(str(reason).split())[:300]
    line = f"metroline: C++ kernels not built ({reason}); running on the torch path, slower. {HINT}"
    print(line, file=sys.stderr, flush=True)
    try:
        os.makedirs(os.path.dirname(WARNING_FILE), exist_ok=True)
        with open(WARNING_FILE, "w") as f:
            f.write(line + "\n")
    except OSError:
        pass


def extension_setup() -> dict:
    if os.environ.get("METROLINE_NO_EXT"):
        warn("METROLINE_NO_EXT is set")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch not importable by the build (build isolation?)
        warn(f"torch not importable at build time: {type(e).__name__}: {e}")
        return {}

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that turns any failure into one warning line."""

        def run(self):
            try:
                super().run()
                if os.path.exists(WARNING_FILE):
                    os.remove(WARNING_FILE)
            except BaseException as e:  # noqa: BLE001 - the install must go on
                if isinstance(e, KeyboardInterrupt):
                    raise
                warn(describe(e))

    ext = CppExtension(
        "metroline._C",
        SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )
    # torch's BuildExtension uses ninja when it is installed (parallel, incremental) and plain
    # setuptools otherwise.
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**extension_setup())
