"""Builds ordercomp._C with torch.utils.cpp_extension.

Environment switches:
  ORDERCOMP_BUILD_EXT=0     build no compiled library (the package runs on its PyTorch references)
  ORDERCOMP_BUILD_CUDA=auto build the CUDA kernels when torch has CUDA and a toolkit is found (default);
                       =1   require them (fail if impossible); =0 never build them
  ORDERCOMP_NATIVE=1        compile the CPU kernels for this machine's instruction set (-march=native)
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _want_cuda(cuda_home) -> bool:
    import torch

    mode = _flag("ORDERCOMP_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"ORDERCOMP_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        raise SystemExit(
            "ORDERCOMP_BUILD_CUDA=1 but CUDA kernels cannot be built: "
            f"torch CUDA version {torch.version.cuda}, CUDA toolkit {cuda_home}"
        )
    return mode == "1" or (mode == "auto" and possible)


def extensions():
    if _flag("ORDERCOMP_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv"]
    if _flag("ORDERCOMP_NATIVE", "0") == "1":
        cxx.append("-march=native")
    sources = ["csrc/ops.cpp", "csrc/cpu/kernels.cpp"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if _want_cuda(CUDA_HOME):
        kwargs["extra_compile_args"]["cxx"].append("-DORDERCOMP_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DORDERCOMP_WITH_CUDA"]
        ext = CUDAExtension("ordercomp._C", sources + ["csrc/cuda/kernels.cu"], **kwargs)
    else:
        ext = CppExtension("ordercomp._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
