r"""small: ~36M parameters (d 512, 8 layers, tied 16k vocab).

Mesh presets (the argument after ':'), see sdiff_jax/config_lib.py MESH_PRESETS:
  gpu8 (default for this size: data parallel on every target), gpu8_dp, gpu_multinode (set
  --config.mesh.dcn_data to the node count), tpu_v5p, tpu_v5e, tpu_multislice, cpu.

Command to run (one 8-GPU node):

    python -m sdiff_jax.main --config=configs/small.py:gpu8_dp --workdir=$WORKDIR

Multi-node GPU (Slurm):   launch/slurm_gpu.sh configs/small.py:gpu_multinode $WORKDIR
TPU pod (all workers):    launch/tpu_pod.sh configs/small.py:tpu_v5p $WORKDIR
"""

from sdiff_jax.config_lib import sized_config


def get_config(preset: str = "gpu8_dp"):
  model = dict(d_model=512, n_layers=8,
               n_heads=8, n_kv_heads=8, head_dim=64, d_ff=1536, tie_embeddings=True)
  c = sized_config(model, preset, seq_len=1024, batch_size=256)
  c.data.vocab_size = 16384
  return c
