import os

import pytest
import torch

# Triton's CPU interpreter must be on before any module (inductor included) imports triton and
# defines kernels; conftest runs first. With CUDA the kernels compile and run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
