"""Naming the leaves of a pytree: one path format for error messages, structure checks and listings."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def key_name(key: Any) -> str:
  """'kernel' for a DictKey, 'mu' for a GetAttrKey, '0' for a SequenceKey."""
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def path_str(path: tuple) -> str:
  """A jax key path as 'params/Dense_0/kernel'."""
  return "/".join(key_name(k) for k in path)


def leaf_paths(tree: PyTree, is_leaf: Any = None) -> dict[str, Any]:
  """'params/Dense_0/kernel' -> leaf, for every leaf of `tree`, in flattening order."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
