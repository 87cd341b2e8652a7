"""Benchmarks behind `hybrid-lm bench`: one module per benchmark (kernels, ...)."""
