"""Build script. The metadata lives in setup.cfg; this file only adds what setup.cfg cannot: the
optional CUDA extension ``fgattn._cuda_ext``, built only when FGATTN_BUILD_CUDA=1:

      FGATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .

  (needs torch with CUDA and nvcc in the build environment, hence --no-build-isolation;
  TORCH_CUDA_ARCH_LIST picks the GPU architectures, e.g. "8.0;9.0"). A plain install builds
  nothing and fgattn works without the extension.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

CSRC = "fgattn/csrc"
# Keep in sync with SOURCES / HEADERS / *_FLAGS in fgattn/ops/cuda_backend.py.
SOURCES = [f"{CSRC}/fgattn_cuda.cpp", f"{CSRC}/fgattn_cuda_kernels.cu"]
HEADERS = [f"{CSRC}/kernels.cuh", f"{CSRC}/ops_impl.h", f"{CSRC}/schema.h"]
CXX_FLAGS = ["-O3", "-Wall"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xcompiler=-Wall"]


def _cuda_home():
    # torch's guess (dirname(dirname(which nvcc))) is wrong for wrapper scripts such as
    # /usr/local/bin/nvcc: take the first candidate that has the CUDA headers.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _cuda_extension():
    if os.environ.get("FGATTN_BUILD_CUDA", "").lower() not in ("1", "true", "yes", "on"):
        return {}
    home = _cuda_home()
    if home is None:
        raise RuntimeError("FGATTN_BUILD_CUDA=1, but no CUDA toolkit (nvcc) found: set CUDA_HOME")
    os.environ["CUDA_HOME"] = home
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as err:
        raise RuntimeError(
            "FGATTN_BUILD_CUDA=1 needs torch in the build environment: "
            "pip install --no-build-isolation -e ."
        ) from err
    ext = CUDAExtension(
        "fgattn._cuda_ext",
        sources=SOURCES,
        depends=HEADERS,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
