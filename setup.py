"""Builds costeff._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build.

COSTEFF_CUDA=1 forces the CUDA kernels (fails clearly on a CPU-only torch), COSTEFF_CUDA=0 skips
them, unset means "when torch has CUDA and nvcc is found". Install with
`pip install --no-build-isolation -e .` so the extension is built against the installed torch.
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only hit on a machine without torch
    sys.exit(
        "costeff: torch must be installed before building (pip install torch==2.13.0), and the "
        "build must see it: pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # +PTX: GPUs newer than sm_90 JIT-compile the kernels


def _want_cuda() -> bool:
    flag = os.environ.get("COSTEFF_CUDA", "").strip().lower()
    has_cuda_torch = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "on", "yes"):
        if torch.version.cuda is None:
            sys.exit(
                f"costeff: COSTEFF_CUDA=1 but the installed torch {torch.__version__} is a CPU-only "
                "build; install a CUDA torch or unset COSTEFF_CUDA."
            )
        if cpp_extension.CUDA_HOME is None:
            sys.exit("costeff: COSTEFF_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME.")
        return True
    if flag in ("0", "false", "off", "no"):
        return False
    return has_cuda_torch


def _pip_cuda_include_dirs() -> list:
    """cuBLAS/cuSPARSE headers shipped by the CUDA torch wheel's nvidia-* packages: a bare toolkit
    (nvcc only) lacks them and ATen/cuda/CUDAContext.h includes them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "cu*", "include"))) + sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return found


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/registration.cpp", "csrc/op_checks.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/engine/**/*.cpp", recursive=True))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp" if sys.platform != "darwin" else "-Xpreprocessor"]
    define_macros = [("COSTEFF_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _pip_cuda_include_dirs()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # cpp_extension crashes when it has neither a GPU to query nor an arch list (pytorch#137261)
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        return cpp_extension.CUDAExtension(
            "costeff._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "costeff._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def _requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="costeff",
    version="0.1.0",
    description="COST-EFF: slenderized multi-exit BERT classifiers with fused CPU/CUDA/Triton kernels",
    package_dir={"costeff": "python/costeff", "costeff_kernels": "costeff_kernels"},
    packages=["costeff_kernels"] + ["costeff." + p for p in find_packages("python/costeff")] + ["costeff"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.13", "numpy", "safetensors", "tqdm", "transformers", "datasets", "matplotlib"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "expecttest"], "onnx": _requirements("onnx.txt"),
                    "serve": _requirements("serve.txt")},
    entry_points={"console_scripts": ["costeff=costeff.cli:main"]},
)
