"""CPU custom calls (oneDNN) behind jax.ffi."""
