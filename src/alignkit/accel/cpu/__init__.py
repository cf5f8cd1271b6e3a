"""The `cpu` acceleration backend (see `alignkit.accel.cpu.backend`)."""

from alignkit.accel.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
