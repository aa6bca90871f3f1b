"""Rules of ops that keep channel positions: elementwise arithmetic and activations (with
broadcasting), softmax-like normalisation over a dim, pooling and resizing, padding, reductions.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

from ..labels import along, varying
from .schema import arg, broadcast_label, describe, one_axis, tensors


def elementwise(ctx, args, kwargs):
    """Same-position ops (activations, add, mul with broadcasting, dropout, clamp, ...)."""
    ins = tensors(args, kwargs)
    out_shape = ctx.out_shape
    nd = len(out_shape)

    def sizes_of(t):
        return (1,) * (nd - len(t.shape)) + tuple(t.shape)

    labeled = [(broadcast_label(t.label, nd), t) for t in ins if t.label is not None and t.param is None]
    spread = {d for lab, _ in labeled for d in varying(lab)}
    result = None
    for lab, t in labeled:
        if any(sizes_of(t)[d] == 1 < out_shape[d] for d in spread):
            # one channel broadcast over many: it must stay, and ties nothing together
            ctx.pin(lab, f"'{ctx.node.name}' broadcasts it across the channels of another input")
            continue
        result = lab if result is None else ctx.unify(result, lab, f"'{ctx.node.name}' combines them with fixed channels")
    if result is None:
        return None
    result = ctx.canonical(result)
    if len(varying(result)) > 1 and any(t.param is not None for t in ins):
        result = one_axis(ctx, result)  # a grid meets a parameter: its positions are tied across blocks
    vary = varying(result)
    for t in ins:
        sizes = sizes_of(t)
        if t.param is not None:
            for d in vary:
                if sizes[d] > 1:
                    if len(vary) > 1:
                        ctx.pin(result, f"parameter '{t.param}' meets channels spread over several dims")
                        ctx.fix_param(t.param, "used with channels spread over several dims")
                    else:
                        ctx.member(t.param, d - (nd - len(t.shape)), along(result, d, sizes[d]), "producer", "scale")
        elif t.label is None and any(sizes[d] > 1 for d in vary):
            ctx.pin(result, f"'{ctx.node.name}' combines them with a tensor whose channels are fixed")
    return result


elementwise.takes_grids = True


def normalize_over(dim_arg_index, dim_name="dim"):
    """Ops that normalise along one dim (softmax): channels there cannot shrink exactly."""

    def rule(ctx, args, kwargs):
        x = tensors(args, kwargs)[0]
        dim = arg(args, kwargs, dim_arg_index, dim_name)
        if x.label is None:
            return None
        dim = dim % len(x.shape) if dim is not None else None
        if dim is None or dim in varying(x.label):
            ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over the channels")
            return None
        return x.label

    rule.__name__ = "normalize_over"
    return rule


def spatial(ctx, args, kwargs):
    """Pooling, interpolation: channels (dim 1) pass, spatial dims are mixed."""
    x = args[0]
    label = x.label
    if label is None:
        return None
    if any(d >= 2 for d in varying(label)):
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} mixes positions that carry channels")
        return None
    return label.reshape(label.shape[:2] + (1,) * (len(ctx.out_shape) - 2))


def pad(ctx, args, kwargs):
    """F.pad and the padding modules: (left, right) pairs from the last dim backwards; a dim padded by
    zero on both sides (Swin pads H and W, and the channels by 0) keeps its channels."""
    x = args[0]
    amounts = ctx.module().padding if ctx.node.op == "call_module" else arg(args, kwargs, 1, "pad")
    amounts = tuple(amounts) if isinstance(amounts, (tuple, list)) else (amounts,)
    nd = len(x.shape)
    padded = {nd - 1 - i // 2 for i, p in enumerate(amounts) if not (isinstance(p, int) and p == 0)}
    if any(d in padded for d in varying(x.label)):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} pads a dim that carries channels")
        return None
    return x.label


def reduce(ctx, args, kwargs):
    """mean/sum/amax over dims: the reduced dims must not carry channels."""
    x = args[0]
    dims = arg(args, kwargs, 1, "dim")
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    if x.label is None:
        return None
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # ATen's amax(x, []) reduces over all
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} reduces over every dim")
        return None
    dims = sorted({d % len(x.shape) for d in ((dims,) if isinstance(dims, int) else dims)}, reverse=True)
    if any(d in varying(x.label) for d in dims):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} reduces over the channels")
        return None
    out = x.label
    for d in dims:
        out = out.narrow(d, 0, 1)
        if not keepdim:
            out = out.squeeze(d)
    return out


def first_input(ctx, args, kwargs):
    """Ops whose output is their first input in another dtype or memory layout (``type_as``,
    ``to``): the other tensor arguments lend only their dtype."""
    x = args[0]
    return getattr(x, "label", None) if getattr(x, "param", None) is None else None


def constant_like(ctx, args, kwargs):
    """``new_zeros``, ``zeros_like``, ...: a new tensor of constants; its input lends only a shape or
    dtype, so its channels are not read (the result carries none: it pins what it meets)."""
    return None
