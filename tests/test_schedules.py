"""Tests for sdiff_jax.schedules."""

import jax
import numpy as np
import pytest

from sdiff_jax import schedules

GAMMA_NAMES = ["linear", "cosine", "poly2", "poly3", "poly0.5"]


@pytest.mark.parametrize("name", GAMMA_NAMES)
def test_gamma_endpoints_and_monotone(name):
  sched = schedules.get_gamma_schedule(name)
  assert sched.name == name
  np.testing.assert_allclose(sched.gamma(0.0), 0.0, atol=1e-7)
  np.testing.assert_allclose(sched.gamma(1.0), 1.0, rtol=1e-6)
  gamma_T = np.asarray(sched.gamma(np.linspace(0.0, 1.0, 1001)))
  assert np.all(np.diff(gamma_T) > 0)


@pytest.mark.parametrize("name", GAMMA_NAMES)
def test_dgamma_matches_finite_difference(name):
  sched = schedules.get_gamma_schedule(name)
  t_T, h = np.linspace(0.05, 0.95, 19), 1e-3
  # f32 central difference: rounding error ~1e-7/h = 1e-4, truncation ~h^2 -> rtol 1e-3.
  fd_T = (np.asarray(sched.gamma(t_T + h)) - np.asarray(sched.gamma(t_T - h))) / (2 * h)
  np.testing.assert_allclose(sched.dgamma(t_T), fd_T, rtol=1e-3)


@pytest.mark.parametrize("name", GAMMA_NAMES)
def test_elbo_weight_is_dgamma_over_gamma(name):
  sched = schedules.get_gamma_schedule(name)
  t_T = np.geomspace(1e-3, 1.0, 50)
  ratio_T = np.asarray(sched.dgamma(t_T), np.float64) / np.asarray(sched.gamma(t_T), np.float64)
  np.testing.assert_allclose(schedules.elbo_weight(sched, t_T), ratio_T, rtol=1e-5)
  tiny_T = np.asarray(schedules.elbo_weight(sched, np.array([1e-12, 1e-20])))
  assert np.all(np.isfinite(tiny_T)) and np.all(tiny_T > 0)


@pytest.mark.parametrize("name", ["quadratic", "poly", "poly0", "poly-1", "polyx", "polyinf"])
def test_unknown_gamma_rejected_with_valid_names(name):
  with pytest.raises(ValueError, match="linear, cosine, polyK"):
    schedules.get_gamma_schedule(name)


def test_alpha_schedules():
  t_T = np.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(schedules.get_alpha_schedule("linear").alpha(t_T), 0.1 * t_T)
  const = schedules.get_alpha_schedule("constant", alpha_max=0.05)
  np.testing.assert_allclose(const.alpha(t_T), np.full(11, 0.05))
  assert const.alpha_max == 0.05
  with pytest.raises(ValueError, match="alpha_max"):
    schedules.get_alpha_schedule("linear", alpha_max=-0.1)
  with pytest.raises(ValueError, match="alpha_max"):
    schedules.get_alpha_schedule("linear", alpha_max=1.0)
  with pytest.raises(ValueError, match="linear, constant"):
    schedules.get_alpha_schedule("cosine")


@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_times_range(antithetic):
  eps = 1e-3
  t_B = np.asarray(schedules.sample_times(jax.random.key(0), 4096, eps, antithetic))
  assert t_B.shape == (4096,) and t_B.dtype == np.float32
  assert t_B.min() >= eps and t_B.max() <= 1.0
  assert abs(t_B.mean() - (1 + eps) / 2) < 0.02  # U(eps, 1): std of the mean <= 0.0045


def test_sample_times_antithetic_spacing():
  batch, eps = 64, 1e-3
  t_B = np.sort(np.asarray(schedules.sample_times(jax.random.key(1), batch, eps)))
  np.testing.assert_allclose(np.diff(t_B), (1 - eps) / batch, rtol=1e-4)
  other_B = np.sort(np.asarray(schedules.sample_times(jax.random.key(2), batch, eps)))
  assert not np.allclose(t_B, other_B)
