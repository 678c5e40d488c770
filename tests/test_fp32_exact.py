"""fp32 activations with a 4-bit weight are the exact path: the decoded W stays fp32 (code * scale, never
rounded to 16 bits) in the forward and in dx. With x = I the forward returns W^T itself, and with dy = I dx
returns W, so any rounding of the decoded W on the way to the product shows as a mismatch."""
import pytest
import torch

import lora_kernels as lk
from tests._util import quantized


@pytest.mark.parametrize("k", [70, 65, 128], ids=["k-even", "k-odd", "k-aligned"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_fp32_path_keeps_the_decoded_weight_exact(backend, k, nested):
    n = 40
    packed, state, _ = quantized(n, k, dtype=torch.bfloat16, nested=nested)
    w = lk.dequantize_4bit(packed, state, dtype=torch.float32)
    assert not torch.equal(w, w.to(torch.bfloat16).float())  # a 16-bit rounding of W would change it
    x = torch.eye(k, dtype=torch.float32, requires_grad=True)
    y = lk.qlora_linear(x, packed, state, None, None, 1.0)
    assert torch.equal(y, w.t())
    y.backward(torch.eye(k, n, dtype=torch.float32))  # dy = I (k x n): dx = dy W, W padded with zero rows
    assert torch.equal(x.grad, torch.eye(k, n) @ w)
