"""ONNX export of a pruned model, checked against ONNX Runtime.

:func:`export_onnx` writes one ``.onnx`` file (no external-data sidecar) with a dynamic
batch dimension, runs ``onnx.checker``, and compares ONNX Runtime (CPU) with torch at
batch 1 and batch 3. Tolerance: ``ORT_RTOL * max|torch| + ORT_ATOL`` per output.

Example::

    >>> import torch, tempfile, os, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
    >>> fxprune.export_onnx(net, (torch.randn(1, 3, 8, 8),), path)["ok"]
    True
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from contextlib import redirect_stdout, redirect_stderr

import torch
from torch.utils._pytree import tree_flatten

from .errors import VerificationError
from .verify import ORT_ATOL, ORT_RTOL, random_inputs


def export_onnx(module: torch.nn.Module, example_inputs, path: str | None = None, *,
                batches=(1, 3), dynamic_batch: bool = True, check: bool = True) -> dict:
    """Export ``module`` to ONNX at ``path`` and verify it in ONNX Runtime.

    Returns the figures (``ok``, ``max_abs_diff``, ``max_rel_diff``, batches tried,
    ``path``). Raises :class:`VerificationError` when ``check`` and outputs disagree.
    """
    import onnx
    import onnxruntime as ort

    example_inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
    module = copy.deepcopy(module).eval()
    tmpdir = None
    if path is None:
        tmpdir = tempfile.TemporaryDirectory()
        path = os.path.join(tmpdir.name, "model.onnx")
    batchable = dynamic_batch and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    dynamic = None
    if batchable:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in example_inputs)
    _export(module, example_inputs, path, names, dynamic)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    tried = []
    for b in (batches if batchable else (None,)):
        inputs = random_inputs(example_inputs, seed=1 + (b or 0), batch=b)
        with torch.no_grad():
            expected = [t for t in tree_flatten(module(*inputs))[0] if isinstance(t, torch.Tensor)]
        got = session.run(None, {n: x.numpy() for n, x in zip(feed_names, inputs)})
        if len(got) != len(expected):
            raise VerificationError(f"ONNX model has {len(got)} outputs, torch {len(expected)}")
        for e, g in zip(expected, got):
            g = torch.from_numpy(g)
            if e.shape != g.shape:
                raise VerificationError(f"ONNX Runtime output shape {tuple(g.shape)} != torch {tuple(e.shape)}")
            if not e.is_floating_point():
                ok = ok and bool(torch.equal(e, g))
                continue
            scale, err = float(e.abs().max()), float((e - g).abs().max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / (scale + 1e-30))
            ok = ok and err <= ORT_RTOL * scale + ORT_ATOL
        tried.append(b if b is not None else "example")
    result = {"ok": ok, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "batches": tried,
              "rtol": ORT_RTOL, "atol": ORT_ATOL, "path": None if tmpdir else path,
              "bytes": os.path.getsize(path)}
    if tmpdir:
        tmpdir.cleanup()
    if check and not ok:
        raise VerificationError(f"ONNX Runtime disagrees with torch: max difference {worst_abs:.3e} "
                                f"(relative {worst_rel:.3e} > {ORT_RTOL:.0e})")
    return result


def _export(module, inputs, path, names, dynamic):
    buf = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(buf), redirect_stderr(buf):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, inputs, path, input_names=names, dynamic_shapes=dynamic,
                              external_data=False, dynamo=True, verbose=False)
        except Exception as exc:
            raise VerificationError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}\n"
                                    f"{buf.getvalue()[-2000:]}") from exc
