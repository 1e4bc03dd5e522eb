"""Noise schedules: mask probability gamma_t, edit rate alpha_t, time sampling.

Time is continuous, t in [0, 1]: t = 0 is clean data, t = 1 fully corrupted
(gamma(1) = 1: every token is MASK). All functions map f32[...] -> f32[...].
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

ScheduleFn = Callable[[jax.Array], jax.Array]

GAMMA_SCHEDULES = ("linear", "cosine", "polyK (gamma = t**K, K > 0: poly2, poly3, poly0.5, ...)")
ALPHA_SCHEDULES = ("linear", "constant")


class GammaSchedule(NamedTuple):
  """Mask probability gamma(t), its derivative, and the ELBO weight gamma'/gamma.

  `weight` is gamma'(t)/gamma(t) in closed form, exact for every t > 0, where the
  ratio of the two computed values loses precision or underflows as t -> 0.
  """

  name: str
  gamma: ScheduleFn
  dgamma: ScheduleFn
  weight: ScheduleFn


class AlphaSchedule(NamedTuple):
  """Edit rate alpha(t) in [0, alpha_max]: k_t = floor(len * alpha(t)) edits."""

  name: str
  alpha_max: float
  alpha: ScheduleFn


def _f32(t: jax.Array) -> jax.Array:
  return jnp.asarray(t, jnp.float32)


def _poly(power: float, name: str) -> GammaSchedule:
  return GammaSchedule(
    name=name,
    gamma=lambda t: _f32(t) ** power,
    dgamma=lambda t: power * _f32(t) ** (power - 1.0),
    weight=lambda t: power / _f32(t),
  )


# 1 - cos(pi t / 2) = 2 sin^2(pi t / 4); the second form has no cancellation at small t.
_COSINE = GammaSchedule(
  name="cosine",
  gamma=lambda t: 2.0 * jnp.sin(jnp.pi / 4 * _f32(t)) ** 2,
  dgamma=lambda t: jnp.pi / 2 * jnp.sin(jnp.pi / 2 * _f32(t)),
  weight=lambda t: jnp.pi / 2 / jnp.tan(jnp.pi / 4 * _f32(t)),
)


def get_gamma_schedule(name: str) -> GammaSchedule:
  """Resolves 'linear', 'cosine' or 'polyK' (gamma = t**K, K > 0) to a schedule."""
  if name == "linear":
    return _poly(1.0, name)
  if name == "cosine":
    return _COSINE
  if name.startswith("poly"):
    try:
      power = float(name[len("poly") :])
    except ValueError:
      power = math.nan
    if math.isfinite(power) and power > 0:
      return _poly(power, name)
  raise ValueError(f"Unknown gamma schedule {name!r}; valid: {', '.join(GAMMA_SCHEDULES)}.")


def elbo_weight(schedule: GammaSchedule, t: jax.Array) -> jax.Array:
  """Masked-diffusion ELBO weight gamma'(t)/gamma(t) (continuous time), f32[...]."""
  return schedule.weight(t)


def get_alpha_schedule(name: str, alpha_max: float = 0.1) -> AlphaSchedule:
  """Edit-rate schedule: 'linear' (alpha_max * t) or 'constant' (alpha_max).

  The paper keeps alpha in [0, 0.1]; any alpha_max in [0, 1) is accepted.
  """
  if not 0.0 <= alpha_max < 1.0:
    raise ValueError(f"alpha_max must be in [0, 1) (the paper uses <= 0.1), got {alpha_max}.")
  if name == "linear":
    fn = lambda t: alpha_max * _f32(t)
  elif name == "constant":
    fn = lambda t: jnp.full_like(_f32(t), alpha_max)
  else:
    raise ValueError(f"Unknown alpha schedule {name!r}; valid: {', '.join(ALPHA_SCHEDULES)}.")
  return AlphaSchedule(name=name, alpha_max=alpha_max, alpha=fn)


def sample_times(
  key: jax.Array, batch: int, eps: float = 1e-3, antithetic: bool = True
) -> jax.Array:
  """Diffusion times in [eps, 1], f32[batch].

  antithetic: one uniform offset u plus evenly spaced points, t_i = (u + i/batch) mod 1
  (MD4 / VDM low-discrepancy sampling), which lowers the variance of the batch loss.
  """
  if antithetic:
    u = jax.random.uniform(key, (), jnp.float32)
    t_B = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  else:
    t_B = jax.random.uniform(key, (batch,), jnp.float32)
  return eps + (1.0 - eps) * t_B
