"""Rules of ops that keep channel positions: elementwise arithmetic and activations (with
broadcasting), softmax-like normalisation over a dim, pooling and resizing, padding, reductions.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from ..labels import FIXED, along, grid_of, varying
from .schema import T, arg, broadcast_label, describe, one_axis, pin_all, tensors, tied
from .shape import broadcast_member, param_behind


def elementwise(ctx, args, kwargs):
    """Same-position ops (activations, add, mul with broadcasting, dropout, clamp, ...).

    A parameter broadcast along the channels (a class token's ``expand``, LayerScale's
    ``gamma.view(1, -1, 1, 1)``) is sliced (:func:`~fxprune.ops.shape.param_behind`). A tensor without
    channels that varies along the dims that carry them (a parameter reshaped to a written-out
    ``[1, C, 1, 1]``, an embedding computed at run time, rotary ``cos``/``sin`` over a heads x
    dims grid) keeps the op exact when the pruned graph takes only its kept positions: the node
    is marked ``fxprune_gather`` and the rewrite reads it there
    (:func:`fxprune.rewrite.graph.gather_kept`; the ONNX export folds it on a constant)."""
    ins = tensors(args, kwargs)
    out_shape = ctx.out_shape
    nd = len(out_shape)
    if derives_param(ctx, ins):
        return None

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
    gathers = []
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
            where = _position(t, args, kwargs)
            dims = [d - (nd - len(t.shape)) for d in vary]
            source = None if where is None else (
                ctx.node.args[where] if isinstance(where, int) else ctx.node.kwargs[where])
            param = param_behind(ctx, source, t, vary)
            if param is not None:   # cls_token.expand(n, -1, -1), gamma.view(1, -1, 1, 1): sliced, as in a cat
                broadcast_member(ctx, param, result, vary, sizes, nd)
            elif len(vary) <= 2 and where is not None and min(dims) >= 0:
                # a parameter viewed with its count written out, a computed embedding, rotary cos/sin over heads x dims
                gathers.append((where, dims))
            else:
                ctx.pin(result, f"'{ctx.node.name}' combines them with a tensor whose channels are fixed")
    if gathers:
        ctx.node.meta["fxprune_gather"] = (vary, gathers)
    return result


elementwise.takes_grids = True


def _position(t, args, kwargs):
    """Where tensor ``t`` is among the node's own arguments: an index into ``args``, a ``kwargs``
    key, or None (inside a container)."""
    found = [i for i, a in enumerate(args) if a is t] + [k for k, a in kwargs.items() if a is t]
    return found[0] if found else None


def derives_param(ctx, ins) -> bool:
    """One parameter and plain numbers in, a value of its shape out (Gemma's ``1 + weight``, a
    ``weight.float()``): the value stands for the parameter (``ctx.same_param``), so slicing the
    parameter slices it."""
    names = {t.param for t in ins}
    if len(names) != 1 or None in names or any(t.label is not None for t in ins):
        return False
    name = names.pop()
    if tuple(ctx.out_shape) != tuple(next(t.shape for t in ins if t.param == name)):
        return False
    ctx.same_param(name)
    return True


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
    rule.dim_of = lambda node: arg(node.args, node.kwargs, dim_arg_index, dim_name)
    return rule


def _module_dim(node: fx.Node):
    m = node.graph.owning_module.get_submodule(node.target)
    return getattr(m, "dim", -3)  # nn.Softmax2d: over dim -3; nn.Softmax(dim=None): None, pinned


def normalize_module(ctx, args, kwargs):
    """``nn.Softmax``, ``nn.LogSoftmax``, ``nn.Softmin``, ``nn.Softmax2d``: :func:`normalize_over` at the
    module's ``dim``."""
    return normalize_over(1)(ctx, (args[0], _module_dim(ctx.node)), {})


normalize_module.dim_of = _module_dim


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


def grid_sample_rule(ctx, args, kwargs):
    """``F.grid_sample(x, grid)`` (RAFT's and deformable attention's sampling): each channel of ``x`` is read at
    the grid's points (:func:`spatial`); the grid's last dim holds coordinates, never channels to remove."""
    grid = arg(args, kwargs, 1, "grid")
    if isinstance(grid, T):
        pin_all(ctx, (grid,), {}, f"{describe(ctx.node, ctx.gm)} reads its grid's coordinates whole")
    return spatial(ctx, args[:1], {})


