"""Test set-up. Without CUDA, the Triton kernels run through the interpreter: TRITON_INTERPRET=1 must be
set before triton.jit decorates them, i.e. before anything imports lora_kernels.ops."""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def _interpreter_numpy_shim():
    """triton 3.6's interpreter turns a loop bound into a Python int with int(1-element array)
    (`range(0, K, BLOCK_K)`), which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); triton 3.9 reads the element instead. Where both hold, read the element the same way.
    Nothing changes on a stack without the problem."""
    import inspect

    import numpy as np

    try:
        int(np.zeros(1))
        return  # this numpy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data)" not in inspect.getsource(patch):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_shim()

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


@pytest.fixture(autouse=True)
def _interpreter_routes_small_m_to_fused(monkeypatch):
    """On a GPU the auto path decodes to a buffer at every M (configs.DEQUANT_PATH_MIN_M, measured). Under the
    interpreter the tests keep the earlier crossover (512), so that the auto path still runs the fused 4-bit
    kernels at small M and every test that goes through it checks them."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from lora_kernels.ops import configs

        monkeypatch.setattr(configs, "DEQUANT_PATH_MIN_M", 512)
