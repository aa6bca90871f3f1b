"""The op-rules table: how every op moves, creates, consumes or ties channels.

One :class:`Rule` per kind of op, registered under every spelling of the op (module
type, function, method name), in the manner of
``torch/ao/quantization/backend_config``. A rule has up to three parts:

* ``couple(ctx, args, kwargs) -> label`` — at analysis time, given the inputs as
  :class:`fxprune.coupling.T` (label, shape, parameter name) and plain values, return
  the output's label (see :mod:`fxprune.labels`) and tell ``ctx`` about new channels,
  members, unifications and pins;
* ``fix(node, rw)`` — at rewrite time, update literal arguments that name channel
  counts (``view(-1, 512 * 7 * 7)``, ``split([32, 32])``, ``groups=``);
* ``resize(module, node, rw)`` — at rewrite time, update a module's attributes
  (``in_channels``, ``num_features``, ...) after its parameters were sliced;
* ``on_meta(module, x) -> (output, flops)`` — for a module, its output on the ``meta``
  device and its FLOPs without running it (shape propagation, :mod:`fxprune.trace`);
  None where the formula does not cover the call, which then runs on ``meta``.

An op with no entry pins every channel it touches (:func:`pin_all`): it can make a
model less prunable, never wrong. Adding an op is adding a row at the bottom.

Example::

    >>> import torch
    >>> from fxprune.rules import RULES
    >>> RULES[torch.nn.Conv2d].couple.__name__, RULES["view"].couple.__name__
    ('conv_module', 'shape_op_rule')
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import conv_flop_count, flop_registry

from .labels import FIXED, along, expand_to, varying


@dataclass
class Rule:
    couple: Callable
    fix: Callable | None = None
    resize: Callable | None = None
    on_meta: Callable | None = None


def meta_formula(module: nn.Module) -> Callable | None:
    """The ``on_meta`` formula of ``module``'s rule, if it has one."""
    rule = RULES.get(type(module))
    return rule.on_meta if rule is not None else None


RULES: dict[object, Rule] = {}


def register(rule: Rule, *spellings) -> None:
    for s in spellings:
        RULES[s] = rule


def rule_for(node: fx.Node, gm: fx.GraphModule, modules: dict | None = None) -> Rule:
    """The rule of ``node``; ``modules`` (``dict(gm.named_modules())``) saves the lookups."""
    if node.op == "output":
        return OUTPUT
    if node.op == "call_module":
        key = type(modules[node.target] if modules is not None else gm.get_submodule(node.target))
    else:
        key = node.target
    return RULES.get(key, DEFAULT)


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' at node '{node.name}'"
    return f"'{getattr(node.target, '__name__', node.target)}' at node '{node.name}'"


# ----------------------------------------------------------------------------- helpers

def tensors(args, kwargs):
    """Every tensor input (coupling.T) in args and kwargs, nested containers included."""
    from .coupling import T

    out = []

    def walk(a):
        if isinstance(a, T):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)

    walk(args)
    walk(kwargs)
    return out


def arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def pin_all(ctx, args, kwargs, reason):
    for t in tensors(args, kwargs):
        ctx.pin(t.label, reason)
        if t.param is not None:
            ctx.fix_param(t.param, reason)
    return None


def _align(label, ndim):
    """Left-pad a label with size-1 dims, as broadcasting does."""
    while label.dim() < ndim:
        label = label.unsqueeze(0)
    return label


def _one_axis(ctx, label):
    """Make a label vary along at most one dim, unifying across the others.

    A reshape can spread one channel dim over several (``view(n, g, c // g, h, w)`` in a
    channel shuffle, a pixel shuffle). A rewrite can only shrink such a value as a
    sub-grid, so one dim keeps the channels and the entries across the others are tied:
    the dim with the most distinct ids (the last one on a tie), which is ``c // g`` in a
    channel shuffle and the output channels of a pixel shuffle.
    """
    label = ctx.canonical(label)
    dims = varying(label)
    if len(dims) <= 1:
        return label

    def distinct(d):
        index = [0] * label.dim()
        index[d] = slice(None)
        return (int(torch.unique(label[tuple(index)]).numel()), d)

    last = max(dims, key=distinct)
    dims = [d for d in dims if d != last] + [last]
    moved = label.movedim(last, -1).reshape(-1, label.shape[last])
    # every column is one channel: tie each entry to the column's first
    ctx.unify(moved[:1], moved, f"reshape at '{ctx.node.name}' spreads channels over several dims")
    index = [slice(0, 1) if d in dims[:-1] else slice(None) for d in range(label.dim())]
    return ctx.canonical(label[tuple(index)])


# ----------------------------------------------------------------------------- rules

