"""Our `CausalLM` parameters from (and to) the named tensors of a PyTorch checkpoint, through a
table `{our param path: (tensor name, Transform)}` that each checkpoint family writes
(gsa_jax.hf.llama, gsa_jax.hf.fla).

A Transform maps the stored array to ours (`to_ours`) and back (`to_file`); the common ones:

    SAME        norm scales, embeddings, biases: stored as we hold them
    TRANSPOSE   torch.nn.Linear keeps W [out, in] and computes x Wᵀ; flax's Dense kernel is
                [in, out], so every projection is transposed (head h of an output stays at
                columns h·d..(h+1)·d)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import numpy as np

from gsa_jax import layer_layout
from gsa_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a stored tensor becomes our parameter (`to_ours`) and back (`to_file`; None when a
    parameter cannot be written back alone, e.g. one half of a fused matrix)."""
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_file: Optional[Callable[[np.ndarray], np.ndarray]]


SAME = Transform(lambda x: x, lambda x: x)
TRANSPOSE = Transform(lambda x: x.T, lambda x: x.T)

Mapping = dict[Path, tuple[str, Transform]]


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Every parameter path of `CausalLM(config)` in the unscanned layout ("layer_i", the one
    the tensor tables name) -> its shape (jax.eval_shape: nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from gsa_jax.models.lm import CausalLM
    boxed = jax.eval_shape(CausalLM(config.replace(scan_layers=False)).init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    return {tuple(k.key for k in path): tuple(x.shape) for path, x in flat}


def _put(tree: dict, path: Path, value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def gather_params(reader, mapping: Mapping, config: ModelConfig, dtype: Any, *, family: str,
                  ignored: Iterable[str] = (), tied_head: Optional[tuple[str, str]] = None
                  ) -> dict:
    """The `params` tree of `CausalLM(config)` (NumPy arrays of `dtype`; stacked under "layers"
    when `config.scanned`) from `reader` (a gsa_jax.hf.TensorReader) through `mapping` (whose
    paths are the unscanned layout's).

    family: the checkpoint kind, for messages ("Llama/Mistral", "fla GSA", ...).
    ignored: tensor names that hold no parameters (buffers some checkpoints carry).
    tied_head: (head name, embedding name) when the LM head is tied: a stored head is accepted
      only if it equals the embedding.
    Raises ValueError naming a missing tensor, a tensor of the wrong shape, or tensors the
    mapping does not use (a different architecture would otherwise load silently).
    """
    expected = param_shapes(config)
    if set(mapping) != set(expected):  # a bug in the table, not a user error
        raise AssertionError(f"tensor map and model disagree: {set(mapping) ^ set(expected)}")
    used = {name for name, _ in mapping.values()}
    ignored = set(ignored)
    unused = [n for n in reader.names() if n not in used and n not in ignored]
    if tied_head is not None and tied_head[0] in unused:
        head, emb = reader.get(tied_head[0]), reader.get(tied_head[1])
        if head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError(f"config.json: tie_word_embeddings is true but {tied_head[0]} "
                             f"differs from {tied_head[1]}")
        unused.remove(tied_head[0])
    if unused:
        shown = unused[:6] + (["..."] if len(unused) > 6 else [])
        raise ValueError(f"checkpoint {str(reader.directory)!r} has {len(unused)} tensor(s) a "
                         f"{family} model of this config.json does not use: {shown}")
    params: dict = {}
    for path, (name, transform) in mapping.items():
        if name not in reader:
            raise ValueError(f"checkpoint {str(reader.directory)!r} has no tensor {name!r} "
                             f"(needed for {'/'.join(path)})")
        stored = reader.get(name)
        array = transform.to_ours(stored)
        if tuple(array.shape) != expected[path]:
            raise ValueError(f"tensor {name!r} has shape {tuple(stored.shape)}, which does not "
                             f"give {'/'.join(path)} the shape {expected[path]} that "
                             f"config.json implies")
        # Upcast bf16 -> f32 exactly (f32 holds every bf16 value).
        _put(params, path, np.ascontiguousarray(array, dtype=np.dtype(dtype)))
    return layer_layout.for_config(params, config)  # stacked when the config scans its layers


def scatter_params(params: dict, mapping: Mapping, dtype: Any) -> dict[str, np.ndarray]:
    """{tensor name: array in the file's layout, `dtype`} of our `params` through `mapping`
    (every Transform must have `to_file`). params: either layer layout."""
    params = layer_layout.to_unscanned(params)
    tensors = {}
    for path, (name, transform) in mapping.items():
        node = params
        for key in path:
            node = node[key]
        if transform.to_file is None:  # a bug in the table
            raise AssertionError(f"{'/'.join(path)} -> {name} cannot be written back")
        array = np.asarray(transform.to_file(np.asarray(node, np.float32)))
        tensors[name] = np.ascontiguousarray(array.astype(np.dtype(dtype)))
    return tensors