def unfold(ctx, args, kwargs):
    """``F.unfold``/``nn.Unfold`` (ATen's ``im2col``): ``[n, C, h, w]`` to ``[n, C * kh * kw, L]``, channel ``c``
    at positions ``c * kh * kw`` on; it mixes the spatial dims, which must carry no channels (ConvBERT's span
    convolution, TNT)."""
    x = args[0]
    if x.label is None:
        return None
    nd = len(x.shape)
    if varying(x.label) != [nd - 3]:
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} mixes positions that carry channels")
        return None
    ids = along(x.label, nd - 3, x.shape[nd - 3]).repeat_interleave(_kernel_positions(ctx, args, kwargs, 1))
    return ids.view([1] * (nd - 3) + [-1, 1])


def _kernel_positions(ctx, args, kwargs, at: int) -> int:
    """``kh * kw`` of an unfold or a fold: its module's ``kernel_size``, or the call's argument ``at``."""
    module = ctx.module() if ctx.node.op == "call_module" else None
    kernel = module.kernel_size if module is not None else arg(args, kwargs, at, "kernel_size")
    return math.prod((kernel, kernel) if isinstance(kernel, int) else kernel)


def fold(ctx, args, kwargs):
    """``F.fold``/``nn.Fold`` (ATen's ``col2im``), :func:`unfold`'s inverse: ``[n, C * kh * kw, L]`` summed back into
    ``[n, C, h, w]``. Exact where each channel fills its ``kh * kw`` consecutive positions (as ``unfold`` left them:
    VOLO's outlook attention); else it pins."""
    x = args[0]
    if x.label is None:
        return None
    nd, k = len(x.shape), _kernel_positions(ctx, args, kwargs, 2)
    ids = along(x.label, nd - 2, x.shape[nd - 2]).view(-1, k) if varying(x.label) == [nd - 2] else None
    if ids is None or not bool((ids == ids[:, :1]).all()):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} sums positions that carry different channels")
        return None
    return ids[:, 0].reshape([1] * (nd - 2) + [-1, 1, 1])


def pad(ctx, args, kwargs):
    """F.pad and the padding modules: (left, right) pairs from the last dim backwards; a dim padded by
    zero on both sides (Swin pads H and W, and the channels by 0) keeps its channels. A dim that carries
    channels padded by a constant (EfficientViT's row of ones appended to ``v``) keeps them, the new
    positions fixed: the pruned value is the same padding of the kept ones."""
    x = args[0]
    module = ctx.module() if ctx.node.op == "call_module" else None
    amounts = module.padding if module is not None else arg(args, kwargs, 1, "pad")
    amounts = tuple(amounts) if isinstance(amounts, (tuple, list)) else (amounts,)
    nd = len(x.shape)
    padded = {nd - 1 - i // 2 for i, p in enumerate(amounts) if not (isinstance(p, int) and p == 0)}
    vary = [d for d in varying(x.label) if d in padded]
    if not vary:
        return x.label
    constant = isinstance(module, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                                   nn.ConstantPad3d)) if module is not None else \
        getattr(ctx.node.target, "__name__", "").startswith("constant_pad_nd") or \
        arg(args, kwargs, 2, "mode", "constant") == "constant"
    if len(vary) == 1 and constant and all(isinstance(p, int) and p >= 0 for p in amounts):
        d = vary[0]
        left, right = (amounts[2 * (nd - 1 - d)], amounts[2 * (nd - 1 - d) + 1]) if 2 * (nd - 1 - d) + 1 < len(
            amounts) else (0, 0)
        fixed = torch.full((left + right,), FIXED, dtype=torch.long)
        ids = torch.cat([fixed[:left], along(x.label, d, x.shape[d]), fixed[left:]])
        return ids.view([1] * d + [-1] + [1] * (nd - d - 1))
    ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} pads a dim that carries channels")
    return None


