"""Metadata lives in pyproject.toml. The optional native code in csrc/ is built only when asked:

    LORA_KERNELS_BUILD_CSRC=1 pip install -e .
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("LORA_KERNELS_BUILD_CSRC") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cu", ".cpp"))]
    if sources:
        ext_modules.append(CUDAExtension("lora_kernels._C", sources))
        cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
