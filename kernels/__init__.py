"""Triton kernels, installed as ``swarm.kernels``."""
