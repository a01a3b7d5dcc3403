"""Neuron Atlas: a database-backed atlas of the MLP neurons of causal language models."""

__version__ = "0.1.0"
