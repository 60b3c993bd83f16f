"""Model zoo: open LLMs' config dims -> their quantized matmul shapes and table coverage; imports kernels and farm.measure only."""