def default_rule(ctx, args, kwargs):
    return pin_all(ctx, args, kwargs, f"no rule for {describe(ctx.node, ctx.gm)}: its channels are kept")


def output_rule(ctx, args, kwargs):
    return pin_all(ctx, args, kwargs, "model output")


DEFAULT = Rule(default_rule)
OUTPUT = Rule(output_rule)


def elementwise(ctx, args, kwargs):
    """Same-position ops (activations, add, mul with broadcasting, dropout, clamp, ...)."""
    ins = tensors(args, kwargs)
    out_shape = ctx.out_shape
    nd = len(out_shape)

    def sizes_of(t):
        return (1,) * (nd - len(t.shape)) + tuple(t.shape)

    labeled = [(_align(t.label, nd), t) for t in ins if t.label is not None and t.param is None]
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


def _conv(ctx, x, weight, bias, groups, transposed=False):
    nd = len(ctx.out_shape)
    label, c_in, c_out = x.label, x.shape[1], ctx.out_shape[1]
    if label is not None and any(d != 1 for d in varying(label)):
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} mixes positions that carry channels")
        label = None
    ins = along(label, 1, c_in)
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == 1:
        out = ctx.fresh(c_out)
        ctx.member(weight, in_dim, ins, "consumer", "weight")
        ctx.cost(out, ins)
    elif transposed:
        ctx.pin(label, f"grouped transposed {describe(ctx.node, ctx.gm)} is not supported")
        return None
    else:
        # A grouped conv can lose whole groups: tie each group's input channels together
        # and to its output channels (a depthwise conv is the case of one channel per group).
        blocks = ins.view(groups, c_in // groups)
        if blocks.shape[1] > 1:
            ctx.unify(blocks[:, :1], blocks, f"grouped {describe(ctx.node, ctx.gm)} keeps whole groups")
        out = ctx.roots(blocks[:, 0]).repeat_interleave(c_out // groups)
        ctx.cost(out)
    ctx.member(weight, out_dim, out, "producer", "weight")
    if bias is not None:
        ctx.member(bias, 0, out, "producer", "bias")
    return out.view((1, c_out) + (1,) * (nd - 2))


def conv_module(ctx, args, kwargs):
    m, name = ctx.module(), ctx.node.target
    bias = f"{name}.bias" if m.bias is not None else None
    return _conv(ctx, args[0], f"{name}.weight", bias, m.groups, transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def conv_function(ctx, args, kwargs):
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    if w.param is None or (b is not None and b.param is None):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    return _conv(ctx, x, w.param, b.param if b is not None else None, groups)


def resize_conv(m, node, rw):
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    old_out = m.out_channels
    m.out_channels = m.weight.shape[1] * m.groups if transposed else m.weight.shape[0]
    if m.groups > 1:
        m.groups = m.out_channels // (old_out // m.groups)
    m.in_channels = m.weight.shape[0] if transposed else m.weight.shape[1] * m.groups


def fix_conv_function(node, rw):
    groups = arg(node.args, node.kwargs, 6, "groups", 1)
    if groups > 1:
        old, new = rw.old_shape(node)[1], rw.new_shape(node)[1]
        rw.set_arg(node, 6, "groups", new // (old // groups))


def _linear(ctx, x, weight, bias):
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
    out = ctx.fresh(c_out)
    ctx.member(weight, 1, ins, "consumer", "weight")
    ctx.member(weight, 0, out, "producer", "weight")
    if bias is not None:
        ctx.member(bias, 0, out, "producer", "bias")
    ctx.cost(out, ins)
    return out.view((1,) * (nd - 1) + (c_out,))


def linear_module(ctx, args, kwargs):
    m, name = ctx.module(), ctx.node.target
    return _linear(ctx, args[0], f"{name}.weight", f"{name}.bias" if m.bias is not None else None)


def linear_function(ctx, args, kwargs):
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if w.param is None or (b is not None and b.param is None):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    return _linear(ctx, x, w.param, b.param if b is not None else None)


def resize_linear(m, node, rw):
    m.out_features, m.in_features = m.weight.shape


def _channel_norm(ctx, x, params):
    """Per-channel norms along dim 1 (BatchNorm, InstanceNorm): exact under pruning."""
    label = x.label
    vary = varying(label)
    if label is None:
        return None
    if 1 in vary:
        if len(vary) > 1 and "InstanceNorm" in describe(ctx.node, ctx.gm):
            ctx.pin(label, f"{describe(ctx.node, ctx.gm)} normalises over positions that carry channels")
            return None
        ids = along(label, 1, x.shape[1]) if len(vary) == 1 else None
        if ids is None:
            ctx.pin(label, f"{describe(ctx.node, ctx.gm)} sees channels spread over several dims")
            return None
        for role, name in params.items():
            if name is not None:
                ctx.member(name, 0, ids, "producer", role)
    return label


def norm_module(ctx, args, kwargs):
    m, name = ctx.module(), ctx.node.target
    params = {role: f"{name}.{attr}" if getattr(m, attr, None) is not None else None
              for role, attr in (("norm_weight", "weight"), ("norm_bias", "bias"),
                                 ("running_mean", "running_mean"), ("running_var", "running_var"))}
    return _channel_norm(ctx, args[0], params)


def batch_norm_function(ctx, args, kwargs):
    x = args[0]
    slots = (("running_mean", 1), ("running_var", 2), ("norm_weight", 3), ("norm_bias", 4))
    params = {}
    for role, i in slots:
        t = arg(args, kwargs, i, role.replace("norm_", ""))
        if t is not None and getattr(t, "param", None) is None:
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes statistics computed at run time")
        params[role] = t.param if t is not None else None
    return _channel_norm(ctx, x, params)


def resize_norm(m, node, rw):
    for attr in ("weight", "running_mean"):
        t = getattr(m, attr, None)
        if t is not None:
            m.num_features = t.shape[0]
            return
    m.num_features = rw.new_shape(node)[1]


def prelu_module(ctx, args, kwargs):
    m = ctx.module()
    if m.num_parameters == 1:
        return args[0].label
    return _channel_norm(ctx, args[0], {"scale": f"{ctx.node.target}.weight"})


def resize_prelu(m, node, rw):
    m.num_parameters = m.weight.shape[0]


def normalizes_trailing(ctx, args, kwargs):
    """LayerNorm over the trailing dims: channels there change the statistics."""
    x = args[0]
    if ctx.node.op == "call_module":
        k = len(ctx.module().normalized_shape)
    else:
        k = len(arg(args, kwargs, 1, "normalized_shape"))
    if any(d >= len(x.shape) - k for d in varying(x.label)):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over the channels (approximate; not pruned)")
        return None
    return x.label


def normalizes_channels(ctx, args, kwargs):
    """GroupNorm: statistics over groups of channels."""
    x = args[0]
    if 1 in varying(x.label):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over the channels (approximate; not pruned)")
        return None
    return x.label


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
    x = args[0]
    if ctx.node.op == "call_module":
        padded = len(ctx.module().padding) // 2
    else:
        padded = len(arg(args, kwargs, 1, "pad")) // 2
    if any(d >= len(x.shape) - padded for d in varying(x.label)):
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
    if dims is None:
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


def shape_op(fn):
    """Ops that only move positions: apply the same op to the label."""

    def shape_op_rule(ctx, args, kwargs):
        x = args[0]
        if x.label is None:
            return None
        full = expand_to(x.label, x.shape)
        rest = [a.label if hasattr(a, "label") else a for a in args[1:]]
        out = fn(full, *rest, **kwargs)
        if isinstance(out, (tuple, list)):
            return tuple(_one_axis(ctx, o) for o in out)
        return _one_axis(ctx, out)

    return shape_op_rule


def method(name):
    return lambda t, *a, **k: getattr(t, name)(*a, **k)


def fix_shape_args(first: int = 1):
    """view/reshape/expand: literal sizes of dims that carry channels follow the pruning."""

    def fix(node, rw):
        sizes = list(node.args[first:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
        if packed:
            sizes = list(sizes[0])
        new = rw.new_shape(node)
        for d in rw.varying_dims(node):
            if d < len(sizes) and not (isinstance(sizes[d], int) and sizes[d] == -1):
                sizes[d] = new[d]
        node.args = tuple(node.args[:first]) + ((tuple(sizes),) if packed else tuple(sizes))
        if "shape" in node.kwargs or "size" in node.kwargs:
            key = "shape" if "shape" in node.kwargs else "size"
            kw = dict(node.kwargs)
            kw[key] = tuple(new[d] if d in rw.varying_dims(node) else s for d, s in enumerate(kw[key]))
            node.kwargs = kw

    return fix


def fix_unflatten(node, rw):
    dim = arg(node.args, node.kwargs, 1, "dim")
    sizes = list(arg(node.args, node.kwargs, 2, "sizes"))
    dim = dim % len(rw.old_shape(node.args[0]))
    new = rw.new_shape(node)
    for i in range(len(sizes)):
        if dim + i in rw.varying_dims(node) and sizes[i] != -1:
            sizes[i] = new[dim + i]
    rw.set_arg(node, 2, "sizes", tuple(sizes))


def getitem_rule(ctx, args, kwargs):
    x, index = args
    from .coupling import T

    if not isinstance(x, T):  # a tuple from a multi-output node
        item = x[index]
        return item.label if isinstance(item, T) else None
    if x.label is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    vary = varying(x.label)
    for d, item in _index_dims(index, len(x.shape)):
        if d in vary and not (isinstance(item, slice) and item.step in (None, 1)):
            ctx.pin(x.label, f"indexing at '{ctx.node.name}' picks single channels")
            return None
    if any(not isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in index):
        ctx.pin(x.label, f"advanced indexing at '{ctx.node.name}'")
        return None
    return _one_axis(ctx, expand_to(x.label, x.shape)[index])


def _index_dims(index, ndim):
    """(input dim, index item) for each item of a basic index."""
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, d = [], 0
    for item in index:
        if item is Ellipsis:
            d += ndim - n_real
        elif item is None:
            continue
        else:
            out.append((d, item))
            d += 1
    return out


def fix_getitem(node, rw):
    src = node.args[0]
    if not isinstance(src, fx.Node) or not isinstance(src.meta.get("fxprune"), torch.Tensor):
        return
    index = node.args[1]
    packed = isinstance(index, tuple)
    items = list(index if packed else (index,))
    shape = rw.old_shape(src)
    positions = [i for i, it in enumerate(items) if it is not None and it is not Ellipsis]
    for (d, item), pos in zip(_index_dims(tuple(items), len(shape)), positions):
        if d in rw.varying_dims(src) and isinstance(item, slice):
            kept = rw.kept_along(src, d)
            start, stop, _ = item.indices(shape[d])
            items[pos] = slice(int(kept[:start].sum()), int(kept[:stop].sum()), None)
    node.args = (src, tuple(items) if packed else items[0])


def cat_rule(ctx, args, kwargs):
    """cat/stack: along the channel dim, offsets are tracked; along another dim, channels coincide."""
    from .coupling import T

    xs = list(arg(args, kwargs, 0, "tensors"))
    nd = len(ctx.out_shape)
    dim = arg(args, kwargs, 1, "dim", 0) % nd
    if ctx.node.target is torch.stack:
        xs = [T(None if t.label is None else t.label.unsqueeze(dim), t.shape[:dim] + (1,) + t.shape[dim:], t.param)
              for t in xs]
    labels = [None if t.param is not None else t.label for t in xs]
    vary = {d for lab in labels for d in varying(lab)}
    if vary <= {dim}:  # DenseNet, Inception, chunk -> cat: offsets
        parts = [along(lab, dim, t.shape[dim]) for t, lab in zip(xs, labels)]
        return torch.cat(parts).view([1] * dim + [-1] + [1] * (nd - dim - 1))
    if dim not in vary:  # e.g. a class token joined along the token dim: channels coincide
        result, joined = None, []
        sources = list(arg(ctx.node.args, ctx.node.kwargs, 0, "tensors"))
        for t, lab, src in zip(xs, labels, sources):
            if lab is None:
                param = param_behind(ctx, src, t, vary)
                if param is not None:  # a learned token: its entries follow the channels
                    joined.append((param, t))
                    continue
                lab = torch.full([t.shape[d] if d in vary else 1 for d in range(nd)], FIXED, dtype=torch.long)
            result = lab if result is None else ctx.unify(result, lab, f"'{ctx.node.name}' joins them with fixed channels")
        for param, t in joined:
            (d,) = vary
            shape = ctx.gm.get_parameter(param).shape
            ctx.member(param, d - (nd - len(shape)), along(result, d, t.shape[d]), "producer", "scale")
        return result.narrow(dim, 0, 1)
    return pin_all(ctx, args, kwargs, f"'{ctx.node.name}' concatenates channels along two dims at once")


def fix_split(node, rw):
    """split/chunk: piece sizes follow the pruning; chunk becomes split with explicit sizes."""
    dim = arg(node.args, node.kwargs, 2, "dim", 0)
    x = node.args[0]
    dim = dim % len(rw.old_shape(x))
    if dim not in rw.varying_dims(x):
        return
    sizes = [s[dim] for s in rw.new_shape(node)]
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, sizes, dim)
    node.kwargs = {}


# ----------------------------------------------------------------------------- shape formulas

def same_shape(module, x):
    """A module whose output is shaped like its input, at no FLOPs (norms, activations, dropout)."""
    return _empty(x.shape, x), 0


def _empty(shape, like):
    # not empty_like/new_empty: on the meta device they run Python decompositions (10x slower)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def conv_on_meta(module, x):
    """``nn.Conv1d/2d/3d``: torch's output-size formula and ``flop_counter``'s count."""
    nd = len(module.kernel_size)
    if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != module.in_channels:
        return None  # the real call raises its own error
    spatial = tuple(x.shape[-nd:])
    if module.padding == "same":
        out_spatial = spatial
    else:
        pad = (0,) * nd if module.padding == "valid" else module.padding
        out_spatial = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(
            spatial, pad, module.dilation, module.kernel_size, module.stride))
    if min(out_spatial) <= 0:
        return None
    batch = tuple(x.shape[:-nd - 1])
    out = _empty(batch + (module.out_channels,) + out_spatial, x)
    n = batch or (1,)
    flops = conv_flop_count(n + (module.in_channels,) + spatial, tuple(module.weight.shape),
                            n + (module.out_channels,) + out_spatial)
    return out, flops


def linear_on_meta(module, x):
    """``nn.Linear`` on an input of 2 or more dims (``F.linear`` runs one matrix product)."""
    if x.dim() < 2 or x.shape[-1] != module.in_features:
        return None
    rows = math.prod(x.shape[:-1])
    flops = flop_registry[torch.ops.aten.mm]((rows, module.in_features), (module.in_features, module.out_features))
    return _empty(tuple(x.shape[:-1]) + (module.out_features,), x), flops


# ----------------------------------------------------------------------------- the table

ELEMENTWISE = Rule(elementwise)
register(Rule(elementwise, on_meta=same_shape),
         nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
         nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
         nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
         nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, torchvision.ops.StochasticDepth)
register(ELEMENTWISE,
         # arithmetic
         operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
         operator.iadd, operator.isub, operator.imul, operator.itruediv,
         torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt,
         torch.rsqrt, torch.pow, torch.maximum, torch.minimum, torch.clamp, torch.where,
         "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "abs", "exp", "sqrt",
         "rsqrt", "pow", "clamp", "clamp_", "clamp_min", "clamp_max", "clone", "detach", "to", "float",
         "half", "double", "type_as", "contiguous", "sigmoid", "sigmoid_", "tanh", "relu", "relu_",
         # activations and dropout, functional spellings (modules above)
         F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
         F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.logsigmoid,
         F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
         torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.nn.functional.threshold,
         torchvision.ops.stochastic_depth)

register(Rule(normalize_over(1)), F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
         "softmax", "log_softmax")
register(Rule(conv_module, resize=resize_conv, on_meta=conv_on_meta), nn.Conv1d, nn.Conv2d, nn.Conv3d)
register(Rule(conv_module, resize=resize_conv), nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
register(Rule(conv_function, fix=fix_conv_function), F.conv1d, F.conv2d, F.conv3d)
register(Rule(linear_module, resize=resize_linear, on_meta=linear_on_meta), nn.Linear)
register(Rule(linear_function), F.linear)
register(Rule(norm_module, resize=resize_norm, on_meta=same_shape),
         nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, torchvision.ops.FrozenBatchNorm2d)
register(Rule(batch_norm_function), F.batch_norm, F.instance_norm)
register(Rule(prelu_module, resize=resize_prelu, on_meta=same_shape), nn.PReLU)
register(Rule(normalizes_trailing), nn.LayerNorm, F.layer_norm)
register(Rule(normalizes_channels, on_meta=same_shape), nn.GroupNorm, nn.LocalResponseNorm)
register(Rule(normalizes_channels), F.group_norm)
register(Rule(spatial),
         nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
         nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
         F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
         F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
         F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample)
register(Rule(pad), F.pad, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
         nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
         nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
register(Rule(reduce), torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")

FIX_SHAPE = fix_shape_args()
for _name in ("view", "reshape", "expand"):
    register(Rule(shape_op(method(_name)), fix=FIX_SHAPE), _name)
register(Rule(shape_op(torch.reshape), fix=FIX_SHAPE), torch.reshape)
register(Rule(shape_op(method("unflatten")), fix=fix_unflatten), "unflatten")
register(Rule(shape_op(torch.unflatten), fix=fix_unflatten), torch.unflatten)
for _fn in (torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.movedim,
            torch.swapaxes, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, torch.t):
    register(Rule(shape_op(_fn)), _fn)
for _name in ("flatten", "permute", "transpose", "squeeze", "unsqueeze", "movedim", "swapaxes", "t", "unbind"):
    register(Rule(shape_op(method(_name))), _name)
register(Rule(shape_op(torch.unbind)), torch.unbind)


def _module_shape_op(ctx, args, kwargs):
    return shape_op(ctx.module())(ctx, args, kwargs)


register(Rule(_module_shape_op), nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
def resize_unflatten(m, node, rw):
    new = rw.new_shape(node)
    start = m.dim % len(rw.old_shape(node.args[0]))
    m.unflattened_size = tuple(new[start:start + len(m.unflattened_size)])


register(Rule(_module_shape_op, resize=resize_unflatten), nn.Unflatten)
register(Rule(shape_op(torch.split), fix=fix_split), torch.split)
register(Rule(shape_op(torch.chunk), fix=fix_split), torch.chunk)
register(Rule(shape_op(torch.tensor_split), fix=fix_split), torch.tensor_split)
register(Rule(shape_op(method("split")), fix=fix_split), "split")
register(Rule(shape_op(method("chunk")), fix=fix_split), "chunk")
register(Rule(getitem_rule, fix=fix_getitem), operator.getitem)
register(Rule(cat_rule), torch.cat, torch.concat, torch.concatenate, torch.stack)


# ----------------------------------------------------------------------------- transformers
# --- transformers: attention, layer norm, contractions (matmul, einsum), Swin's wrapped helpers.
#
# Two facts these rules leave in ``node.meta`` for the verifier (fxprune/verify.py):
# ``node.meta["fxprune_approx"] = dim``: a LayerNorm normalises over channels along ``dim``;
#   removing channels changes the statistics, so its groups are *approximate* (the
#   masked reference renormalises over the kept channels there);
# ``node.meta["fxprune_contract"] = True``: the op sums over a channel dim (q @ k^T), so
#   the masked reference zeroes the removed positions of its inputs first.

def layer_norm_rule(ctx, args, kwargs):
    """LayerNorm over trailing dims that carry channels: pass them, approximately.

    The affine weight and bias follow the channels. The group is marked approximate: a
    pruned LayerNorm normalises over the kept channels only.
    """
    x = args[0]
    if ctx.node.op == "call_module":
        m, name = ctx.module(), ctx.node.target
        k = len(m.normalized_shape)
        weight = f"{name}.weight" if getattr(m, "weight", None) is not None else None
        bias = f"{name}.bias" if getattr(m, "bias", None) is not None else None
    else:
        k = len(arg(args, kwargs, 1, "normalized_shape"))
        w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
        if any(t is not None and getattr(t, "param", None) is None for t in (w, b)):
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes affine parameters computed at run time")
        weight, bias = (t.param if t is not None else None for t in (w, b))
    label, nd = x.label, len(x.shape)
    inside = [d for d in varying(label) if d >= nd - k]
    if not inside:
        return label
    if len(varying(label)) > 1:
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} normalises over channels spread over several dims")
        return None
    d = inside[0]
    ids = along(label, d, x.shape[d])
    for role, p in (("norm_weight", weight), ("norm_bias", bias)):
        if p is not None:
            ctx.member(p, d - (nd - k), ids, "producer", role)
    ctx.node.meta["fxprune_approx"] = d
    return label


def resize_layer_norm(m, node, rw):
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(rw.new_shape(node)[-k:])


def fix_layer_norm(node, rw):
    k = len(arg(node.args, node.kwargs, 1, "normalized_shape"))
    rw.set_arg(node, 1, "normalized_shape", list(rw.new_shape(node)[-k:]))


def _contract(ctx, operands, out_letters):
    """Shared by matmul and einsum: ``operands`` is a list of (T, letters), one letter per dim.

    A letter's channels must agree in every operand that has it (they are unified); a
    letter summed over (absent from the output) that carries channels makes the node a
    contraction over channels (exact under pruning when both sides drop the same ones).
    """
    ids_of: dict[str, list] = {}
    for t, letters in operands:
        if t.param is not None:
            return pin_all(ctx, [t for t, _ in operands], {}, f"{describe(ctx.node, ctx.gm)} multiplies by a parameter")
        vary = varying(t.label)
        if len(vary) > 1:
            return pin_all(ctx, [t for t, _ in operands], {},
                           f"{describe(ctx.node, ctx.gm)} sees channels spread over several dims")
        for d, letter in enumerate(letters):
            ids_of.setdefault(letter, []).append((along(t.label, d, t.shape[d]) if d in vary else None, t.shape[d]))
    result: dict[str, torch.Tensor] = {}
    for letter, found in ids_of.items():
        carried = [i for i, _ in found if i is not None]
        if not carried:
            continue
        ids = carried[0]
        for other in carried[1:]:
            ids = ctx.unify(ids, other, f"{describe(ctx.node, ctx.gm)} combines them with fixed channels")
        if any(i is None and size > 1 for i, size in found):
            ctx.pin(ids, f"{describe(ctx.node, ctx.gm)} combines them with an operand whose channels are fixed")
        result[letter] = ids
    summed = [letter for letter in result if letter not in out_letters]
    kept_out = [letter for letter in out_letters if letter in result]
    if summed:
        ctx.node.meta["fxprune_contract"] = True
    if len(kept_out) > 1:
        for letter in kept_out:
            ctx.pin(result[letter], f"{describe(ctx.node, ctx.gm)} puts channels on several output dims")
        return None
    ctx.cost(*[result[letter] for letter in summed + kept_out])
    if not kept_out:
        return None
    d = out_letters.index(kept_out[0])
    shape = [1] * len(out_letters)
    shape[d] = -1
    return result[kept_out[0]].view(shape)


def matmul_rule(ctx, args, kwargs):
    """``a @ b`` (matmul, bmm): contraction over a's last and b's second-to-last dim."""
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other", arg(args, kwargs, 1, "mat2"))
    if len(a.shape) < 2 or len(b.shape) < 2:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} on a vector is not supported")
    nd = len(ctx.out_shape)
    batch = "abcdefgh"[:nd - 2]
    la = batch[len(batch) - (len(a.shape) - 2):] + "ik"
    lb = batch[len(batch) - (len(b.shape) - 2):] + "kj"
    return _contract(ctx, [(a, la), (b, lb)], batch + "ij")


def einsum_rule(ctx, args, kwargs):
    equation = args[0].replace(" ", "")
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
    if "..." in equation or "->" not in equation:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: only explicit einsum equations are supported")
    ins, out = equation.split("->")
    ins = ins.split(",")
    if len(ins) != len(operands) or any(len(s) != len(t.shape) for s, t in zip(ins, operands)):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: equation does not fit its operands")
    return _contract(ctx, list(zip(operands, ins)), out)


def patch_merging_pad_rule(ctx, args, kwargs):
    """Swin's ``_patch_merging_pad``: pad H, W, then cat four strided views along channels (dim -1)."""
    x = args[0]
    label = x.label
    if label is None:
        return None
    nd = len(x.shape)
    if varying(label) != [nd - 1]:
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} mixes positions that carry channels")
        return None
    ids = along(label, nd - 1, x.shape[-1])
    return torch.cat([ids] * 4).view((1,) * (nd - 1) + (-1,))


register(Rule(layer_norm_rule, resize=resize_layer_norm, on_meta=same_shape), nn.LayerNorm)
register(Rule(layer_norm_rule, fix=fix_layer_norm), F.layer_norm)
register(Rule(matmul_rule), torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
register(Rule(einsum_rule), torch.einsum)
try:
    from torchvision.models.swin_transformer import _patch_merging_pad

    register(Rule(patch_merging_pad_rule), _patch_merging_pad)
except ImportError:  # an older torchvision
    pass


def _attention(ctx, x, heads, qkv_weight, qkv_bias, proj_weight, proj_bias):
    """Self-attention whose inner width must equal its input width (``nn.MultiheadAttention``,
    Swin's ``shifted_window_attention``): ``qkv = x @ W^T`` packs q, k, v, each split into
    ``heads`` heads of ``width // heads`` channels; ``proj`` maps back to the stream.

    Inner channel ``j`` of q, k and v is tied to stream channel ``j`` (the module forces
    equal widths), and channel ``j`` of every head is tied across heads, so each head keeps
    the same ``head_dim``. The q/k/v rows are recorded as consumer-kind members: the masked
    reference zeroes the removed ones, as the pruned model drops them from ``q @ k^T``.
    """
    nd = len(x.shape)
    if x.label is None:
        return None
    if varying(x.label) != [nd - 1]:
        return pin_all(ctx, [x], {}, f"{describe(ctx.node, ctx.gm)} sees channels off its feature dim")
    width = x.shape[-1]
    if width % heads:
        return pin_all(ctx, [x], {}, f"{describe(ctx.node, ctx.gm)}: width {width} is not a multiple of {heads} heads")
    ids = along(x.label, nd - 1, width)
    per_head = ids.view(heads, width // heads)
    ctx.unify(per_head[:1], per_head, f"{describe(ctx.node, ctx.gm)} keeps every head the same width")
    ids = ctx.roots(ids)
    ctx.member(qkv_weight, 1, ids, "consumer", "weight")
    ctx.member(qkv_weight, 0, torch.cat([ids] * 3), "consumer", "weight")
    if qkv_bias is not None:
        ctx.member(qkv_bias, 0, torch.cat([ids] * 3), "consumer", "bias")
    ctx.member(proj_weight, 1, ids, "consumer", "weight")
    ctx.member(proj_weight, 0, ids, "producer", "weight")
    if proj_bias is not None:
        ctx.member(proj_bias, 0, ids, "producer", "bias")
    # the qkv and output projections (8 * rows * width^2 FLOPs) scale with the kept width
    # squared; the rest (q @ k^T and attention @ v, per head) with the kept head_dim
    rows = math.prod(x.shape) // width
    total = ctx.node.meta.get("flops") or 0
    projections = min(1.0, 8 * rows * width * width / total) if total else 1.0
    ctx.cost(ids, ids, share=projections)
    if projections < 1.0:
        ctx.cost(ids, share=1.0 - projections)
    return ids.view((1,) * (nd - 1) + (width,))


def _fold_query_scale(weight: torch.Tensor, bias, old_head_dim: int, new_head_dim: int) -> None:
    """Attention scales q @ k^T by 1/sqrt(head_dim); after head_dim shrinks, scale the q rows
    by sqrt(new/old) so that the pruned model keeps the original scale exactly."""
    if old_head_dim == new_head_dim:
        return
    factor = (new_head_dim / old_head_dim) ** 0.5
    width = weight.shape[0] // 3
    with torch.no_grad():
        weight[:width] *= factor
        if bias is not None:
            bias[:width] *= factor


def mha_module(ctx, args, kwargs):
    """``nn.MultiheadAttention`` (self-attention, packed in-projection, batch first)."""
    m, name = ctx.module(), ctx.node.target
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not (q is k is v) or not m._qkv_same_embed_dim or not m.batch_first or m.bias_k is not None \
            or m.add_zero_attn or arg(args, kwargs, 4, "need_weights", True):
        pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: only batch-first self-attention "
                                   "with need_weights=False is pruned")
        return None
    bias = m.in_proj_bias is not None
    label = _attention(ctx, q, m.num_heads, f"{name}.in_proj_weight", f"{name}.in_proj_bias" if bias else None,
                       f"{name}.out_proj.weight", f"{name}.out_proj.bias" if m.out_proj.bias is not None else None)
    return (label, None)


def resize_mha(m, node, rw):
    width = m.in_proj_weight.shape[1]
    _fold_query_scale(m.in_proj_weight.data, None if m.in_proj_bias is None else m.in_proj_bias.data,
                      m.head_dim, width // m.num_heads)
    m.embed_dim = m.kdim = m.vdim = width
    m.head_dim = width // m.num_heads
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape


def swin_attention_rule(ctx, args, kwargs):
    """torchvision's ``shifted_window_attention`` (Swin v1 and v2), wrapped as one node."""
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads")
    x, qkv_w, proj_w, bias_table, _, heads = (arg(args, kwargs, i, n) for i, n in enumerate(names))
    qkv_b, proj_b = arg(args, kwargs, 9, "qkv_bias"), arg(args, kwargs, 10, "proj_bias")
    logit_scale = arg(args, kwargs, 11, "logit_scale")
    if any(t is not None and getattr(t, "param", None) is None for t in (qkv_w, proj_w, qkv_b, proj_b)):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes weights computed at run time")
    if logit_scale is not None and getattr(logit_scale, "label", None) is not None:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: logit scale carries channels")
    return _attention(ctx, x, heads, qkv_w.param, qkv_b.param if qkv_b is not None else None,
                      proj_w.param, proj_b.param if proj_b is not None else None)


def fix_swin_attention(node, rw):
    x = node.args[0]
    old, new = rw.old_shape(x)[-1], rw.new_shape(x)[-1]
    heads = arg(node.args, node.kwargs, 5, "num_heads")
    if old == new or arg(node.args, node.kwargs, 11, "logit_scale") is not None:
        return  # Swin v2's cosine attention has no 1/sqrt(head_dim)
    gm = node.graph.owning_module
    w, b = arg(node.args, node.kwargs, 1, "qkv_weight"), arg(node.args, node.kwargs, 9, "qkv_bias")
    weight = gm.get_parameter(w.target) if isinstance(w, fx.Node) else None
    bias = gm.get_parameter(b.target) if isinstance(b, fx.Node) else None
    if weight is not None:
        _fold_query_scale(weight.data, None if bias is None else bias.data, old // heads, new // heads)


register(Rule(mha_module, resize=resize_mha), nn.MultiheadAttention)
try:
    from torchvision.models.swin_transformer import shifted_window_attention

    register(Rule(swin_attention_rule, fix=fix_swin_attention), shifted_window_attention)
except ImportError:
    pass


def param_behind(ctx, node, t, vary):
    """The parameter that ``node`` broadcasts (``class_token.expand(n, -1, -1)``), when its
    entries line up with the channel dim ``vary`` of the value; else None."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("expand", "contiguous", "clone"):
        node = node.args[0]
    if len(vary) != 1 or not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        shape = ctx.gm.get_parameter(node.target).shape
    except AttributeError:
        return None
    (d,) = vary
    pd = d - (len(t.shape) - len(shape))
    return node.target if 0 <= pd < len(shape) and shape[pd] == t.shape[d] else None


def relative_position_bias_rule(ctx, args, kwargs):
    """Swin's ``_get_relative_position_bias``: one bias per attention head. Heads stay whole
    (the attention rules prune ``head_dim`` instead), so the table's head dim is kept."""
    return pin_all(ctx, args, kwargs, "the relative-position bias has one entry per attention head, and heads are "
                                      "kept whole (head_dim is pruned instead)")


try:
    from torchvision.models.swin_transformer import _get_relative_position_bias

    register(Rule(relative_position_bias_rule), _get_relative_position_bias)
except ImportError:
    pass
