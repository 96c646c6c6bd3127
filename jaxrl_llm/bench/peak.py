"""This machine's measured ceilings (``jaxrl_llm.observe.peak``), for ``python -m jaxrl_llm.bench peak``."""

from ..observe.peak import machine_peaks, matmul_flops_per_s, memory_bytes_per_s, timed

__all__ = ["machine_peaks", "matmul_flops_per_s", "memory_bytes_per_s", "timed"]
