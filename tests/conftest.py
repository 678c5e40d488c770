"""Test set-up. Without CUDA, the Triton kernels run through the interpreter: TRITON_INTERPRET=1 must be
set before triton.jit decorates them, i.e. before anything imports lora_kernels.ops."""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    """Runs a test once per backend; 'triton' means the interpreter on a CPU machine."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", request.param)
    return request.param
