"""Triton kernels for nano-oomb (paged causal attention forward/backward)."""
