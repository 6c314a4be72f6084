r"""Datasets for the experiments: scikit-learn's digits (built in) and MNIST-style IDX files.

Images come out NHWC, float32, scaled linearly from [0, pixel_max] to `pixel_range` = (lo, hi):

.. math:: X = lo + (hi - lo)\, \text{pixel} / \text{pixel}_{max}, \qquad
   \text{pixel}_{max} = 16 \text{ (digits)},\ 255 \text{ (IDX)}

and labels as integer class indices. `make_task` turns labels into the slides' targets: one-hot
rows for the 10-class task (n_out = 10), or the slides' single output (n_out = 1) for a task
that tells two digits apart.
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple

import numpy as np

DIGITS_PIXEL_MAX = 16.0  # sklearn's digits are 8x8 counts of set pixels in 4x4 blocks: 0..16
IDX_PIXEL_MAX = 255.0

# The IDX format (yann.lecun.com/exdb/mnist): magic = 0, 0, a type code, the number of dimensions;
# then each dimension as a big-endian uint32; then the data, big-endian, C order.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# The standard MNIST / Fashion-MNIST file names; some mirrors use a '.' before "idx".
IDX_SPLITS = {"train": "train", "test": "t10k"}


class Dataset(NamedTuple):
    """Images and integer labels, split into train and test.

    Attributes:
      x_train: (N, H, W, 1) float32 images, scaled to the loader's pixel_range.
      labels_train: (N,) int64 class indices.
      x_test: (M, H, W, 1) float32 images.
      labels_test: (M,) int64 class indices.
      name: where the data came from.
    """

    x_train: np.ndarray
    labels_train: np.ndarray
    x_test: np.ndarray
    labels_test: np.ndarray
    name: str


class Task(NamedTuple):
    """A dataset with the slides' targets.

    Attributes:
      x_train, x_test: (N, H, W, 1) images.
      y_train, y_test: (N, n_out) float32 targets: one-hot rows, or one 0/1 column for binary.
      labels_train, labels_test: (N,) class indices 0 .. n_classes - 1 of the task.
      class_names: the digit each class index stands for.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    labels_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def n_out(self) -> int:
        return self.y_train.shape[1]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) holding out round(test_fraction * n_c) examples of each class c.

    Deterministic in `seed` (a NumPy PCG64 generator); both index arrays are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def scale_pixels(pixels: np.ndarray, pixel_max: float, pixel_range: tuple[float, float]) -> np.ndarray:
    """Map [0, pixel_max] linearly onto pixel_range = (lo, hi), as float32, adding a channel axis."""
    lo, hi = (float(v) for v in pixel_range)
    if not hi > lo:
        raise ValueError(f"pixel_range must be (lo, hi) with hi > lo, got {pixel_range!r}")
    return (lo + (hi - lo) * (pixels / pixel_max)).astype(np.float32)[..., None]


