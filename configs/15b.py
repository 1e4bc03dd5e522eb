r"""15b: ~15.2B parameters (d 5120, 44 layers, GQA 40/8).

Mesh presets (the argument after ':'), see MESH_PRESETS in sdiff_jax/config_lib.py:
  gpu8 (the default for this size: fsdp over the 8 GPUs of a node);
  the others: cpu, gpu8_dp, gpu_multinode, tpu_v5p, tpu_v5e, tpu_multislice
  (set --config.mesh.dcn_data to the node / slice count for the multi-node ones).

Corpus: data.source, "stdlib" by default (this interpreter's standard library, ~34 MB:
  a stand-in that runs anywhere, far too small for this size). Point a real run at
  your code: a directory (its *.py files), a glob, or a JSONL(.gz) of {"text": ...}
  records, e.g. --config.data.source='/data/code/**/*.py'.

Command to run (one 8-GPU node):

    python -m sdiff_jax.main --config=configs/15b.py:gpu8 --workdir=$WORKDIR \
        --config.data.source='/data/code/**/*.py'

Multi-node GPU (Slurm):   launch/slurm_gpu.sh configs/15b.py:gpu_multinode $WORKDIR
TPU pod (all workers):    launch/tpu_pod.sh configs/15b.py:tpu_v5p $WORKDIR
"""

from sdiff_jax.config_lib import sized_config


def get_config(preset: str = "gpu8"):
  model = dict(d_model=5120, n_layers=44, n_heads=40, n_kv_heads=8, head_dim=128, d_ff=17920)
  c = sized_config(model, preset, seq_len=4096, batch_size=256)
  return c
