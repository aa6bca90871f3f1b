"""Rules of the ops that make new channels: convolutions (plain, grouped, depthwise,
transposed) and linear layers, as modules and as functions.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..labels import along, varying
from .schema import T, arg, describe, pin_all


def _conv(ctx, x, weight, bias, groups, transposed=False, out=None):
    """A conv's channels; ``out``: its output channels' ids when they were made already (:func:`_conv_call`)."""
    nd = len(ctx.out_shape)
    label, c_in, c_out = x.label, x.shape[1], ctx.out_shape[1]
    if label is not None and any(d != 1 for d in varying(label)):
        if _full_width(ctx, x, transposed):
            d = varying(label)[0]
            return along(label, d, x.shape[d]).view([1] * d + [-1] + [1] * (nd - d - 1))
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} mixes positions that carry channels")
        label = None
    ins = along(label, 1, c_in)
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == 1:
        out = ctx.fresh(c_out) if out is None else out
        if weight is not None:
            ctx.member(weight, in_dim, ins, "consumer", "weight")
        ctx.cost(out, ins)
    elif transposed:
        ctx.pin(label, f"grouped transposed {describe(ctx.node, ctx.gm)} is not supported")
        return None
    elif c_in // groups == 1:
        # A depthwise conv can lose whole groups: each output channel follows its input channel.
        follows = ins.repeat_interleave(c_out // groups)
        out = follows if out is None else ctx.unify(follows, out, f"depthwise {describe(ctx.node, ctx.gm)}'s "
                                                                  "computed weight rows follow its channels")
        ctx.cost(out)
    else:
        out = ctx.fresh(c_out) if out is None else out
        ins_rows, out_rows = ins.view(groups, c_in // groups), out.view(groups, c_out // groups)
        name = f"grouped {describe(ctx.node, ctx.gm)}"

        def whole():
            # group b's input and output channels are one channel, kept or removed together: its weight rows
            # go with it, its columns stay, and the rewrite sets ``groups`` from the kept width
            ctx.unify(ins_rows[:, :1], torch.cat([ins_rows, out_rows], 1), f"{name} loses whole groups")
            ctx.node.meta["fxprune_group_width"] = (c_in // groups, c_out // groups)
            if "fxprune_weight_gather" in ctx.node.meta:   # a weight computed at run time: its columns stay too
                where, (rows_dim, _), axis = ctx.node.meta["fxprune_weight_gather"]
                ctx.node.meta["fxprune_weight_gather"] = (where, (rows_dim, None), axis)
            ctx.cost(out)

        def balanced():
            # each group keeps as many input channels as the others (balanced blocks, free positions in
            # each) and as many output channels; the weight's input columns are cut group by group
            ctx.balance(ins_rows, whole=False)
            if weight is not None:
                ctx.grouped_member(weight, in_dim, ins_rows)
            ctx.node.meta["fxprune_grouped"] = groups
            if c_out // groups > 1:
                ctx.balance(out_rows, whole=False)
            else:
                ctx.pin(out, f"{name} has one output channel per group")
            ctx.cost(out, ins)

        ctx.grouped_conv(ins_rows, out_rows, whole, balanced)
    if weight is not None:
        ctx.member(weight, out_dim, out, "producer", "weight")
    if bias is not None:
        ctx.member(bias, 0, out, "producer", "bias")
    return out.view((1, c_out) + (1,) * (nd - 2))


def _full_width(ctx, x, transposed) -> bool:
    """A conv whose spatial axis carries channels and whose own channels carry none (ECA's ``Conv1d(1, 1, k)``
    over a pooled ``[n, 1, C]``) mixes neighbouring channels. With the output as long as the input, it is exact
    at the original width: the rewrite runs it on its input spread back to that width with zeros at the removed
    positions (what the masked original reads there) and reads its output at the kept ones
    (``node.meta["fxprune_full_width"]``, :func:`fxprune.rewrite.graph.run_full_width`); position ``j`` of
    the output carries the channel of position ``j`` of the input. Its weights stay whole."""
    vary = varying(x.label)
    if transposed or len(vary) != 1 or vary[0] < 2 or tuple(ctx.out_shape[2:]) != tuple(x.shape[2:]):
        return False
    ctx.node.meta["fxprune_full_width"] = vary[0]
    ctx.node.meta["fxprune_contract"] = True   # it reads the removed channels: the reference zeroes them first
    return True


def _conv_call(ctx, args, kwargs, groups, transposed=False):
    """A conv called as a function: on parameters, or on a weight computed at run time.

    A computed weight without channels of its own (timm's ``StdConv2d`` and NF-Nets standardise theirs
    at every call) is read at the kept positions: ``conv(x, W)[kept_out] = conv(x[kept_in], W[kept_out,
    kept_in])`` whatever made ``W``, so the rewrite selects its columns, and its rows unless they are
    the parameters' own (``node.meta["fxprune_weight_gather"]``, :func:`fxprune.rewrite.graph.gather_weight`).
    The rows are the parameters' own where the analysis seeded the parameters' rows with the output channels
    (:meth:`~fxprune.couple.analysis.Analysis.seed_rows`) and every op on the way kept them as rows
    (a standardisation is row by row): the parameters are then sliced by rows. Their columns stay whole
    (a standardisation's statistics span them). A depthwise conv has one column per group; a grouped conv
    reads each group's kept columns (balanced: as many in each group) by one ``gather``.
    """
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if _computed_options(ctx.node):   # timm's CondConv: groups=self.groups * B, the batch folded into the channels
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes its stride, padding or groups "
                                          "computed at run time")
    if w.param is not None and (b is None or b.param is not None):
        return _conv(ctx, x, w.param, b.param if b is not None else None, groups, transposed=transposed)
    depthwise = groups > 1 and not transposed and x.shape[1] == groups
    rows = _computed_rows(ctx, w)
    if (groups != 1 and transposed) or (w.label is not None and rows is None) or (
            b is not None and b.param is None):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    where = 1 if len(args) > 1 else "weight"
    ctx.node.meta["fxprune_weight_gather"] = (where, (out_dim if rows is None else None,
                                                      None if depthwise else in_dim), 1)
    ctx.node.meta["fxprune_contract"] = True  # no weight columns to zero: the reference zeroes the removed inputs
    out = _conv(ctx, x, None, b.param if b is not None else None, groups, transposed=transposed, out=rows)
    node = ctx.node.args[where] if isinstance(where, int) else ctx.node.kwargs[where]
    if out is not None and isinstance(node, fx.Node):
        ctx.computed(node, out_dim, out.reshape(-1), "producer")
        if groups == 1 and x.label is not None and varying(x.label) == [1]:
            ctx.computed(node, in_dim, along(x.label, 1, x.shape[1]), "consumer")
    return out


def _computed_options(node: fx.Node) -> bool:
    """Whether a conv call's stride, padding, dilation or groups (any argument but its input, weight and bias)
    is computed at run time."""
    return any(isinstance(a, fx.Node) for a in node.args[3:]) or any(
        isinstance(v, fx.Node) for k, v in node.kwargs.items() if k not in ("input", "weight", "bias"))


def _computed_rows(ctx, w):
    """The seeded ids (:meth:`~fxprune.couple.analysis.Context.seeded_rows`), taken as the layer's output
    channels, when the computed weight ``w`` carries exactly them as its rows, one per row, and no other
    channels; else None, a seed pinned (the rows were mixed on the way: the parameters stay whole)."""
    seed = ctx.seeded_rows()
    if seed is None:
        return None
    rows = along(w.label, 0, w.shape[0]) if w.label is not None and varying(w.label) == [0] else None
    if rows is None or not bool((rows >= 0).all()) or not torch.equal(ctx.canonical(rows), ctx.canonical(seed)):
        ctx.pin(ctx.take_rows(), f"{describe(ctx.node, ctx.gm)} takes a weight whose rows are mixed on the way "
                                 "from its parameters")
        return None
    return ctx.take_rows()


def conv_weight_rows(transposed: int | None = None):
    """The ``weight_rows`` of a conv call (a :class:`~.schema.Rule` field): its weight (argument 1), whose
    rows are its output channels, for a conv that is not transposed (``transposed``: that flag's position)."""

    def weight_rows(node):
        if transposed is not None and arg(node.args, node.kwargs, transposed, "transposed", False):
            return None
        return arg(node.args, node.kwargs, 1, "weight")

    return weight_rows


def conv_module(ctx, args, kwargs):
    m, name = ctx.module(), ctx.node.target
    bias = f"{name}.bias" if m.bias is not None else None
    return _conv(ctx, args[0], f"{name}.weight", bias, m.groups, transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def conv_function(ctx, args, kwargs):
    return _conv_call(ctx, args, kwargs, arg(args, kwargs, 6, "groups", 1))


def aten_convolution(ctx, args, kwargs):
    """``aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``."""
    transposed, groups = arg(args, kwargs, 6, "transposed", False), arg(args, kwargs, 8, "groups", 1)
    return _conv_call(ctx, args, kwargs, groups, transposed=bool(transposed))


def conv_transpose_function(ctx, args, kwargs):
    """``conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)``."""
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if w.param is None or (b is not None and b.param is None):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    return _conv(ctx, x, w.param, b.param if b is not None else None, arg(args, kwargs, 6, "groups", 1),
                 transposed=True)


def embedding_function(ctx, args, kwargs):
    """``aten.embedding(weight, indices, ...)``: each row's entries are new channels (the columns
    of the table), which ride along with the table's dim 1."""
    return _embedding(ctx, args, kwargs, args[0], args[1], None)


def embedding_functional(ctx, args, kwargs):
    """``F.embedding(input, weight, padding_idx, max_norm, ...)``: ``aten.embedding``'s arguments the other way
    round."""
    return _embedding(ctx, args, kwargs, arg(args, kwargs, 1, "weight"), args[0], arg(args, kwargs, 3, "max_norm"))


def embedding_module(ctx, args, kwargs):
    """``nn.Embedding``: the columns of its table are the output's channels."""
    return _embedding(ctx, args, kwargs, f"{ctx.node.target}.weight", args[0], ctx.module().max_norm)


def _embedding(ctx, args, kwargs, table, indices, max_norm):
    """``table`` is the table as an argument (a :class:`T`) or a module's parameter name."""
    param = table if isinstance(table, str) else getattr(table, "param", None)
    if param is None:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes a table computed at run time")
    if max_norm is not None:   # rows looked up are rescaled in place to a norm taken over their channels
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} renormalises rows to max_norm={max_norm}")
    if isinstance(indices, T) and indices.label is not None:
        ctx.pin(indices.label, f"{describe(ctx.node, ctx.gm)} looks up indices that carry channels")
    nd, width = len(ctx.out_shape), ctx.out_shape[-1]
    out = ctx.fresh(width)
    ctx.member(param, 1, out, "producer", "weight")
    return out.view((1,) * (nd - 1) + (width,))


def resize_embedding(m, node, rw):
    m.num_embeddings, m.embedding_dim = m.weight.shape


@dataclass(frozen=True)
class Conv2dSpec:
    """What a 2-d convolution call is, whatever its spelling: the fields of ``nn.Conv2d`` that say how it
    runs (padding given as numbers; a ``"same"``/``"valid"`` string reads as 0, the cost of padding aside)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def conv_module_spec(node, modules: dict) -> Conv2dSpec | None:
    """A ``nn.Conv2d`` module's :class:`Conv2dSpec` (None for 1-d and 3-d convs)."""
    m = modules.get(node.target)
    if not isinstance(m, nn.Conv2d):
        return None
    padding = m.padding if isinstance(m.padding, tuple) else (0, 0)
    return Conv2dSpec(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), tuple(padding),
                      tuple(m.dilation), m.groups)


def conv_call_spec(stride: int, padding: int, dilation: int, groups: int, transposed: int | None = None):
    """The ``spec`` of a conv call whose stride, padding, dilation, groups (and transposed flag) sit at
    these argument positions: a :class:`Conv2dSpec` read from the call and its weight's shape, None for a
    transposed or not 2-d conv."""

    def spec(node, modules: dict) -> Conv2dSpec | None:
        if transposed is not None and arg(node.args, node.kwargs, transposed, "transposed", False):
            return None
        weight = arg(node.args, node.kwargs, 1, "weight")
        meta = getattr(weight, "meta", {}).get("tensor_meta") if weight is not None else None
        shape = tuple(getattr(meta, "shape", ()) or ())
        if len(shape) != 4 or _computed_options(node):
            return None   # a conv whose groups, stride, ... are computed at run time (CondConv's groups * batch)
        g = int(arg(node.args, node.kwargs, groups, "groups", 1))
        return Conv2dSpec(shape[1] * g, shape[0], shape[2:], _pair(arg(node.args, node.kwargs, stride, "stride"), 1),
                          _pair(arg(node.args, node.kwargs, padding, "padding"), 0),
                          _pair(arg(node.args, node.kwargs, dilation, "dilation"), 1), g)

    return spec


def _pair(v, default):
    v = default if v is None or isinstance(v, str) else v
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def resize_conv(m, node, rw):
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    old_out = m.out_channels
    m.out_channels = m.weight.shape[1] * m.groups if transposed else m.weight.shape[0]
    if m.groups > 1 and (transposed or m.in_channels == m.groups or "fxprune_group_width" in node.meta):
        m.groups = m.out_channels // (old_out // m.groups)  # depthwise, or whole groups: it loses groups
    m.in_channels = m.weight.shape[0] if transposed else m.weight.shape[1] * m.groups


def fix_groups(index: int = 6):
    """A depthwise conv call's ``groups`` argument (at position ``index``) follows its pruned output channels
    (it loses whole groups), as a grouped conv's does where it loses whole groups (``groups="whole"`` or
    ``"blocked"``, :func:`fxprune.couple.couple`); else a grouped conv keeps its groups (balanced blocks)."""

    def fix_conv_function(node, rw):
        groups = arg(node.args, node.kwargs, index, "groups", 1)
        if isinstance(groups, int) and groups > 1 and (rw.old_shape(node.args[0])[1] == groups or
                                                       "fxprune_group_width" in node.meta):
            old, new = rw.old_shape(node)[1], rw.new_shape(node)[1]
            rw.set_arg(node, index, "groups", new // (old // groups))

    return fix_conv_function


fix_conv_function = fix_groups(6)


def _linear(ctx, x, weight, bias, w_in=1, w_out=0, out=None):
    """A linear layer's channels; ``weight`` None: computed at run time (:func:`linear_function`), ``out`` its
    output channels' ids when they were made already."""
    nd = len(x.shape)
    label, c_in, c_out = x.label, x.shape[-1], ctx.out_shape[-1]
    vary = varying(label)
    if label is not None and c_in == 1 and not vary:
        vary = [nd - 1]  # a single input feature: the label's only id is that feature
    if nd - 1 in vary and len(vary) > 1:
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} reads channels spread over several dims")
        label, vary = None, []
    if label is not None and nd - 1 not in vary:
        # The linear acts along a dim that carries no channels (a width, a token dim):
        # channels ride along the other dims; its own output features stay fixed.
        ctx.cost(label)
        return label
    ins = along(label, nd - 1, c_in)
    out = ctx.fresh(c_out) if out is None else out
    if weight is not None:
        ctx.member(weight, w_in, ins, "consumer", "weight")
        ctx.member(weight, w_out, out, "producer", "weight")
    if bias is not None:
        ctx.member(bias, 0, out, "producer", "bias")
    ctx.cost(out, ins)
    return out.view((1,) * (nd - 1) + (c_out,))


def linear_module(ctx, args, kwargs):
    m, name = ctx.module(), ctx.node.target
    return _linear(ctx, args[0], f"{name}.weight", f"{name}.bias" if m.bias is not None else None)


def linear_function(ctx, args, kwargs):
    """``F.linear(x, weight, bias)``. A weight computed at run time (a weight norm) is read at the kept
    positions as a conv's is (:func:`_conv_call`: its rows sliced in the parameters where they were seeded and
    kept as rows, else gathered; its columns gathered). A bias computed at run time without channels of its own
    (BEiT's and Swin V2's ``cat((q_bias, k_bias, v_bias))``) is read at the kept outputs:
    ``linear(x, W, b)[kept] = linear(x, W[kept], b[kept])``. Both at once pin."""
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    computed_bias = b is not None and b.param is None and b.label is None and len(b.shape) == 1
    rows = _computed_rows(ctx, w) if w.param is None else None
    if (b is not None and b.param is None and not computed_bias) or (w.param is None and (
            computed_bias or (w.label is not None and rows is None) or len(w.shape) != 2)):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    bias = b.param if b is not None and not computed_bias else None
    if w.param is not None:
        out = _linear(ctx, x, w.param, bias)
        if computed_bias and out is not None:
            ctx.node.meta["fxprune_weight_gather"] = (2 if len(args) > 2 else "bias", (0, None), -1)
        return out
    where = 1 if len(args) > 1 else "weight"
    out = _linear(ctx, x, None, bias, out=rows)
    ctx.node.meta["fxprune_weight_gather"] = (where, (0 if rows is None else None, 1), -1)
    ctx.node.meta["fxprune_contract"] = True  # no weight columns to zero: the reference zeroes the removed inputs
    node = ctx.node.args[where] if isinstance(where, int) else ctx.node.kwargs[where]
    features = along(out, out.dim() - 1, w.shape[0]) if out is not None and varying(out) == [out.dim() - 1] else None
    if rows is not None and (features is None or not torch.equal(ctx.canonical(features), ctx.canonical(rows))):
        ctx.pin(rows, f"{describe(ctx.node, ctx.gm)} acts along a dim without channels: its features stay")
    if features is not None and isinstance(node, fx.Node):
        ctx.computed(node, 0, features, "producer")
    return out


def linear_weight_rows(node):
    """The ``weight_rows`` of ``F.linear``: its weight, whose rows are its output features."""
    return arg(node.args, node.kwargs, 1, "weight")


def addmm_function(ctx, args, kwargs):
    """``addmm(bias, x, weight)`` with ``weight`` stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    b, x, w = arg(args, kwargs, 0, "self"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    if not all(isinstance(t, T) for t in (b, x, w)) or w.param is None or b.param is None or len(b.shape) != 1:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} is not a bias plus a product with a parameter")
    return _linear(ctx, x, w.param, b.param, w_in=0, w_out=1)


def resize_linear(m, node, rw):
    m.out_features, m.in_features = m.weight.shape


def resize_conv1d_hf(m, node, rw):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[in, out]``; its
    ``forward`` reads ``nf`` and the input's size at run time, nothing else."""
    m.nx, m.nf = m.weight.shape
