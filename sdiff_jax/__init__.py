"""sdiff_jax: Seed Diffusion in JAX/Flax."""

__version__ = "0.1.0"
