"""Converts parameter trees between the two layouts of `CausalLM`'s blocks:

    unscanned   {"layer_0": block, "layer_1": block, ..., "layer_{L-1}": block, ...}
    scanned     {"layers": block with every leaf stacked on a new leading axis [L, ...], ...}

(`block` = {"attn_norm", "mixer", "mlp_norm", "mlp"}; see gsa_jax.models.lm.) Everything else
(embed, norm, lm_head) is the same in both.

The functions walk any pytree and convert every dict that holds a layer stack, so they apply
alike to params, to optimizer states whose moment trees mirror the params (optax's Adam `mu`
and `nu`), to a whole `TrainState`, and to abstract trees (jax.ShapeDtypeStruct leaves, whose
NamedSharding gains / loses a leading unsharded dimension). Leaves may be NumPy or jax arrays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

STACK = "layers"                      # the scanned layout's key (lm.SCANNED_LAYERS)
_LAYER = re.compile(r"^layer_(\d+)$")  # the unscanned layout's keys


def _layer_keys(node: Mapping) -> list[str]:
    return sorted((k for k in node if isinstance(k, str) and _LAYER.match(k)),
                  key=lambda k: int(_LAYER.match(k).group(1)))


def _is_unscanned_stack(node: Any) -> bool:
    return isinstance(node, Mapping) and "layer_0" in node


def _is_scanned_stack(node: Any) -> bool:
    return isinstance(node, Mapping) and STACK in node and isinstance(node[STACK], Mapping)


def _stack_leaf(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.stack(xs)
    return jnp.stack(xs)


def _unstack_leaf(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec)[1:]
            sharding = NamedSharding(sharding.mesh, P(*spec))
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)
    return x[i]


def _map_stacks(tree: Any, is_stack, convert) -> Any:
    """`tree` with `convert(node)` applied to every dict node that `is_stack`; other containers
    are walked (dicts, lists, tuples, NamedTuples, registered dataclasses)."""
    return jax.tree.map(lambda node: convert(node) if is_stack(node) else node, tree,
                        is_leaf=is_stack)


def _stack_node(node: Mapping) -> dict:
    keys = _layer_keys(node)
    if keys != [f"layer_{i}" for i in range(len(keys))]:
        raise ValueError(f"layer_layout: the layers {keys} are not layer_0 ... "
                         f"layer_{len(keys) - 1}")
    blocks = [node[k] for k in keys]
    structure = jax.tree.structure(blocks[0])
    for k, block in zip(keys, blocks):
        if jax.tree.structure(block) != structure:
            raise ValueError(f"layer_layout: {k} holds other arrays than layer_0 (a stack of "
                             f"different mixers cannot be scanned)")
    out = {k: v for k, v in node.items() if k not in keys}
    out[STACK] = jax.tree.map(_stack_leaf, *blocks)
    return out


def _unstack_node(node: Mapping) -> dict:
    stacked = node[STACK]
    leaves = jax.tree.leaves(stacked)
    lengths = {leaf.shape[0] for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(f"layer_layout: the stacked layers' leading axes differ: {lengths}")
    (L,) = lengths
    out = {k: v for k, v in node.items() if k != STACK}
    for i in range(L):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: _unstack_leaf(x, i), stacked)
    return out


def to_scanned(tree: Any) -> Any:
    """Unscanned -> scanned layout: every {layer_0..layer_{L-1}, ...} dict of `tree` becomes
    {layers: blocks stacked [L, ...], ...}. Trees already scanned pass unchanged."""
    return _map_stacks(tree, _is_unscanned_stack, _stack_node)


def to_unscanned(tree: Any) -> Any:
    """Scanned -> unscanned layout: every {layers: [L, ...] leaves, ...} dict of `tree` becomes
    {layer_0 ... layer_{L-1}, ...}. Trees already unscanned pass unchanged."""
    return _map_stacks(tree, _is_scanned_stack, _unstack_node)


def to_layout(tree: Any, scanned: bool) -> Any:
    """`tree` in the scanned (True) or unscanned (False) layout."""
    return to_scanned(tree) if scanned else to_unscanned(tree)


def for_config(tree: Any, config) -> Any:
    """`tree` in the layout `CausalLM(config)` uses (`config.scanned`)."""
    return to_layout(tree, config.scanned)


def is_scanned(tree: Any) -> Optional[bool]:
    """True / False when `tree` holds a scanned / unscanned layer stack; None when neither."""
    found = []
    _map_stacks(tree, lambda n: _is_scanned_stack(n) or _is_unscanned_stack(n),
                lambda n: found.append(_is_scanned_stack(n)) or n)
    return found[0] if found else None


def layout_of_paths(paths: Iterable[str]) -> Optional[bool]:
    """As `is_scanned`, from "/"-joined leaf paths ("params/layers/mlp/up_proj/kernel")."""
    for path in paths:
        parts = path.split("/")
        if STACK in parts:
            return True
        if "layer_0" in parts:
            return False
    return None
