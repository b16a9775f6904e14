"""hardware.py: native-bf16 detection and the glibc malloc tuning the CPU trainer applies."""

import subprocess
import sys

import pytest

from distillgate import hardware


def test_native_bf16_is_a_bool_and_cuda_false_without_cuda():
    import torch

    assert isinstance(hardware.native_bf16("cpu"), bool)
    if not torch.cuda.is_available():
        assert hardware.native_bf16("cuda") is False


_PROBE = """
from distillgate import hardware
print(hardware.tune_malloc(), hardware.tune_malloc())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_applies_once_and_can_be_turned_off():
    on = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert on == ["True", "True"]
    import os

    env = {**os.environ, "DISTILLGATE_MALLOC_TUNING": "0"}
    off = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert off == ["False", "False"]
