r"""small: ~36M parameters (d 512, 8 layers, tied 16k vocab).

Mesh presets (the argument after ':'), see MESH_PRESETS in sdiff_jax/config_lib.py:
  gpu8_dp (the default for this size: data parallel over the 8 GPUs of a node);
  the others: cpu, gpu8, gpu_multinode, tpu_v5p, tpu_v5e, tpu_multislice
  (set --config.mesh.dcn_data to the node / slice count for the multi-node ones).

Corpus: data.source, "stdlib" by default (this interpreter's standard library, ~34 MB:
  a stand-in that runs anywhere, far too small for this size). Point a real run at
  your code: a directory (its *.py files), a glob, or a JSONL(.gz) of {"text": ...}
  records, e.g. --config.data.source='/data/code/**/*.py'.

Command to run (one 8-GPU node):

    python -m sdiff_jax.main --config=configs/small.py:gpu8_dp --workdir=$WORKDIR \
        --config.data.source='/data/code/**/*.py'

Multi-node GPU (Slurm):   launch/slurm_gpu.sh configs/small.py:gpu_multinode $WORKDIR
TPU pod (all workers):    launch/tpu_pod.sh configs/small.py:tpu_v5p $WORKDIR
"""

from sdiff_jax.config_lib import sized_config


def get_config(preset: str = "gpu8_dp"):
  model = dict(
    d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=1536, tie_embeddings=True
  )
  c = sized_config(model, preset, seq_len=1024, batch_size=256)
  c.data.vocab_size = 16384
  return c
