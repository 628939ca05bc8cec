"""Build ember: the Python package, the Triton kernels (as ember.kernels) and the ember._C extension.

ember._C holds the C++ CPU kernels and, in CUDA builds, the CUDA kernels with their torch glue.
CUDA is built only when torch itself is a CUDA build *and* a CUDA toolkit is found; nvcc alone is not
enough (a CPU torch has no c10/cuda headers to build the glue against).

Environment:
  EMBER_NO_EXT=1            pure-Python install (reference + Triton backends only)
  EMBER_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0a" (passed on as TORCH_CUDA_ARCH_LIST)
  MAX_JOBS                  parallel compile jobs (torch.utils.cpp_extension)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("EMBER_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("EMBER_CUDA_ARCH_LIST", "8.0;9.0a"))
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_glue.cpp")
        ext = cpp_extension.CUDAExtension(
            "ember._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("EMBER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "ember._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["ember", "ember.ops", "ember.nn", "ember.kernels"],
    package_dir={"ember": "pyext/ember", "ember.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
