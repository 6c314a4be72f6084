"""Datasets: the digits split, the IDX reader on tiny files made here, and the slides' targets."""

import gzip

import numpy as np
import pytest
from idx_files import idx_bytes
from idx_files import write_idx
from idx_files import write_mnist_like

from jaxbp import data


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == "u1":
        array = array + 7
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), array, gz=gz)
    got = data.read_idx(path)
    assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, array)


def test_read_idx_knows_the_header_by_hand(tmp_path):
    # 2 labels, 7 and 1: magic 00 00 08 01, count 00 00 00 02, data 07 01
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 1]))
    np.testing.assert_array_equal(data.read_idx(path), [7, 1])


def test_load_idx_scales_pixels_and_keeps_labels(tmp_path):
    write_mnist_like(tmp_path, gz=True)
    dataset = data.load_idx(tmp_path)
    assert dataset.x_train.shape == (64, 8, 8, 1) and dataset.x_test.shape == (32, 8, 8, 1)
    assert dataset.x_train.dtype == np.float32
    np.testing.assert_array_equal(dataset.labels_train, np.arange(64) % 10)
    raw = data.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(dataset.x_train[..., 0], (raw / 255.0).astype(np.float32))
    centred = data.load_idx(tmp_path, pixel_range=(-1, 1))
    np.testing.assert_allclose(centred.x_train, 2 * dataset.x_train - 1, atol=1e-6)
    assert centred.x_train.max() == 1.0 and data.load_dataset(f"idx:{tmp_path}").x_train.shape[0] == 64


def test_load_idx_accepts_raw_files_and_the_dotted_names(tmp_path):
    paths = write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").rename(tmp_path / "t10k-labels.idx1-ubyte")
    dataset = data.load_idx(tmp_path)
    np.testing.assert_array_equal(dataset.labels_test, data.read_idx(tmp_path / "t10k-labels.idx1-ubyte"))
    assert paths["train-images"].endswith("idx3-ubyte")


def test_missing_file_names_it(tmp_path):
    write_mnist_like(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="test images.*t10k-images-idx3-ubyte"):
        data.load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="IDX file not found: .*nowhere"):
        data.read_idx(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        data.load_idx(tmp_path / "no_such_dir")


@pytest.mark.parametrize("keep", [3, 10, 20, 100])
def test_truncated_file_names_it(tmp_path, keep):
    whole = idx_bytes(np.zeros((4, 5, 6), np.uint8))  # 16-byte header + 120 bytes
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(whole[:keep])
    with pytest.raises(ValueError, match=f"{path}: truncated"):
        data.read_idx(path)


def test_truncated_gzip_names_it(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 4), np.uint8)))[:-12])
    with pytest.raises(ValueError, match=f"{path}: cannot be read as gzip"):
        data.read_idx(path)


def test_extra_bytes_and_bad_magic_name_the_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match=f"{path}: longer than its header says"):
        data.read_idx(path)
    path.write_bytes(b"PK\x03\x04" + bytes(20))  # e.g. a zip file
    with pytest.raises(ValueError, match=f"{path}: not an IDX file: magic bytes 50 4b 03 04"):
        data.read_idx(path)


def test_mislabelled_files_are_named(tmp_path):
    paths = write_mnist_like(tmp_path)
    images, labels = paths["train-images"], paths["train-labels"]
    with pytest.raises(ValueError, match=f"{labels}: expected IDX images.*is it a labels file"):
        data.read_idx_images_and_labels(labels, images)
    with pytest.raises(ValueError, match="holds 64 images but .* holds 32 labels"):
        data.read_idx_images_and_labels(images, paths["t10k-labels"])
    write_idx(labels, np.full(64, 12, np.uint8))
    with pytest.raises(ValueError, match=f"{labels}: labels must be digits 0..9, found 12"):
        data.load_idx(tmp_path)
    write_idx(labels, np.zeros(64, np.int32))
    with pytest.raises(ValueError, match=f"{labels}: expected IDX labels, uint8"):
        data.load_idx(tmp_path)


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    for u, v in zip(a[:4], b[:4]):
        np.testing.assert_array_equal(u, v)
    assert a.x_train.shape == (1438, 8, 8, 1) and a.x_test.shape == (359, 8, 8, 1)
    assert (a.x_train.min(), a.x_train.max()) == (0.0, 1.0)
    counts_train = np.bincount(a.labels_train, minlength=10)
    counts_test = np.bincount(a.labels_test, minlength=10)
    # each class is split 80/20 up to rounding of its own count
    np.testing.assert_array_equal(counts_test, np.round(0.2 * (counts_train + counts_test)))
    train, test = data.stratified_split(np.repeat(np.arange(10), 7), 0.2, 0)
    assert not set(train) & set(test) and len(train) + len(test) == 70
    other = data.load_digits(split_seed=1)
    assert not np.array_equal(other.labels_test, a.labels_test) or not np.array_equal(other.x_test, a.x_test)
    centred = data.load_digits(pixel_range=(-1, 1))
    np.testing.assert_allclose(centred.x_train, 2 * a.x_train - 1, atol=1e-6)


def test_tasks_give_the_slides_targets():
    dataset = data.load_digits()
    multi = data.make_task(dataset)
    assert multi.n_out == 10 and multi.y_train.shape == (1438, 10)
    np.testing.assert_array_equal(multi.y_train.argmax(1), dataset.labels_train)
    np.testing.assert_array_equal(multi.y_train.sum(1), 1.0)
    binary = data.make_task(dataset, "binary", (3, 8))
    assert binary.n_out == 1 and binary.class_names == ("3", "8")
    keep = np.isin(dataset.labels_test, (3, 8))
    np.testing.assert_array_equal(binary.y_test[:, 0], dataset.labels_test[keep] == 8)
    np.testing.assert_array_equal(binary.labels_test, dataset.labels_test[keep] == 8)
    with pytest.raises(ValueError, match="task must be"):
        data.make_task(dataset, "ternary")
    with pytest.raises(ValueError, match="digits must be two different"):
        data.make_task(dataset, "binary", (3, 3))


def test_predicted_class():
    np.testing.assert_array_equal(data.predicted_class(np.array([[0.2, 0.7], [0.9, 0.1]])), [1, 0])
    np.testing.assert_array_equal(data.predicted_class(np.array([[0.2], [0.7]])), [0, 1])


def test_binary_task_needs_examples_of_both_digits():
    dataset = data.load_digits()
    with pytest.raises(ValueError, match="no examples of digit 12"):
        data.make_task(dataset, "binary", (3, 12))
