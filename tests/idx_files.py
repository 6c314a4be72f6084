"""Tiny IDX files written by the tests (the format of yann.lecun.com/exdb/mnist)."""

import gzip

import numpy as np

TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C}
TYPE_CODES.update({np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E})


def idx_bytes(array: np.ndarray) -> bytes:
    """Magic (0, 0, type code, ndim), each dimension as big-endian uint32, then big-endian data."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    header = bytes([0, 0, TYPE_CODES[dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, *, gz: bool = False) -> str:
    data = idx_bytes(array)
    with (gzip.open if gz else open)(path, "wb") as file:
        file.write(data)
    return str(path)


def write_mnist_like(directory, *, n_train=64, n_test=32, size=8, seed=0, gz=False) -> dict:
    """The four standard files, with learnable images: class c lights up row c of the image."""
    rng = np.random.default_rng(seed)
    paths = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
        images[np.arange(n), labels % size, :] = 255
        paths[f"{split}-images"] = write_idx(
            directory / f"{split}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz=gz
        )
        paths[f"{split}-labels"] = write_idx(
            directory / f"{split}-labels-idx1-ubyte{'.gz' if gz else ''}", labels, gz=gz
        )
    return paths
