"""Triton kernels, one file per family: jit kernels, their launchers, the autograd glue.

Importing this package imports triton; `triton.jit` decides at that moment whether kernels run through
the CPU interpreter (TRITON_INTERPRET=1), so set that variable before importing lora_kernels.ops.
"""
