"""bench.accelerator --tiny end to end on a CPU, and the model's fallback from cuDNN to XLA.

The GPU run (cuDNN rows, the 1b shape, MFU) cannot run here; these tests check that the
one command runs every section, that its numbers are what they claim (chunked attention
equals XLA's, the FLOP count is the formula's, NFE matches the sampler's settings), and
that a model configured for cuDNN still runs where cuDNN refuses.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import CONFIGS, FAST_COMPILE
from sdiff_jax import config_lib
from sdiff_jax.bench import roofline
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import ATTENTION_MODES, ModelConfig, Transformer, training_mask
from sdiff_jax.models import transformer as transformer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("accelerator") / "accelerator.json"
  run = subprocess.run(
    [sys.executable, "-m", "sdiff_jax.bench.accelerator", "--tiny", f"--json={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"},
  )
  assert run.returncode == 0, run.stdout + run.stderr
  for section in ("attention", "training", "decoding"):
    assert f"## {section}: ok" in run.stdout, run.stdout
  return json.loads(out.read_text())


def test_every_section_ran(result):
  assert result["platform"] == "cpu" and result["jax"] == jax.__version__
  assert result["device_kind"] and result["tiny"] and 0 < result["wall_s"] < result["budget_s"]
  for name in ("attention", "training", "decoding"):
    section = result["sections"][name]
    assert section["status"] == "ok", section.get("traceback")
    assert section["rows"] and all(r["status"] == "ok" for r in section["rows"]), section


def test_chunked_attention_matches_xla(result):
  attention = result["sections"]["attention"]
  assert attention["model"]["n_kv_heads"] < attention["model"]["n_heads"]  # GQA
  chunked = {r["mask"]: r for r in attention["rows"] if r["impl"] == "chunked"}
  assert set(chunked) == set(ATTENTION_MODES)
  # The tiny sequence spans several chunks (else "chunked" would run XLA's attention).
  assert attention["seq_len"] > attention["attention_chunk"]
  for row in chunked.values():
    assert row["dtype"] == "float32" and not row["cudnn_kernel"]
    assert row["logits_max_abs_diff"] < 1e-4 and row["grads_max_abs_diff"] < 1e-4, row
    assert row["logits_ref_max_abs"] > 0.1 and row["grads_ref_max_abs"] > 1e-3
  # No GPU: the only cudnn row is the fallback probe, XLA's numbers with one warning.
  (cudnn,) = [r for r in attention["rows"] if r["impl"] == "cudnn"]
  assert cudnn["logits_max_abs_diff"] == 0 and cudnn["grads_max_abs_diff"] == 0
  assert not cudnn["cudnn_kernel"] and "cuDNN" in " ".join(cudnn["warnings"])


def test_training_flops_and_speed(result):
  training = result["sections"]["training"]
  config = config_lib.from_file(f"{CONFIGS}/tiny.py")
  cfg = config_lib.model_config(config, tokenizer_lib.BYTE_VOCAB_SIZE)
  n = cfg.num_params() - cfg.vocab_size * cfg.d_model  # the input embedding is a gather
  seq = config.data.seq_len
  per_forward = 6 * n + 12 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim
  rows = {r["stage"]: r for r in training["rows"]}
  assert set(rows) == {"mask", "mask+edit"}
  assert rows["mask"]["flops_per_token"] == per_forward
  assert rows["mask+edit"]["flops_per_token"] == 2 * per_forward  # two forwards
  fits = [a["batch"] for a in training["batch_search"] if a["fits"]]
  assert fits == [max(a["batch"] for a in training["batch_search"])]
  for row in rows.values():
    assert row["batch"] == fits[0] and row["tokens_per_s"] > 0 and np.isfinite(row["loss"])
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * seq / row["step_s"])
    assert row["compiled_memory"]["peak"] > row["compiled_memory"]["arguments"] > 0
    assert row["mfu"] is None  # no peak FLOP/s for a CPU
  assert "mfu_note" in training
  estimate = training["step_memory_estimate"]
  assert estimate["status"] == "ok" and estimate["peak"] > 0
  assert estimate["params"] == cfg.num_params()


def test_decoding_nfe_and_roofline(result):
  decoding = result["sections"]["decoding"]
  cfg = config_lib.model_config(
    config_lib.from_file(f"{CONFIGS}/tiny.py"), tokenizer_lib.BYTE_VOCAB_SIZE
  )
  prompt, gen, block = decoding["prompt_len"], decoding["gen_len"], decoding["block_size"]
  assert (prompt, gen, block) == (16, 32, 8)
  rows = {(r["batch"], r["mode"], r["steps_per_block"]): r for r in decoding["rows"]}
  assert set(rows) == {
    (b, m, s) for b in (1, 2) for m, s in (("ar", None), ("block", 1), ("block", 4))
  }
  for (batch, mode, steps), row in rows.items():
    assert row["generated_tokens"] == gen and row["tokens_per_s"] > 0
    if mode == "ar":
      assert row["nfe"] == gen
    else:
      assert row["blocks"] == gen // block
      assert row["blocks"] < row["nfe"] <= 1 + row["blocks"] * steps
    assert row["ms_per_forward"] == pytest.approx(1e3 * row["median_s"] / row["nfe"])
    # Tiny weights stay in the CPU's caches, the 64 MiB copy does not: above 1 is possible.
    assert 0 < row["roofline_fraction"] < 100
    slots = prompt + gen / 2  # the mean filled cache over the generation
    kv = cfg.n_layers * 2 * batch * slots * cfg.n_kv_heads * cfg.head_dim * 4  # float32
    assert row["bytes_per_forward"] == decoding["weight_bytes"] + kv


def test_peak_flops_matches_the_most_specific_device_name():
  assert roofline.peak_flops("NVIDIA H100 80GB HBM3") == roofline.peak_flops("NVIDIA H200")
  assert roofline.peak_flops("NVIDIA H100 PCIe") < roofline.peak_flops("NVIDIA H100 80GB HBM3")
  assert roofline.peak_flops("NVIDIA H20") < roofline.peak_flops("NVIDIA H200")
  assert roofline.peak_flops("cpu") is None


def test_cudnn_falls_back_to_xla(monkeypatch, caplog):
  """Where jax refuses cuDNN while tracing (a CPU has none), attention_impl="cudnn" runs
  XLA's attention with one warning per reason: same logits and gradients as "xla"."""
  q_1x8x2x16 = jnp.ones((1, 8, 2, 16), jnp.float32)
  with pytest.raises(RuntimeError, match="cuDNN"):  # what the fallback catches on a CPU
    jax.nn.dot_product_attention(q_1x8x2x16, q_1x8x2x16, q_1x8x2x16, implementation="cudnn")
  monkeypatch.setattr(transformer_lib, "_CUDNN_REFUSALS", set())
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16)
  tokens_BxL = jax.random.randint(jax.random.key(0), (2, 12), tokenizer_lib.NUM_SPECIAL, 64)
  positions_BxL = jnp.tile(jnp.arange(12), (2, 1))
  mask = training_mask("bidirectional", jnp.ones((2, 12), jnp.int32), 4)
  init = jax.jit(Transformer(cfg).init)
  params = init(jax.random.key(1), tokens_BxL, positions_BxL, mask)["params"]

  def logits_and_grads(impl):
    model = Transformer(dataclasses.replace(cfg, attention_impl=impl))

    def loss(params):
      logits_BxLxV, _ = model.apply({"params": params}, tokens_BxL, positions_BxL, mask)
      return jnp.mean(logits_BxLxV**2), logits_BxLxV

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads

  with caplog.at_level(logging.WARNING):
    logits, grads = logits_and_grads("cudnn")
  refusals = [r for r in caplog.records if "cuDNN attention refused" in r.getMessage()]
  assert len(refusals) == 1  # the same reason at every layer and trace: logged once
  assert "XLA" in refusals[0].getMessage()
  ref_logits, ref_grads = logits_and_grads("xla")
  np.testing.assert_array_equal(logits, ref_logits)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_array_equal(got, want)
