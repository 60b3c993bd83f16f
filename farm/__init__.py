"""kernel-farm: measure, aggregate and ship autotune tables for Inductor's quantized CPU matmuls."""

__version__ = "0.1.0"