def reduce_over(exact: bool):
    """``mean``/``sum`` (``exact``) and ``amax``/``amin`` over ``dim``.

    Dims that carry no channels keep them. Over the dims that carry channels, an exact
    reduction passes: a removed channel adds zero to the masked original's sum (the
    reference zeroes it first: ``fxprune_contract``), and a mean keeps that sum's original
    divisor (:func:`mean_fix`), so RMSNorm's ``x.pow(2).mean(-1)`` no longer pins a residual
    stream; a max or min is the masked original's once a zero joins the kept channels
    (:func:`extreme_fix`, :func:`max_min_rule`). The result carries no channels there. A reduction
    that is not exact (a norm of order ``p <= 0``) pins them.
    """

    def rule(ctx, args, kwargs):
        x = args[0]
        dims = arg(args, kwargs, 1, "dim")
        keepdim = arg(args, kwargs, 2, "keepdim", False)
        if x.label is None:
            return None
        if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # ATen's amax(x, []) reduces over all
            ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} reduces over every dim")
            return None
        dims = sorted({d % len(x.shape) for d in ((dims,) if isinstance(dims, int) else dims)}, reverse=True)
        vary = varying(x.label)
        if any(d in vary for d in dims):
            if not exact:
                ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} takes a maximum or minimum over the channels")
                return None
            if not set(vary) <= set(dims):
                ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} reduces over some of the dims that carry channels")
                return None
            ctx.node.meta["fxprune_contract"] = True
            return None
        out = x.label
        for d in dims:
            out = out.narrow(d, 0, 1)
            if not keepdim:
                out = out.squeeze(d)
        return out

    rule.__name__ = "reduce_over"
    return rule


def _exact_order(p) -> bool:
    """Whether a ``p``-norm of the masked original equals the norm of the kept entries: zeros add
    nothing to ``sum |x|^p`` for ``p > 0`` (and to a maximum of ``|x|``); ``p <= 0`` counts or inverts them."""
    if isinstance(p, str):
        return p == "fro"
    return p is None or float(p) > 0


def norm_over(order: int, order_name: str):
    """Vector norms (``torch.linalg.vector_norm``, ``torch.norm``, ATen's ``linalg_vector_norm``): a
    reduction as :func:`reduce_over`'s, exact over the channels for an order ``p > 0``; the order sits at
    argument ``order``, then ``dim`` and ``keepdim``."""
    def rule(ctx, args, kwargs):
        exact = _exact_order(arg(args, kwargs, order, order_name, 2))
        rest = tuple(args[order + 1:order + 3])
        return reduce_over(exact)(ctx, (args[0],) + rest, {k: v for k, v in kwargs.items() if k != order_name})

    rule.__name__ = "norm_over"
    return rule


def normalize_rule(ctx, args, kwargs):
    """``F.normalize(x, p, dim)``: ``x`` over its ``p``-norm along ``dim``. Over the channels it is exact for
    ``p > 0`` (the norm of the kept channels is the masked original's; the reference zeroes the removed
    ones first); along another dim the channels pass."""
    x = args[0]
    dim = arg(args, kwargs, 2, "dim", 1)
    if x.label is None:
        return None
    if dim % len(x.shape) in varying(x.label):
        if not _exact_order(arg(args, kwargs, 1, "p", 2.0)) or len(varying(x.label)) > 1:
            ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over the channels")
            return None
        ctx.node.meta["fxprune_contract"] = True
    return x.label


def extreme_fix(clamp_op, method: str):
    """``amax``/``amin`` over dims that lost channels: the masked original's removed channels are zeros, so its
    maximum (minimum) is the kept channels' clamped from below (above) by 0. The node keeps its name and becomes
    the clamp (``clamp_op``, or the ``method`` of a ``call_method`` node); the reduction is a new node before it
    (CBAM's and CSATv2's maximum over the channels)."""

    def fix(node, rw):
        if _reduced_dims(node, rw) is not None:
            _split_off(node, node.target, method if node.op == "call_method" else clamp_op, 0.0)

    return fix


def _reduced_dims(node, rw):
    """``(original input shape, reduced dims)`` of a reduction node whose reduced dims lost channels; None
    when none did, or when it reduces every dim (its channels were pinned: :func:`reduce_over`)."""
    dims = arg(node.args, node.kwargs, 1, "dim")
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return None
    old, new = rw.old_shape(node.args[0]), rw.new_shape(node.args[0])
    dims = {d % len(old) for d in ((dims,) if isinstance(dims, int) else dims)}
    return None if all(old[d] == new[d] for d in dims) else (old, dims)


def _split_off(node, inner_target, outer_target, value) -> None:
    """``node`` becomes ``outer_target(inner, value)`` where ``inner`` is a new node before it calling
    ``inner_target`` with ``node``'s arguments: the node keeps its name, so the checks compare it."""
    with node.graph.inserting_before(node):
        inner = node.graph.create_node(node.op, inner_target, node.args, node.kwargs)
    node.target, node.args, node.kwargs = outer_target, (inner, value), {}


