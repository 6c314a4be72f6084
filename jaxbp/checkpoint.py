"""Checkpoints: a pytree (params, optimizer state, ...) saved exactly, tied to its ConvNetSpec.

One ``.npz`` file: the pytree's leaves as NumPy arrays (``leaf_0``, ``leaf_1``, ... in
`jax.tree.flatten` order, their bits unchanged) and a JSON ``header`` with the spec, the tree
structure, each leaf's shape and dtype, and free-form metadata. Loading needs a template pytree
of the same structure (e.g. fresh params and ``optimizer.init(params)``) and the spec it is for;
a checkpoint of another spec, structure, shape or dtype is refused with a message saying which.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.network import Network
from jaxbp.spec import ConvNetSpec

FORMAT = "jaxbp-checkpoint-1"


def _jsonable(value):
    """Tuples to lists, enums to their names, recursively."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "name") and not isinstance(value, str):  # lax.Precision
        return value.name
    return value


def spec_to_dict(spec: ConvNetSpec | Network) -> dict:
    """The fields of `spec` as JSON values (tuples become lists, a precision its name); a
    `Network` as its repr, which spells out every layer's hyperparameters and the loss."""
    if isinstance(spec, Network):
        return {"network": repr(spec)}
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec or a Network, got {type(spec).__name__}")
    return {field.name: _jsonable(getattr(spec, field.name)) for field in dataclasses.fields(spec)}


def save_checkpoint(
    path: str | os.PathLike, tree, *, spec: ConvNetSpec | Network, metadata: dict | None = None
):
    """Write `tree` (any pytree of arrays) and `spec` to `path` (an .npz file), atomically.

    Args:
      path: the file to write; replaced only once the new one is complete.
      tree: e.g. ``{"params": params, "opt_state": opt_state}``.
      spec: the network the params belong to.
      metadata: JSON-serialisable extras (epoch, history, config).
    """
    leaves, treedef = jax.tree.flatten(tree)
    arrays = {}
    for i, leaf in enumerate(leaves):
        array = np.asarray(leaf)
        if array.dtype == object:
            raise TypeError(f"tree leaf {i} is not an array of numbers: {type(leaf).__name__}")
        arrays[f"leaf_{i}"] = array
    header = {
        "format": FORMAT,
        "spec": spec_to_dict(spec),
        "treedef": str(treedef),
        "leaves": [{"shape": list(a.shape), "dtype": a.dtype.str} for a in arrays.values()],
        "metadata": metadata or {},
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as file:  # a file object, so numpy does not append ".npz" to the name
        np.savez(file, header=np.array(json.dumps(header)), **arrays)
    os.replace(tmp, path)


def read_checkpoint_header(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint (spec, treedef, leaves, metadata), without its arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a jaxbp checkpoint ({error})") from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a jaxbp checkpoint: format {header.get('format')!r}, not {FORMAT!r}")
    return header


def load_checkpoint(path: str | os.PathLike, template, *, spec: ConvNetSpec | Network):
    """Read a checkpoint written by `save_checkpoint`, exactly (bit for bit).

    Args:
      path: the .npz file.
      template: a pytree of the structure, shapes and dtypes saved (its values are not used).
      spec: the network the caller is about to use; must equal the checkpoint's.

    Returns:
      ``(tree, metadata)``: the saved pytree (leaves as jax arrays) and the metadata dict.

    Raises:
      ValueError: naming `path`, if it was saved for another spec, another tree structure (e.g.
        another optimizer), or leaves of other shapes or dtypes.
    """
    path = os.fspath(path)
    header = read_checkpoint_header(path)
    saved, wanted = header["spec"], spec_to_dict(spec)
    if saved != wanted:
        differences = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)
        )
        raise ValueError(f"{path} was saved for another ConvNetSpec; refusing to load it ({differences})")
    leaves, treedef = jax.tree.flatten(template)
    if header["treedef"] != str(treedef):
        raise ValueError(
            f"{path}: the saved tree has another structure (another optimizer?):\n  saved: "
            f"{header['treedef']}\n  wanted: {treedef}"
        )
    with np.load(path, allow_pickle=False) as data:
        arrays = [data[f"leaf_{i}"] for i in range(len(leaves))]
    for i, (array, leaf) in enumerate(zip(arrays, leaves)):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"{path}: leaf {i} was saved as {array.dtype} {array.shape}, but {dtype} {shape} is wanted"
            )
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays]), header["metadata"]
