"""Builds solov2_d2, with its C++ CPU kernels (``solov2_d2._C``) when torch and a compiler exist.

Metadata and dependencies are in ``setup.cfg``. The kernels are compiled against the torch that
is installed when this runs, so install torch first and build without isolation:
``pip install --no-build-isolation -e .`` (``make setup`` does). Without torch in the build
environment, or without a working compiler, the package installs without the extension and
uses its PyTorch code (same results, slower; ``solov2_d2.modeling.native.status()`` says why).
``SOLOV2_D2_NATIVE=0`` at install time skips the build.
"""

import os
import platform
import sys

from setuptools import setup

CSRC = os.path.join("solov2_d2", "modeling", "csrc")
SOURCES = ["bindings.cpp", "mask_upsample.cpp", "mask_intersections.cpp"]


def _extension_and_command():
    if os.environ.get("SOLOV2_D2_NATIVE", "1").strip() in ("0", "false", "False", "no"):
        print("solov2_d2: SOLOV2_D2_NATIVE=0, building without the C++ kernels")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "solov2_d2: torch is not importable in this build environment, so the C++ kernels "
            "are not built (the PyTorch code is used). Install torch first and build with "
            "`pip install --no-build-isolation .` to get them."
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the package installable: it names what failed and goes on."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # no compiler, no headers, a compile error
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                print(
                    f"solov2_d2: WARNING: the C++ kernels failed to build ({first_line}); "
                    "installing without them (the PyTorch code is used; compiler output above)",
                    file=sys.stderr,
                )
                # Nothing to copy or package: the install goes on without solov2_d2._C.
                self.extensions = []
                self.distribution.ext_modules = []

    # -ffp-contract=off: the final-mask kernel must not fuse multiply-adds (mask_upsample.cpp).
    # -mpopcnt: one instruction per 64-bit popcount in the Matrix NMS intersections (every
    # x86-64 CPU since 2008 has it; -march=native would tie the build to the build machine).
    flags = ["-O3", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mpopcnt")
    extension = CppExtension(
        "solov2_d2._C",
        [os.path.join(CSRC, name) for name in SOURCES],
        include_dirs=[os.path.abspath(CSRC)],
        # A bare token, made a string in bindings.cpp: quotes would not survive ninja's shell.
        define_macros=[("SOLOV2_D2_TORCH_VERSION", torch.__version__)],
        extra_compile_args=flags,
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_and_command()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