def max_min_rule(ctx, args, kwargs):
    """``torch.max``/``torch.min`` (and ATen's ``max.dim``/``min.dim``): with a tensor second argument elementwise;
    over a ``dim``, a (values, indices) pair, the values as :func:`reduce_over`'s extreme where only they are read
    (indices into the kept channels are not the original's); over every dim, it pins."""
    other = arg(args, kwargs, 1, "dim", arg(args, kwargs, 1, "other"))
    if isinstance(other, T):
        return elementwise(ctx, args, kwargs)
    x = args[0]
    if other is None or x.label is None:
        return reduce_over(True)(ctx, (x, other), {})
    label = reduce_over(True)(ctx, (x, other, arg(args, kwargs, 2, "keepdim", False)), {})
    if ctx.node.meta.get("fxprune_contract") and any(
            u.target is not operator.getitem or u.args[1] != 0 for u in ctx.node.users):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} returns the positions of a maximum or minimum over the "
                         "channels")
        ctx.node.meta.pop("fxprune_contract")
        return None
    return (label, label) if len(ctx.out_shape) == 2 and isinstance(ctx.out_shape[0], tuple) else label


def zero_joined_fix(node, rw):
    """``torch.max(x, dim)`` over a dim that lost channels (:func:`max_min_rule`): ``x`` with one zero appended
    along that dim, so its values are the masked original's (a removed channel is a zero there)."""
    x = node.args[0]
    dim = arg(node.args, node.kwargs, 1, "dim")
    if not isinstance(dim, int):
        return
    old, new = rw.old_shape(x), rw.new_shape(x)
    dim %= len(old)
    if old[dim] == new[dim]:
        return
    with node.graph.inserting_before(node):
        joined = node.graph.call_function(torch.nn.functional.pad, (x, [0, 0] * (len(old) - 1 - dim) + [0, 1]))
    node.update_arg(0, joined)


def mean_fix(sum_op, div_op):
    """A mean over dims that lost channels: ``sum(x, dim) / count`` with the original count,
    which is the masked original's mean (its removed channels are zeros). The node keeps its
    name and becomes the division; the sum is a new node before it. ``sum_op``/``div_op`` are
    the dialect's spellings (a ``call_method`` node uses ``"sum"``/``"div"``)."""

    def fix(node, rw):
        reduced = _reduced_dims(node, rw)
        if reduced is None:
            return
        old, dims = reduced
        sum_target, div_target = ("sum", "div") if node.op == "call_method" else (sum_op, div_op)
        _split_off(node, sum_target, div_target, math.prod(old[d] for d in dims))

    return fix


def _variance_args(args, kwargs):
    """``(dims, keepdim, correction)`` of a ``var``/``std`` call in any spelling (``torch.var(x, dim, unbiased,
    keepdim)``, ``correction=``, ATen's ``var.correction``/``var.dim``); dims None: over every dim."""
    dims = arg(args, kwargs, 1, "dim")
    unbiased = kwargs.get("unbiased", args[2] if len(args) > 2 and isinstance(args[2], bool) else True)
    if isinstance(dims, bool):   # torch.var(x, unbiased)
        dims, unbiased = None, dims
    correction = kwargs.get("correction")
    correction = (1 if unbiased else 0) if correction is None else correction
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    if isinstance(dims, int):
        dims = (dims,)
    return (tuple(dims) if dims else None), bool(keepdim), correction


def variance_over(ctx, args, kwargs):
    """``var`` and ``std`` over ``dim``: as a sum (:func:`reduce_over`), exact over the channels with the
    masked original's count (:func:`variance_fix`): timm's ``SimpleNorm``, a LayerNorm written with ``var``.

    Over the positions of a grid but not its blocks (each group of ``x.reshape(b, groups, c // groups, h, w)``:
    EvoNorm's group std) the groups go whole, as a GroupNorm's do: the others' statistics stay as they were."""
    dims, keepdim, _ = _variance_args(args, kwargs)
    x = args[0]
    grid = grid_of(ctx.canonical(x.label)) if dims else None
    if grid is not None:
        blocks, positions, ids = grid
        over = {d % len(x.shape) for d in dims}
        if positions in over and blocks not in over:
            ctx.unify(ids[:, :1], ids, f"{describe(ctx.node, ctx.gm)} takes a variance over each group's channels: "
                                       "groups go whole")
    return reduce_over(True)(ctx, (tied(ctx, x), list(dims) if dims else None, keepdim), {})