def load_digits(
    *, test_fraction: float = 0.2, split_seed: int = 0, pixel_range: tuple[float, float] = (0.0, 1.0)
) -> Dataset:
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes; shipped with sklearn).

    Pixels (0..16) are mapped linearly onto `pixel_range`. The split is stratified:
    `test_fraction` of each class is held out, chosen by `split_seed` (by default 1438 train,
    359 test).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('the digits dataset needs scikit-learn: pip install -e ".[experiments]"') from error
    bunch = sklearn_load_digits()
    x = scale_pixels(bunch.images, DIGITS_PIXEL_MAX, pixel_range)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction, split_seed)
    return Dataset(x[train], labels[train], x[test], labels[test], name="sklearn digits")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw, or gzip-compressed when the name ends in .gz) into an array.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: naming `path`, if it is not IDX (bad magic), is truncated, or has extra bytes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as file:
                raw = file.read()
        else:
            with open(path, "rb") as file:
                raw = file.read()
    except (OSError, EOFError) as error:
        kind = "gzip" if path.endswith(".gz") else "a file"
        raise ValueError(f"{path}: cannot be read as {kind} (truncated or corrupt?): {error}") from error
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file: magic bytes {raw[:4].hex(' ')}, expected 00 00 <type code in "
            f"{sorted(f'{t:02x}' for t in IDX_TYPES)}> <number of dimensions >= 1>"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {what}: the header gives shape {shape} of {dtype.str}, so {expected} bytes, "
            f"but the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(directory: str | os.PathLike, split: str, kind: str) -> str:
    """The path of the `split` ("train" / "test") `kind` ("images" / "labels") file in `directory`.

    Tries the standard names, e.g. ``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, with a
    '.' or a '-' before "idx", raw or with ``.gz``.
    """
    prefix, rank = IDX_SPLITS[split], {"images": 3, "labels": 1}[kind]
    names = [f"{prefix}-{kind}{sep}idx{rank}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        path = os.path.join(os.fspath(directory), name)
        if os.path.isfile(path):
            return path
    tried = ", ".join(names)
    raise FileNotFoundError(f"no {split} {kind} IDX file in {os.fspath(directory)!r}: tried {tried}")


def read_idx_images_and_labels(
    images_path: str, labels_path: str, pixel_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(N, rows, cols, 1) float32 images (scaled to `pixel_range`), (N,) int64 labels 0..9.

    Raises:
      ValueError: naming the file, if images are not (N, rows, cols) uint8, labels not (N,) uint8
        in 0..9, or the two files disagree on N.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected IDX images, uint8 of shape (N, rows, cols), got {images.dtype} of "
            f"shape {images.shape}" + ("; is it a labels file?" if images.ndim == 1 else "")
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected IDX labels, uint8 of shape (N,), got {labels.dtype} of shape "
            f"{labels.shape}" + ("; is it an images file?" if labels.ndim == 3 else "")
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return scale_pixels(images, IDX_PIXEL_MAX, pixel_range), labels.astype(np.int64)


def load_idx(directory: str | os.PathLike, *, pixel_range: tuple[float, float] = (0.0, 1.0)) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in `directory` (raw or .gz).

    Pixels (0..255) are mapped linearly onto `pixel_range`; the files' own train / t10k split is kept.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"IDX data directory not found: {os.fspath(directory)!r}")
    x_train, labels_train = read_idx_images_and_labels(
        find_idx_file(directory, "train", "images"), find_idx_file(directory, "train", "labels"), pixel_range
    )
    x_test, labels_test = read_idx_images_and_labels(
        find_idx_file(directory, "test", "images"), find_idx_file(directory, "test", "labels"), pixel_range
    )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{directory}: train images are {x_train.shape[1:3]} but test images {x_test.shape[1:3]}"
        )
    return Dataset(x_train, labels_train, x_test, labels_test, name=f"idx:{os.fspath(directory)}")


def load_dataset(source: str, *, split_seed: int = 0, pixel_range=(0.0, 1.0)) -> Dataset:
    """``"digits"`` (`load_digits`) or ``"idx:DIR"`` (`load_idx`), scaled to `pixel_range`."""
    if source == "digits":
        return load_digits(split_seed=split_seed, pixel_range=pixel_range)
    if source.startswith("idx:") and len(source) > 4:
        return load_idx(os.path.expanduser(source[4:]), pixel_range=pixel_range)
    raise ValueError(f"data must be 'digits' or 'idx:DIR', got {source!r}")


def make_task(dataset: Dataset, task: str = "multiclass", digits: tuple[int, int] = (3, 8)) -> Task:
    """Targets for the slides' loss E = sum((O - Y)^2) / 2.

    Args:
      dataset: images and labels.
      task: "multiclass": all 10 classes, Y a one-hot row (n_out = 10). "binary": only the two
        `digits`, with the slides' single output (n_out = 1), Y = 1 for ``digits[1]``, 0 for
        ``digits[0]``.
      digits: the two digits of the binary task.
    """
    if task == "multiclass":
        n = int(max(dataset.labels_train.max(), dataset.labels_test.max())) + 1
        eye = np.eye(n, dtype=np.float32)
        return Task(
            dataset.x_train,
            eye[dataset.labels_train],
            dataset.labels_train,
            dataset.x_test,
            eye[dataset.labels_test],
            dataset.labels_test,
            tuple(str(c) for c in range(n)),
        )
    if task != "binary":
        raise ValueError(f"task must be 'multiclass' or 'binary', got {task!r}")
    digits = tuple(int(d) for d in digits)
    if len(digits) != 2 or digits[0] == digits[1]:
        raise ValueError(f"digits must be two different digits, got {digits!r}")
    parts = []
    for x, labels in ((dataset.x_train, dataset.labels_train), (dataset.x_test, dataset.labels_test)):
        for digit in digits:
            if not (labels == digit).any():
                raise ValueError(f"digits: no examples of digit {digit} in {dataset.name}")
        keep = np.isin(labels, digits)
        binary = (labels[keep] == digits[1]).astype(np.int64)
        parts += [x[keep], binary[:, None].astype(np.float32), binary]
    return Task(*parts, class_names=tuple(str(d) for d in digits))


def predicted_class(O: np.ndarray) -> np.ndarray:
    """Class index from the outputs O (N, n_out): argmax, or O > 1/2 for a single output."""
    O = np.asarray(O)
    return (O[:, 0] > 0.5).astype(np.int64) if O.shape[1] == 1 else np.argmax(O, axis=1)
