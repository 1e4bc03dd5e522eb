"""Device mesh from the config and logical-axis -> mesh-axis shardings.

The mesh has axes `data`, `fsdp`, `tensor`. A size of -1 takes the devices
left over by the others. `dcn_*` sizes split the mesh across slices or nodes
(the slow network); the product of in-slice and dcn sizes is the mesh shape.
"""

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def _resolve(sizes: Sequence[int], total: int, what: str) -> list[int]:
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one {what} axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f"mesh: {what} sizes {sizes} do not divide {total} devices")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"mesh: {what} sizes {sizes} need {math.prod(sizes)} devices, have {total}")
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; -1 sizes are filled in."""
  devices = list(devices if devices is not None else jax.devices())
  dcn = [mesh_config[f"dcn_{a}"] for a in MESH_AXES]
  num_slices = math.prod(dcn)
  if len(devices) % num_slices:
    raise ValueError(f"mesh: dcn sizes {dcn} do not divide {len(devices)} devices")
  ici = _resolve([mesh_config[a] for a in MESH_AXES], len(devices) // num_slices, "in-slice")
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.array(devices).reshape(ici)  # CPU / unusual topologies
  return Mesh(grid, MESH_AXES)


def rules(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple(
    (name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_config.logical_axis_rules
  )


def logical_shardings(abstract_tree: Any, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a (boxed) abstract pytree from its logical annotations."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def abstract_sharded(boxed_tree: Any, mesh: Mesh, axis_rules) -> tuple[Any, Any]:
  """(ShapeDtypeStructs carrying their shardings, the shardings) of a boxed abstract
  pytree (`jax.eval_shape` of a Flax init): nothing is allocated."""
  shardings = logical_shardings(boxed_tree, mesh, axis_rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.meta.unbox(boxed_tree),
    shardings,
  )
  return abstract, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data and fsdp; the sequence axis replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, axis_rules):
  """Around tracing a step: the model's logical activation constraints (rows over
  data + fsdp) resolve on `mesh`. Outside it they are no-ops."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax arrays with rows over (data, fsdp)."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def barrier(what: str) -> None:
  """Waits until every process has reached it (one process: returns at once)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"sdiff_jax: {what}")


def chief_first(build: Callable[[], Any], what: str) -> Any:
  """`build()` on process 0, then on the others once it has finished: files it writes
  to a shared workdir (tokenizer, TFDS ArrayRecords) are written once, then loaded."""
  if jax.process_count() == 1:
    return build()
  result = build() if jax.process_index() == 0 else None
  barrier(f"process 0 prepared the {what}")
  return result if jax.process_index() == 0 else build()