variance_over.takes_grids = True


def variance_fix(root_of_variance: bool):
    """A variance over dims that lost channels, recomputed as the masked original's: with ``N`` the original
    count and ``m = sum(x) / N``, ``(sum((x - m)^2) + (N - n) m^2) / (N - correction)`` over the ``n`` kept
    positions (each removed one is a zero, ``m`` away from the mean); ``std`` is its square root."""

    def fix(node, rw):
        x = node.args[0]
        dims, keepdim, correction = _variance_args(node.args, node.kwargs)
        if dims is None:
            return   # over every dim: reduce_over pinned its channels
        old, new = rw.old_shape(x), rw.new_shape(x)
        dims = tuple(sorted({d % len(old) for d in dims}))
        count, kept = math.prod(old[d] for d in dims), math.prod(new[d] for d in dims)
        if count == kept:
            return
        g = node.graph
        with g.inserting_before(node):
            mean = g.call_function(torch.div, (g.call_function(torch.sum, (x, dims), {"keepdim": True}), count))
            dev = g.call_function(torch.sub, (x, mean))
            squares = g.call_function(torch.sum, (g.call_function(torch.mul, (dev, dev)), dims), {"keepdim": keepdim})
            mean_out = mean if keepdim else g.call_function(torch.squeeze, (mean, dims))
            removed = g.call_function(torch.mul, (g.call_function(torch.mul, (mean_out, mean_out)), count - kept))
            variance = g.call_function(torch.div, (g.call_function(torch.add, (squares, removed)), count - correction))
        node.op, node.kwargs = "call_function", {}
        node.target, node.args = (torch.sqrt, (variance,)) if root_of_variance else (torch.clone, (variance,))

    return fix


def first_input(ctx, args, kwargs):
    """Ops whose output is their first input in another dtype or memory layout (``type_as``,
    ``to``): the other tensor arguments lend only their dtype."""
    x = args[0]
    if getattr(x, "param", None) is not None:
        derives_param(ctx, [x])
        return None
    return getattr(x, "label", None)


def filled_like(ctx, args, kwargs):
    """``zeros_like``, ``ones_like``, ``full_like``: a tensor of one value in its input's shape. Every channel
    holds the same value, so it carries its input's channels (pruned, it is made in the pruned shape)."""
    x = args[0]
    return None if getattr(x, "param", None) is not None else getattr(x, "label", None)


def constant_like(ctx, args, kwargs):
    """``new_zeros``, ``zeros_like``, ...: a new tensor of constants; its input lends only a shape or
    dtype, so its channels are not read (the result carries none: it pins what it meets)."""
    return None


def index_add_rule(ctx, args, kwargs):
    """``x.index_add(dim, index, source)`` (JetMoE's experts adding their rows back at their tokens'): along a
    dim without channels, ``x`` and ``source`` meet position by position on the other dims, as in an add
    (:func:`elementwise`); along the channels, or with a parameter, it pins."""
    x, src = args[0], arg(args, kwargs, 3, "source")
    dim = arg(args, kwargs, 1, "dim") % len(x.shape)
    if x.param is not None or src.param is not None or any(
            t.label is not None and dim in varying(t.label) for t in (x, src)):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} adds at indices along the channels")
    return elementwise(ctx, (x, T(src.label, tuple(x.shape))), {})


def glu_rule(ctx, args, kwargs):
    """``F.glu(x, dim)`` (``nn.GLU``, ATen ``glu``): ``a * sigmoid(b)`` for the two halves ``a, b`` of ``x``
    along ``dim``. Output channel ``i`` is channel ``i`` of each half, tied together (as in ``a * b.sigmoid()``
    after a ``chunk``); the halves stay halves of equal size. Along a dim without channels, the channels ride
    along position by position."""
    x = args[0]
    nd = len(x.shape)
    dim = ctx.module().dim if ctx.node.op == "call_module" else arg(args, kwargs, 1, "dim", -1)
    dim %= nd
    vary = varying(x.label)
    if x.param is not None or (vary and vary != [dim] and dim in vary):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} halves channels spread over several dims")
    if dim not in vary:
        return None if x.label is None else x.label.narrow(dim, 0, 1)
    a, b = along(x.label, dim, x.shape[dim]).chunk(2)
    out = ctx.unify(a, b, f"{describe(ctx.node, ctx.gm)} gates them by fixed channels")
    return out.view([1] * dim + [-1] + [1] * (nd - dim - 1))
