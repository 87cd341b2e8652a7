"""Benchmarks behind `hybrid-lm bench`: one module per benchmark (kernels, ...); common.py holds what they share."""
