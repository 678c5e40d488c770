"""Metadata lives in pyproject.toml. The optional CUDA library in csrc/ is built only when asked:

    LORA_KERNELS_BUILD_CSRC=1 pip install -e .

It is a plain shared library with a C ABI (loaded by lora_kernels/csrc.py through ctypes), built
by one nvcc call: nvcc from $LORA_KERNELS_NVCC, else PATH, else PyPI's wheels
(nvidia-cuda-nvcc==13.0.88 with nvidia-nvvm/nvidia-cuda-crt/nvidia-cuda-runtime 13.0.*, and
nvidia-cuda-cccl: nvidia/cu13/bin/nvcc in site-packages). No GPU is needed to build; torch is not
imported. A plain `pip install -e .` never looks for nvcc.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MIN_NVCC = (12, 0)  # sm_90 SASS and the PTX features the kernel uses
ARCHS = ("80", "90")  # SASS for both, plus compute_90 PTX for newer GPUs
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _wheel_nvcc():
    """nvidia/cu13/bin/nvcc from PyPI's nvcc wheels, in any site-packages or sys.path entry."""
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    venv = os.environ.get("VIRTUAL_ENV")  # pip's isolated build env hides the user's venv from sys.path
    if venv:
        roots += glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    for root in dict.fromkeys(r for r in roots if r):
        for sub in ("cu13", "cu12", "cuda_nvcc"):
            cand = os.path.join(root, "nvidia", sub, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


def find_nvcc():
    """(path to nvcc, how it was found); raises RuntimeError saying what to install."""
    env = os.environ.get("LORA_KERNELS_NVCC")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise RuntimeError(f"LORA_KERNELS_NVCC={env!r} is not an executable file")
        return env, "LORA_KERNELS_NVCC"
    path = shutil.which("nvcc")
    if path:
        return path, "PATH"
    wheel = _wheel_nvcc()
    if wheel:
        return wheel, "PyPI wheel"
    raise RuntimeError(
        "LORA_KERNELS_BUILD_CSRC=1 but no nvcc was found (not in $LORA_KERNELS_NVCC, PATH or site-packages). "
        "Install the CUDA 13.0 compiler wheels:\n"
        "  pip install nvidia-cuda-nvcc==13.0.88 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' "
        "'nvidia-cuda-runtime==13.0.*' nvidia-cuda-cccl\n"
        "or put a CUDA >= 12.0 toolkit's nvcc on PATH. Unset LORA_KERNELS_BUILD_CSRC to install without it.")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.(\d+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"{nvcc} --version failed or printed no release:\n{out.stdout}{out.stderr}")
    return int(m.group(1)), int(m.group(2))


def nvcc_command(nvcc, sources, output):
    """The one nvcc invocation: sm_80 + sm_90 SASS, compute_90 PTX, static cudart."""
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
           "--expt-relaxed-constexpr", "-I", CSRC]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-gencode", f"arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}"]
    lib = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "lib")
    if os.path.isdir(lib):  # the wheels' cudart_static; a toolkit's nvcc finds its own
        cmd += ["-L", lib]
    cmd += ["-cudart", "static", *sources, "-o", output]
    return cmd


class BuildCsrc(build_ext):
    """Builds lora_kernels/_csrc*.so with nvcc instead of the C++ compiler setuptools would use."""

    def build_extension(self, ext):
        nvcc, how = find_nvcc()
        version = nvcc_version(nvcc)
        if version < MIN_NVCC:
            raise RuntimeError(f"nvcc {version[0]}.{version[1]} at {nvcc} ({how}) is too old: lora_kernels' "
                               f"csrc/ needs CUDA >= {MIN_NVCC[0]}.{MIN_NVCC[1]} (13.0 matches the GPU image)")
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        cmd = nvcc_command(nvcc, ext.sources, output)
        print(f"lora_kernels: building {os.path.basename(output)} with nvcc {version[0]}.{version[1]} ({how})")
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


def extensions():
    if os.environ.get("LORA_KERNELS_BUILD_CSRC") != "1":
        return [], {}
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(CSRC) if f.endswith(".cu"))
    headers = sorted(os.path.join("csrc", f) for f in os.listdir(CSRC) if f.endswith(".h"))
    return [Extension("lora_kernels._csrc", sources=sources, depends=headers)], {"build_ext": BuildCsrc}


if __name__ == "__main__":  # setuptools runs setup.py as __main__; tests import the helpers above
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
