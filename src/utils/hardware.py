"""Pick bf16 only where the hardware runs it fast; resolve `device: auto`.

bf16 matmuls are ~2x faster than fp32 on CPUs with avx512_bf16/AMX, but ~20x *slower* on CPUs without
them (measured on a dev machine: 256x576 @ 576x1536 took 16 ms in fp32 and 386 ms in bf16). `auto`
dtype/precision settings resolve through these functions.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def bf16_is_fast(accelerator: str = "auto") -> bool:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def auto_dtype(accelerator: str = "auto") -> str:
    """'bfloat16' where bf16 is fast, else 'float32'."""
    return "bfloat16" if bf16_is_fast(accelerator) else "float32"


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning precision: 'bf16-mixed' where bf16 is fast, else '32-true'."""
    return "bf16-mixed" if bf16_is_fast(accelerator) else "32-true"


def resolve_device(name: str = "auto") -> torch.device:
    """A `device` setting as a torch.device: "auto" is CUDA when a GPU is visible, else the CPU; anything
    else ("cpu", "cuda", "cuda:1", ...) as torch reads it (RuntimeError from torch on a malformed name)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def accelerator_problems(accelerator: str | None, key: str, recipe_hint: bool = False) -> list[str]:
    """`key={accelerator}` asks for a CUDA GPU (gpu / cuda) on a machine without one: one message saying what
    to set instead (`recipe_hint`: name the GPU recipe that set it); [] otherwise."""
    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        hint = (
            " (conf/recipe/_gpu.yaml sets it for hub models: their recipe needs a GPU)" if recipe_hint else ""
        )
        group = " (or trainer=cpu)" if key == "trainer.accelerator" else ""  # only src.train has the group
        return [
            f"{key}={accelerator} but this machine has no CUDA GPU (torch.cuda.is_available() is False){hint}; "
            f"use {key}=cpu{group} to run on the CPU"
        ]
    return []


def device_problems(device: str, key: str) -> list[str]:
    """A `device` setting (auto | cpu | cuda[:n]) this machine can run: one message naming `key` for another
    value or a CUDA device without a GPU; [] otherwise."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        return [f"{key} must be auto, cpu or cuda[:n], got {device!r}"]
    return accelerator_problems("cuda" if device.startswith("cuda") else device, key)
