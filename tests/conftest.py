"""Shared fixtures: a fake MNIST in IDX files (no network in the tests)."""
import gzip

import numpy as np
import pytest


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def fake_digits(n, seed):
    """Images whose label is visible (a bright 4x4 block at a label-dependent place) plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(y):
        x[i, 2 + 2 * c: 6 + 2 * c, 4:8] = 255
    return x.astype(np.uint8), y.astype(np.uint8)


def write_idx(d, prefix, x, y):
    (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
    (d / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    for prefix, n, seed in (("train", 300, 0), ("t10k", 120, 1)):
        write_idx(d, prefix, *fake_digits(n, seed))
    return d
