r"""15b: ~15.2B parameters (d 5120, 44 layers, GQA 40/8).

Mesh presets (the argument after ':'), see sdiff_jax/config_lib.py MESH_PRESETS:
  gpu8 (default for this size: fsdp over the 8 GPUs of a node), gpu8_dp, gpu_multinode (set
  --config.mesh.dcn_data to the node count), tpu_v5p, tpu_v5e, tpu_multislice, cpu.

Command to run (one 8-GPU node):

    python -m sdiff_jax.main --config=configs/15b.py:gpu8 --workdir=$WORKDIR

Multi-node GPU (Slurm):   launch/slurm_gpu.sh configs/15b.py:gpu_multinode $WORKDIR
TPU pod (all workers):    launch/tpu_pod.sh configs/15b.py:tpu_v5p $WORKDIR
"""

from sdiff_jax.config_lib import sized_config


def get_config(preset: str = "gpu8"):
  model = dict(d_model=5120, n_layers=44,
               n_heads=40, n_kv_heads=8, head_dim=128, d_ff=17920)
  c = sized_config(model, preset, seq_len=4096, batch_size=256)
  return c
