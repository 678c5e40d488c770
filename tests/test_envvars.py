"""lora_kernels.envvars.getenv: the same answers as os.environ.get, whichever way the variable was set."""
import os

import pytest

from lora_kernels.envvars import getenv

NAME = "LORA_KERNELS_TEST_ENVVAR"


def test_getenv_agrees_with_os_environ(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert getenv(NAME) == "" and getenv(NAME, "auto") == "auto"
    for value in ("csrc", "", " fused ", "d\u00e9j\u00e0"):
        monkeypatch.setenv(NAME, value)
        assert getenv(NAME, "auto") == os.environ.get(NAME, "auto") == value
    os.environ[NAME] = "dequant"
    assert getenv(NAME) == "dequant"
    del os.environ[NAME]
    assert getenv(NAME, "x") == "x"


def test_getenv_without_the_bytes_mapping(monkeypatch):
    """A replaced os.environ (a plain dict) is read with its own get."""
    monkeypatch.setattr(os, "environ", {NAME: "fused"})
    assert getenv(NAME) == "fused" and getenv(NAME + "_UNSET", "auto") == "auto"


@pytest.mark.skipif(os.name != "posix", reason="the fast read is POSIX-only")
def test_getenv_reads_the_live_mapping():
    assert type(getattr(os.environ, "_data", None)) is dict  # else getenv falls back (correct, slower)
