r"""Throughput of the jitted mask and edit corruption (tokens/s), JSON rows.

    python -m sdiff_jax.bench.corruption --batch=64 --seq_len=1024 --repeats=50 \
        --json=/tmp/corruption.json

Compile time is measured apart (lower + compile); the speed is the median of
`repeats` timed calls after warm-up, each ending in block_until_ready.
"""

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sdiff_jax import corruption, schedules
from sdiff_jax.data.tokenizer import NUM_SPECIAL

_BATCH = flags.DEFINE_integer("batch", 64, "Rows per call.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row (all rows full).")
_VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary size, specials included.")
_ALPHA_MAX = flags.DEFINE_float("alpha_max", 0.1, "Edit-rate bound (alpha_t in [0, alpha_max]).")
_WINDOW = flags.DEFINE_integer("edit_window", 4, "Edit window w: at most w targets shift.")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Timed calls; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compiling.")
_JSON = flags.DEFINE_string("json", None, "Write the rows to this file as a JSON list.")


def time_fn(
  fn: Callable[..., Any], args: tuple[Any, ...], *, warmup: int, repeats: int
) -> dict[str, Any]:
  """Compiles `fn` for `args`, then times `repeats` calls after `warmup` untimed ones."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {
    "compile_s": compile_s,
    "median_s": statistics.median(times),
    "min_s": min(times),
    "repeats": repeats,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch, seq_len, vocab = _BATCH.value, _SEQ_LEN.value, _VOCAB.value
  rng = np.random.default_rng(0)
  tokens_BxL = jnp.asarray(rng.integers(NUM_SPECIAL, vocab, (batch, seq_len)), jnp.int32)
  key = jax.random.key(0)
  t_B = schedules.sample_times(jax.random.key(1), batch)
  gamma_B = schedules.get_gamma_schedule("linear").gamma(t_B)
  alpha_B = schedules.get_alpha_schedule("linear", _ALPHA_MAX.value).alpha(t_B)
  mask_fn = lambda k, x, g: corruption.mask_corrupt(k, x, g, x > 0)
  edit_fn = lambda k, x, seg, pos, a: corruption.edit_corrupt_batch(
    k, x, seg, pos, a, vocab_size=vocab, window=_WINDOW.value, alpha_max=_ALPHA_MAX.value
  )
  segment_ids_BxL = jnp.ones((batch, seq_len), jnp.int32)  # one document per row
  positions_BxL = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  device = jax.devices()[0]
  rows = []
  for name, fn, args in [
    ("mask_corrupt", mask_fn, (key, tokens_BxL, gamma_B)),
    (
      "edit_corrupt_batch",
      edit_fn,
      (key, tokens_BxL, segment_ids_BxL, positions_BxL, alpha_B),
    ),
  ]:
    timing = time_fn(fn, args, warmup=_WARMUP.value, repeats=_REPEATS.value)
    rows.append(
      {
        "bench": "corruption",
        "name": name,
        "batch": batch,
        "seq_len": seq_len,
        "vocab_size": vocab,
        "alpha_max": _ALPHA_MAX.value,
        **timing,
        "tokens_per_s": batch * seq_len / timing["median_s"],
        "platform": device.platform,
        "device": device.device_kind,
        "jax": jax.__version__,
      }
    )
  for row in rows:
    print(
      f"{row['name']:>20}: compile {row['compile_s']:.2f} s, {row['median_s'] * 1e3:.3f} ms "
      f"per call, {row['tokens_per_s']:.3g} tokens/s ({row['device']}, {batch}x{seq_len})"
    )
  print(json.dumps(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
