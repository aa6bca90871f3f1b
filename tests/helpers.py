"""Shared checks for the compiler tests: prune, then assert the invariants of docs/design.md."""
from __future__ import annotations

import io

import torch

import fxprune


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_and_loaded(obj):
    """``obj`` through ``torch.save`` and ``torch.load`` (in memory), as a user round-trips a whole model."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def same_state(model, before) -> bool:
    """Whether ``model``'s parameters and buffers are still exactly ``before`` (a :func:`state_copy`)."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def assert_state_equal(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"the input model changed: {k}"


def prune_and_check(model, inputs, *, method="random", ratio=0.5, onnx=True, seed=0, must_shrink=(), **kw):
    """Compile with verification on; check the user's model is untouched, the output shapes
    are unchanged, and that every group named in ``must_shrink`` lost channels."""
    model = model.eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    before = state_copy(model)
    pruned = fxprune.compile(model, inputs, method=method, ratio=ratio, onnx=onnx, seed=seed, **kw)
    assert_state_equal(model, before)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"], rep.mask
    assert rep.mask["nodes_compared"] > 0
    if onnx:
        assert rep.onnx["ok"], rep.onnx
    with torch.no_grad():
        ref, out = model(*inputs), pruned(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = out if isinstance(out, tuple) else (out,)
    assert [r.shape for r in ref] == [o.shape for o in out]
    for name in must_shrink:
        assert name in rep.plan.keep, f"group '{name}' was not pruned; plan: {list(rep.plan.keep)}"
    return pruned, rep


def padded_table(block: int):
    """A fake ORT kernel table (``sig -> ms``) for :class:`~fxprune.cost.latency_table.FunctionTable`: a conv costs
    its MACs (1e-6 ms each) with channels padded to blocks of ``block``; a per-element op 1e-6 ms per input
    element; the probe chain pads its middle count to ``block``."""
    def pad(c):
        return -(-c // block) * block

    def table(sig):
        if sig.kind == "conv":
            return 1e-6 * pad(sig.cin) * pad(sig.cout) * sig.h * sig.w * sig.kh * sig.kw / sig.groups
        if sig.kind == "chain":
            return 2e-6 * sig.cin * pad(sig.cout) * sig.h * sig.w
        if sig.kind == "gemm":
            return 1e-6 * sig.cin * sig.cout * sig.h
        return 1e-6 * sig.cin * sig.h * sig.w
    return table
