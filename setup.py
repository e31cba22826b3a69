"""Install m2f_kernels (and the m2f reference model).

Always installs without a GPU. The CUDA extension ``m2f_kernels._C`` is built only
when torch with CUDA and nvcc are importable at build time (use
``pip install --no-build-isolation -e .`` so the build sees your torch);
``M2F_KERNELS_SKIP_CUDA_BUILD=1`` skips it, ``M2F_KERNELS_FORCE_CUDA=1`` builds it
even without a visible GPU. Without a toolkit this is a one-line notice, never a
failed install.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# Peak host memory of one nvcc / c++ job on these sources (torch headers plus device code).
_GIB_PER_COMPILE_JOB = 2.5


def _max_jobs() -> int:
    """Parallel compile jobs: the CPU count, bounded so the jobs fit in available memory."""
    cpus = os.cpu_count() or 1
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: trust the CPU count
        return cpus
    return max(1, min(cpus, int(available / 2**30 / _GIB_PER_COMPILE_JOB)))


def cuda_extension():
    """The extension list and the cmdclass that builds it, or ([], {}) with a notice."""
    if os.environ.get("M2F_KERNELS_SKIP_CUDA_BUILD") == "1":
        print("m2f_kernels: M2F_KERNELS_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return [], {}  # the CUDA kernels land with issue 9
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("m2f_kernels: torch is not importable at build time, not building the CUDA extension "
              "(pip install --no-build-isolation to build it)")
        return [], {}
    forced = os.environ.get("M2F_KERNELS_FORCE_CUDA") == "1"
    if torch.version.cuda is None or CUDA_HOME is None or not (forced or torch.cuda.is_available()):
        print("m2f_kernels: no CUDA torch / nvcc / GPU found, not building the CUDA extension "
              "(M2F_KERNELS_FORCE_CUDA=1 to build anyway)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(_max_jobs()))
    ext = CUDAExtension(
        "m2f_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="m2f_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for Mask2Former: masked attention, "
                "multi-scale deformable attention, point-sampled mask loss",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["m2f_kernels", "m2f_kernels.*", "m2f", "m2f.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # the ONNX stack pinned for the tests (the versions they ran with), loose for users
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "scipy", "matplotlib", "pillow", "tqdm", "nvidia-ml-py",
                 "transformers==5.17.0", "onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0",
                 "pycocotools"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "train": ["scipy", "matplotlib", "pillow", "tqdm"],
        "bench": ["pytest", "pytest-benchmark", "matplotlib", "nvidia-ml-py"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
