"""setup.py's nvcc handling without building anything: where nvcc comes from, the version check, the
one nvcc command line, and that a plain install neither needs nvcc nor imports torch."""
import ast
import importlib.util
import os
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("lk_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() does not run
    return mod


def fake_nvcc(tmp_path, release):
    d = tmp_path / "cu13" / "bin"
    d.mkdir(parents=True)
    (tmp_path / "cu13" / "lib").mkdir()
    p = d / "nvcc"
    p.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_setup_py_does_not_import_torch():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names


def test_plain_install_builds_nothing(setup_py, monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BUILD_CSRC", raising=False)
    assert setup_py.extensions() == ([], {})
    monkeypatch.setenv("LORA_KERNELS_BUILD_CSRC", "1")
    exts, cmds = setup_py.extensions()
    assert exts[0].name == "lora_kernels._csrc" and "csrc/linear_decode.cu" in exts[0].sources
    assert cmds["build_ext"] is setup_py.BuildCsrc


def test_nvcc_lookup_order_and_errors(setup_py, monkeypatch, tmp_path):
    nvcc = fake_nvcc(tmp_path, "13.0")
    monkeypatch.setenv("LORA_KERNELS_NVCC", nvcc)
    assert setup_py.find_nvcc() == (nvcc, "LORA_KERNELS_NVCC")
    assert setup_py.nvcc_version(nvcc) == (13, 0)
    monkeypatch.setenv("LORA_KERNELS_NVCC", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="not an executable"):
        setup_py.find_nvcc()
    monkeypatch.delenv("LORA_KERNELS_NVCC")
    monkeypatch.setenv("PATH", str(tmp_path / "cu13" / "bin"))
    assert setup_py.find_nvcc() == (nvcc, "PATH")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(setup_py, "_wheel_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="nvidia-cuda-nvcc==13.0.88"):
        setup_py.find_nvcc()


def test_too_old_nvcc_is_refused(setup_py, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_KERNELS_NVCC", fake_nvcc(tmp_path, "11.8"))
    from setuptools import Distribution

    cmd = setup_py.BuildCsrc(Distribution())
    with pytest.raises(RuntimeError, match="11.8 .* too old"):
        cmd.build_extension(setup_py.Extension("lora_kernels._csrc", ["csrc/linear_decode.cu"]))


def test_nvcc_command(setup_py, tmp_path):
    nvcc = fake_nvcc(tmp_path, "13.0")
    cmd = " ".join(setup_py.nvcc_command(nvcc, ["csrc/linear_decode.cu"], "out.so"))
    for part in ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90",
                 "-cudart static", f"-L {tmp_path / 'cu13' / 'lib'}", "-shared", "-o out.so"):
        assert part in cmd
