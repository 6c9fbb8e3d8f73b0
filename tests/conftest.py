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
