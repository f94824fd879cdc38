"""Gemma 3 in plain JAX: parameter description, forward pass, weight loaders."""
