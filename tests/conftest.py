import os
import tempfile

import pytest
import torch

# Triton's CPU interpreter must be on before fgattn defines its kernels (at import); conftest runs
# before any test module imports fgattn. With CUDA the kernels compile and run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's compiled-code cache per torch release: CI runs the suite under two releases on one
# machine, and a cache entry of the newer one failed to build (C++) under the older.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"torchinductor_fgattn_{torch.__version__}"),
)

from fgattn import backends
from fgattn.ops import registry

if registry.TRITON_MISSING:
    KERNELS_RUN, WHY_NOT = False, registry.TRITON_MISSING
else:
    from fgattn.ops.triton.library import interpreting

    KERNELS_RUN = torch.cuda.is_available() or interpreting()
    WHY_NOT = (
        "fgattn's Triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU: "
        "run the tests without setting TRITON_INTERPRET=0"
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `kernels` run fgattn's Triton kernels: on a GPU, or on CPU tensors under the
    interpreter. Where neither is possible they are skipped, saying why."""
    if KERNELS_RUN:
        return
    skip = pytest.mark.skip(reason=WHY_NOT)
    for item in items:
        if "kernels" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: runs fgattn's Triton kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_fp32():
    # Kernels are compared with the reference's exact fp32 products (on a GPU its bmm must not use
    # TF32); a test that wants TF32 turns it on, and it is turned off again after.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo keeps state per code object across tests: a layer compiled (or strict-exported) in
    # one test makes a later torch.compile of the same layer's forward automatically dynamic, so a
    # test's result would depend on which tests ran before it.
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_settings():
    # A test that changes the global backend or benchmark mode leaves them as they were.
    backend, benchmark = backends.get_backend(), backends.get_benchmark()
    yield
    backends.set_backend(backend)
    backends.set_benchmark(benchmark)
    backends.clear_benchmark_cache()
