"""Real data that ships offline, for benchmarks and tests: Fashion-MNIST from Debian.

:func:`fashion_mnist` reads the IDX files that the Debian package
``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist/``
(60 000 training and 10 000 test images, 28x28, 10 classes) into tensors, standardised.

Example::

    >>> from fxprune.io.datasets import fashion_mnist
    >>> (xtr, ytr), (xte, yte) = fashion_mnist()          # doctest: +SKIP
    >>> xtr.shape, xte.shape                               # doctest: +SKIP
    (torch.Size([60000, 1, 28, 28]), torch.Size([10000, 1, 28, 28]))
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from ..errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(root: str = FASHION_MNIST_DIR):
    """((train images [N, 1, 28, 28] float, train labels), (test images, test labels))."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    paths = [os.path.join(root, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"Fashion-MNIST is not installed (missing {missing[0]}). Install it with "
                        "'apt-get install -y dataset-fashion-mnist' (Debian), or pass root= to a folder holding "
                        "the four IDX .gz files.")
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)

    def images(a):
        return ((torch.from_numpy(a.copy()).float().div_(255.0) - MEAN) / STD).unsqueeze(1)

    return (images(xtr), torch.from_numpy(ytr.astype(np.int64))), (images(xte), torch.from_numpy(yte.astype(np.int64)))
