"""The fast csrc decode's error, emulated in PyTorch on CPU (no GPU): its arithmetic as csrc/README.md
describes it, against the op's contract (error at most about 2x PyTorch's own bf16 error, DESIGN.md).

    python csrc/emulate_precision.py

prescaled (blocksize 64): bf16(code) * bf16(scale) rounded to bf16, then bf16 x bf16 products summed in
fp32; scale-after (blocksize >= 128): bf16 codes, per-block partial sums times the fp32 scale. The oracle
is fp64 with bitsandbytes' decoded W (fp32 code * scale, one rounding); "PyTorch's" is x @ W in bf16.
Accumulation is emulated in fp64 (fp32's own error is far below bf16's). An emulation, not a GPU figure.
"""
import torch

torch.manual_seed(0)
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def bf(t):
    return t.to(torch.bfloat16).to(torch.float64)


for code_name, code in (("nf4", NF4), ("random", torch.sort(torch.rand(16) * 2 - 1).values)):
    for n, k, m in ((1024, 4096, 16), (1024, 14336, 16), (1024, 4096, 1)):
        for bs in (64, 128):
            idx = torch.randint(0, 16, (n, k))
            scale = (torch.rand(n * k // bs) * 0.1 + 0.01).float()  # fp32 absmax
            sc = scale.repeat_interleave(bs).reshape(n, k)
            w_bnb = (code[idx].float() * sc).to(torch.bfloat16)  # fp32 product, one rounding
            x = torch.randn(m, k).to(torch.bfloat16)
            oracle = x.double() @ w_bnb.double().t()
            native = (x @ w_bnb.t()).double()
            if bs == 64:  # prescaled: bf16(code) * bf16(scale) rounded to bf16, fp32 accumulation
                w_fast = (bf(code)[idx] * bf(sc)).to(torch.bfloat16).double()
                y = x.double() @ w_fast.t()
            else:  # scale-after: bf16 codes, per-block fp32 partial sums times the fp32 scale
                cb = bf(code)[idx].reshape(n, k // bs, bs)
                xb = x.double().reshape(m, k // bs, bs)
                part = torch.einsum("mbi,nbi->mnb", xb, cb)
                y = (part * scale.double().reshape(n, k // bs)[None]).sum(-1)
            y = bf(y)
            e, r = (y - oracle).abs().max().item(), (native - oracle).abs().max().item()
            print(f"{code_name:6s} {n}x{k} M={m} bs={bs:3d} {'prescaled ' if bs == 64 else 'scale-after'}: "
                  f"error {e:.3e} / PyTorch's {r:.3e} = {e / r:.2f}x")
