"""ONNX export of a pruned model, checked against ONNX Runtime.

:func:`export_onnx` writes one ``.onnx`` file (no external-data sidecar, unless the
weights pass ONNX's 2 GB protobuf limit) with a dynamic batch dimension, runs
``onnx.checker``, and compares ONNX Runtime (CPU) with torch at batch 1 and batch 3.
Tolerance: ``ORT_RTOL * max|torch| + ORT_ATOL`` per output; an output that misses it is compared with a
float64 run of the model, and agrees where ONNX Runtime is as near that as torch's float32 run is (rounding
the model amplifies, which the two runtimes' kernels do differently). :func:`write_onnx` only
writes the file (what a latency search needs); :func:`figures_table` prints the figures.

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

from tabulate import tabulate

from ..errors import ExportError, VerificationError
from ..utils import attributes_kept, eval_mode
from ..verify.mask import ORT_ATOL, ORT_RTOL, float_literals_to, random_inputs

PROTOBUF_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # bytes of weights above which ONNX needs external data


def export_onnx(module: torch.nn.Module, example_inputs, path: str | None = None, *,
                batches=(1, 3), dynamic_batch: bool = True, check: bool = True) -> dict:
    """Export ``module`` to ONNX at ``path`` and verify it in ONNX Runtime.

    Returns the figures (``ok``, ``max_abs_diff``, ``max_rel_diff``, batches tried,
    ``path``). Raises :class:`VerificationError` when ``check`` and outputs disagree.
    """
    example_inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
    # not a copy: a second copy of the weights is what a large model runs out of memory on; export runs it on
    # fake tensors, and what it caches in its attributes is put back
    with eval_mode(module), attributes_kept(module):
        return _export_and_check(module, example_inputs, path, batches, dynamic_batch, check)


def _export_and_check(module, example_inputs, path, batches, dynamic_batch, check) -> dict:
    import onnx
    import onnxruntime as ort

    tmpdir = None
    if path is None:
        tmpdir = tempfile.TemporaryDirectory()
        path = os.path.join(tmpdir.name, "model.onnx")
    batchable = dynamic_batch and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs) \
        and _runs_at_batch(module, example_inputs, max(batches))
    try:
        external = write_onnx(module, example_inputs, path, dynamic_batch=batchable)
    except VerificationError:
        if not batchable:
            raise
        # torch.export rejects a symbolic batch on some traced models (Swin: "Invalid ranges"):
        # export at the example batch instead, and check there
        batchable = False
        external = write_onnx(module, example_inputs, path, dynamic_batch=False)
    onnx.checker.check_model(path)  # read by the checker from the file, not held here
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    if batchable and any(not isinstance(i.shape[0], str) for i in session.get_inputs()):
        batchable = False  # the exporter specialised the batch (ViT's expand(n, ...)): check the example batch
    if batchable and not _runs_in_session(session, example_inputs, batches):
        # the input's batch is symbolic but the exporter wrote the example's batch into a reshape inside (timm's
        # LeViT with one query dim per head: "cannot reshape {3,196,128} to {196,128}"): export at the example batch
        batchable = False
        external = write_onnx(module, example_inputs, path, dynamic_batch=False)
        onnx.checker.check_model(path)
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    tried, rechecked = [], []
    for b in (batches if batchable else (None,)):
        inputs = random_inputs(example_inputs, seed=1 + (b or 0), batch=b)
        with torch.no_grad():
            expected = [t for t in tree_flatten(module(*inputs))[0] if isinstance(t, torch.Tensor)]
        got = session.run(None, {n: x.numpy() for n, x in zip(feed_names, inputs)})
        if len(got) != len(expected):
            raise VerificationError(f"ONNX model has {len(got)} outputs, torch {len(expected)}")
        exact = _NOT_RUN   # the float64 outputs, run once per batch where an output misses the tolerance
        for i, (e, g) in enumerate(zip(expected, got)):
            g = torch.from_numpy(g)
            if e.shape != g.shape:
                raise VerificationError(f"ONNX Runtime output shape {tuple(g.shape)} != torch {tuple(e.shape)}")
            if not e.is_floating_point():
                ok = ok and bool(torch.equal(e, g))
                continue
            scale, err = float(e.abs().max()), float((e - g).abs().max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / (scale + 1e-30))
            if err > ORT_RTOL * scale + ORT_ATOL:
                exact = _float64_outputs(module, inputs) if exact is _NOT_RUN else exact
                near = _as_near_as_torch(e, g, exact[i] if exact and i < len(exact) else None)
                ok = ok and near is not None
                rechecked += [near] if near is not None else []
        tried.append(b if b is not None else "example")
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
    result = {"ok": ok, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "batches": tried,
              "rtol": ORT_RTOL, "atol": ORT_ATOL, "path": None if tmpdir else path,
              "bytes": size, "external_data": external, "dynamic_batch": batchable}
    if rechecked:
        result["float64"] = {"ort_rel_diff": max(r[0] for r in rechecked),
                             "torch_rel_diff": max(r[1] for r in rechecked)}
    if tmpdir:
        tmpdir.cleanup()
    if check and not ok:
        raise VerificationError(f"ONNX Runtime disagrees with torch: max difference {worst_abs:.3e} "
                                f"(relative {worst_rel:.3e} > {ORT_RTOL:.0e})")
    return result


_NOT_RUN = object()


def _float64_outputs(module, inputs) -> list | None:
    """The outputs of a float64 copy of ``module`` on ``inputs`` (made float64), or None where the copy cannot
    run (an op without a float64 kernel, a dtype written into an exported graph that does not follow)."""
    try:
        exact = copy.deepcopy(module).double()
        if isinstance(exact, torch.fx.GraphModule):
            float_literals_to(exact, torch.float64)
            exact.recompile()
        with torch.no_grad():
            out = exact(*(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs))
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    except Exception:
        return None


def _as_near_as_torch(expected, got, exact) -> tuple[float, float] | None:
    """ONNX Runtime's output ``got`` missed torch's ``expected`` (float32): it still agrees where it is as near
    the float64 result ``exact`` as torch's own float32 run is (within twice torch's distance, or the tolerance):
    rounding that the model amplifies (large activations summed into a small output) differs between the two
    runtimes' kernels, while an export that computes something else stays far from the float64 result.
    Returns (ORT's, torch's) relative distance to ``exact``, or None where it does not agree."""
    if exact is None or exact.shape != expected.shape:
        return None
    scale = float(exact.abs().max()) + 1e-30
    ort = float((got.double() - exact).abs().max())
    own = float((expected.double() - exact).abs().max())
    if ort <= max(2 * own, ORT_RTOL * scale + ORT_ATOL):
        return ort / scale, own / scale
    return None


def _runs_in_session(session, example_inputs, batches) -> bool:
    """Whether ONNX Runtime runs ``session`` at every batch size of ``batches``."""
    names = [i.name for i in session.get_inputs()]
    for b in batches:
        try:
            session.run(None, {n: x.numpy() for n, x in zip(names, random_inputs(example_inputs, batch=b))})
        except Exception:  # ORT raises its own exception types
            return False
    return True


def _runs_at_batch(module, example_inputs, batch) -> bool:
    """Whether the model accepts another batch size (a literal batch in a reshape does not)."""
    try:
        with torch.no_grad():
            module(*random_inputs(example_inputs, batch=batch))
        return True
    except Exception:
        return False


def write_onnx(module: torch.nn.Module, example_inputs, path: str, *, dynamic_batch: bool = True) -> bool:
    """Export ``module`` (in eval mode, on a copy) to ``path`` without checking it; returns whether
    the weights went to an external-data file ``path + ".data"`` (only past ONNX's 2 GB limit).

    ``dynamic_batch`` makes dimension 0 of every input a symbolic ``batch``.
    """
    example_inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
    if module.training:
        module = copy.deepcopy(module).eval()
    names = [f"input_{i}" for i in range(len(example_inputs))]
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in example_inputs)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = weight_bytes > PROTOBUF_LIMIT
    try:
        _export(module, example_inputs, path, names, dynamic, external)
    except VerificationError as exc:
        # the exporter can add constants of its own (transposed or folded weights) and pass
        # protobuf's 2 GB with weights well under it: the weights then go to external data
        if external or "serialize" not in str(exc).lower():
            raise
        external = True
        _export(module, example_inputs, path, names, dynamic, external)
    return external


def figures_table(result: dict) -> str:
    """The figures returned by :func:`export_onnx` as a small table."""
    rows = [("file", result.get("path") or "(temporary)"),
            ("size", f"{result['bytes'] / 1e6:.2f} MB" + (" + external data" if result.get("external_data") else
                                                          " (one file)")),
            ("batch dimension", "dynamic" if result.get("dynamic_batch", True) else "fixed"),
            ("ONNX Runtime checked at batches", ", ".join(str(b) for b in result["batches"])),
            ("max abs diff vs torch", f"{result['max_abs_diff']:.2e}"),
            ("max rel diff vs torch", f"{result['max_rel_diff']:.2e} (tolerance {result['rtol']:.0e})"),
            ("verdict", "ok" if result["ok"] else "MISMATCH")]
    return tabulate(rows, tablefmt="github", headers=["ONNX export", ""])


def _export(module, inputs, path, names, dynamic, external=False):
    buf = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(buf), redirect_stderr(buf):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, inputs, path, input_names=names, dynamic_shapes=dynamic,
                              external_data=external, dynamo=True, verbose=False)
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}\n"
                                    f"{buf.getvalue()[-2000:]}") from exc
