"""Device mesh, logical-axis rules and shardings for training (data / FSDP / tensor parallel).

The model annotates every parameter with logical axis names ("vocab", "embed", "heads", ...) and
its activations with ("batch", "length", "embed"). Here those names are mapped onto a
`jax.sharding.Mesh` with three named axes:

    data    pure data parallel: the batch is split, parameters are replicated
    fsdp    the batch is split *and* parameters / optimizer state are split along "embed"
    tensor  Megatron-style tensor parallel: heads, MLP width and vocabulary are split

The same code runs on one CPU (a 1x1x1 mesh), 8 simulated CPU devices, one or many GPUs and many
hosts (`maybe_initialize_distributed` first).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Order matters: flax assigns rules in order and never gives one mesh axis to two dimensions of an
# array, so "batch" (listed first) takes "fsdp" and an activation's "embed" stays replicated,
# while a parameter's "embed" (no batch dim) is split over "fsdp".
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("conv", None),
    ("norm", None),
    ("lowrank", None),
    ("layers", None),      # the stacked axis of scanned layers' params (replicated)
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 (at most one) takes all the remaining devices."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        if any(not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1)
               for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive ints or -1, got "
                             f"{dataclasses.asdict(self)}")
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1 (the rest), got "
                             f"{dataclasses.asdict(self)}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes whose product is `num_devices`, or a ValueError."""
        sizes = list(dataclasses.astuple(self))
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(f"mesh {dataclasses.asdict(self)}: the fixed axes (product "
                                 f"{fixed}) do not divide the {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} "
                             f"devices but {num_devices} are available; the product of the "
                             f"axis sizes must equal the device count (use -1 for 'the rest')")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[list] = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all, every process).

    jax.devices() is ordered by process, then device id, so "tensor" (innermost) stays inside
    one host and "data" (outermost) spans hosts: the slowest links carry the least traffic.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    # Auto axes (the compiler propagates shardings; we constrain where we choose), spelled out
    # because jax's defaults for mesh axis types have moved between versions.
    return Mesh(np.array(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, T, ...] batch array: rows split over (data, fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
    """Drops mesh axes from dimensions they do not divide (that dimension is replicated instead).

    E.g. a vocabulary of 257 rows cannot be split over tensor=2; jit would reject the sharding.
    """
    out = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        if names and shape[dim] % size:
            log.warning("sharding: %s dim %d (size %d) is not divisible by mesh axes %s (%d); "
                        "replicating it", where, dim, shape[dim], names, size)
            out.append(None)
        else:
            out.append(axes)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` (boxed) abstract variables.

    Unannotated leaves are replicated; non-divisible dimensions are replicated (see above).
    Returns a tree shaped like `nn.meta.unbox(abstract_boxed)`.
    """
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_boxed)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    spec_leaves = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    if len(spec_leaves) != len(paths):
        raise ValueError(f"logical_shardings: {len(spec_leaves)} specs for {len(paths)} arrays")
    out = [NamedSharding(mesh, _divisible_spec(spec, leaf.shape, mesh,
                                               jax.tree_util.keystr(path)))
           for (path, leaf), spec in zip(paths, spec_leaves)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def sharding_context(mesh: Mesh):
    """Context under which the model is traced: the mesh (so `with_logical_constraint` applies
    to activations) and the logical rules. Use as `with sharding_context(mesh): ...`."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_AXIS_RULES))
    return stack


# ------------------------------------------------------------------ multi-host
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when a multi-process launcher is detected.

    Detected: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM with more than
    one task, Open MPI with more than one rank. jax's own cluster detection fills in the rest.
    Must run before anything touches the devices. Returns True when it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {}
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], **kwargs)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        jax.distributed.initialize()
    elif int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def is_main_process() -> bool:
    """Only process 0 logs and writes files (orbax coordinates checkpoint writes itself)."""
    return jax.process_index() == 0
