"""Rules of normalisations and per-channel parameters: batch and instance norm (exact),
PReLU, GroupNorm (exact, by whole groups; one group as a LayerNorm), LayerNorm over channels
(approximate: see below), RMSNorm (exact), LocalResponseNorm (pins).

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..labels import along, varying
from .schema import T, arg, describe, pin_all


def _channel_norm(ctx, x, params):
    """Per-channel norms along dim 1 (BatchNorm, InstanceNorm): exact under pruning."""
    label = x.label
    vary = varying(label)
    if label is None:
        return None
    if 1 in vary:
        ids = along(label, 1, x.shape[1]) if len(vary) == 1 else None
        if ids is None:
            ctx.pin(label, f"{describe(ctx.node, ctx.gm)} sees channels spread over several dims")
            return None
        for role, name in params.items():
            if name is not None:
                ctx.member(name, 0, ids, "producer", role)
    return label


def _module_params(ctx, roles=(("norm_weight", "weight"), ("norm_bias", "bias"))) -> dict:
    """``{role: parameter name}`` of the norm module the node calls (None where it has no such tensor)."""
    m, name = ctx.module(), ctx.node.target
    return {role: f"{name}.{attr}" if getattr(m, attr, None) is not None else None for role, attr in roles}


def per_sample(couple):
    """An instance norm's ``couple``, from its batch norm twin's (the same arguments): its statistics are each
    sample's own, over its positions, so channels spread over those positions are pinned (a batch norm in eval
    mode reads running statistics, position by position)."""

    def instance_norm_rule(ctx, args, kwargs):
        x = args[0]
        if any(d != 1 for d in varying(x.label)):
            ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over positions that carry channels")
            return None
        return couple(ctx, args, kwargs)

    return instance_norm_rule


def norm_module(ctx, args, kwargs):
    params = _module_params(ctx, (("norm_weight", "weight"), ("norm_bias", "bias"),
                                  ("running_mean", "running_mean"), ("running_var", "running_var")))
    return _channel_norm(ctx, args[0], params)


def batch_norm_function(ctx, args, kwargs):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, ...)``."""
    return _batch_norm_call(ctx, args, kwargs, (("running_mean", 1), ("running_var", 2), ("norm_weight", 3),
                                                ("norm_bias", 4)))


def aten_batch_norm(ctx, args, kwargs):
    """``aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)``: ATen's order."""
    return _batch_norm_call(ctx, args, kwargs, (("norm_weight", 1), ("norm_bias", 2), ("running_mean", 3),
                                                ("running_var", 4)))


def _batch_norm_call(ctx, args, kwargs, slots):
    """A batch norm call on parameters; an affine weight or bias computed from parameters whose rows carry
    channels (NF-Nets' ``gain * scale`` of a standardised conv weight, :meth:`~fxprune.couple.analysis.
    Analysis.seed_rows`) is tied to the channels it scales."""
    x = args[0]
    params, computed = {}, []
    for role, i in slots:
        t = arg(args, kwargs, i, role.replace("norm_", ""))
        ids = along(t.label, 0, t.shape[0]) if isinstance(t, T) and t.label is not None and t.param is None \
            and role in ("norm_weight", "norm_bias") and varying(t.label) == [0] else None
        if ids is not None:
            computed.append(ids)
        elif t is not None and getattr(t, "param", None) is None:
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes statistics computed at run time")
        params[role] = t.param if t is not None else None
    label = _channel_norm(ctx, x, params)
    for ids in computed:
        channels = along(label, 1, x.shape[1]) if label is not None and varying(label) == [1] else None
        if channels is None:
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} scales channels by a computed tensor")
        shape = (1, -1) + (1,) * (label.dim() - 2)
        label = ctx.unify(channels.reshape(shape), ids.reshape(shape),
                          f"{describe(ctx.node, ctx.gm)} scales each channel by a computed tensor's row")
    return label


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


def prelu_function(ctx, args, kwargs):
    """``F.prelu(x, weight)`` (ATen ``prelu``, as ``torch.export`` spells ``nn.PReLU``): one slope per channel of
    dim 1, or one for all."""
    x, w = args[0], arg(args, kwargs, 1, "weight")
    if math.prod(w.shape) == 1:
        return x.label
    if w.param is None:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes slopes computed at run time")
    return _channel_norm(ctx, x, {"scale": w.param})


def resize_prelu(m, node, rw):
    m.num_parameters = m.weight.shape[0]


def local_response_norm_rule(ctx, args, kwargs):
    """LocalResponseNorm: each channel's output reads its neighbours' (pins)."""
    x = args[0]
    if 1 in varying(x.label):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over the channels (approximate; not pruned)")
        return None
    return x.label


def group_norm_rule(ctx, args, kwargs):
    """GroupNorm: statistics over each of ``G`` groups of ``C / G`` channels; pruned by whole groups (exact).

    A group that loses all of its channels leaves the other groups' statistics as they were, so the
    channels of each group are tied into one (as whole attention heads are) and the pruned norm is
    ``GroupNorm(G', C')`` with the same ``C / G`` per group (:func:`fix_group_norm`,
    :func:`resize_group_norm`). With ``G = C`` every channel prunes alone. With one group (timm's
    ``GroupNorm1``, a LayerNorm over channels and positions) the norm spans every channel: it is
    pruned as a LayerNorm is, approximately (the pruned norm's statistics are the kept channels').
    """
    x = args[0]
    if ctx.node.op == "call_module":
        groups, params = ctx.module().num_groups, _module_params(ctx)
    else:
        groups = arg(args, kwargs, 1, "num_groups")
        params = _param_args(ctx, args, kwargs, (("norm_weight", 2, "weight"), ("norm_bias", 3, "bias")))
        if params is None:
            return None
    vary = varying(x.label)
    if not vary:
        return x.label
    if vary != [1] or not isinstance(groups, int):
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} normalises over positions that carry channels")
        return None
    ids = along(x.label, 1, x.shape[1])
    if groups == 1:   # a LayerNorm over channels and positions: approximate, as a LayerNorm's groups
        ctx.node.meta["fxprune_approx"] = 1
    else:
        rows = ids.reshape(groups, -1)
        ctx.unify(rows[:, :1], rows, f"{describe(ctx.node, ctx.gm)} normalises groups of "
                                     f"{rows.shape[1]} channels: a group is pruned whole")
    for role, p in params.items():
        if p is not None:
            ctx.member(p, 0, ids, "producer", role)
    return x.label


def _groups_kept(rw, x, groups: int) -> int:
    """GroupNorm's kept group count: its kept channels over the (unchanged) channels per group; one
    group stays one."""
    return 1 if groups == 1 else rw.new_shape(x)[1] // (rw.old_shape(x)[1] // groups)


def fix_group_norm(node, rw):
    """``group_norm(x, num_groups, ...)`` (``F.group_norm``'s and ATen's order): the kept groups."""
    groups = arg(node.args, node.kwargs, 1, "num_groups")
    rw.set_arg(node, 1, "num_groups", _groups_kept(rw, node.args[0], groups))


def resize_group_norm(m, node, rw):
    m.num_groups = _groups_kept(rw, node.args[0], m.num_groups)
    m.num_channels = rw.new_shape(node)[1]


# ----------------------------------------------------------------------------- transformers
# --- transformers: attention, layer norm, contractions (matmul, einsum), Swin's wrapped helpers.
#
# Two facts these rules leave in ``node.meta`` for the verifier (:mod:`fxprune.verify.mask`):
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
        k, params = len(ctx.module().normalized_shape), _module_params(ctx)
    else:
        k = len(arg(args, kwargs, 1, "normalized_shape"))
        params = _param_args(ctx, args, kwargs, (("norm_weight", 2, "weight"), ("norm_bias", 3, "bias")))
        if params is None:
            return None
    label, d = _over_trailing(ctx, x, k, params)
    if d is not None:
        ctx.node.meta["fxprune_approx"] = d
    return label


def rms_norm_rule(ctx, args, kwargs):
    """RMSNorm over trailing dims that carry channels: exact under pruning.

    The masked original's mean square counts the removed channels as zeros, over all ``n``
    positions; the pruned norm's over the ``k`` kept ones. Since
    ``sum/n + eps = (k/n) (sum/k + eps n/k)``, the pruned norm with ``eps n/k`` and its weight
    times ``sqrt(n/k)`` (:func:`fix_rms_norm`, :func:`resize_rms_norm`) gives the masked
    original's outputs, so its groups are exact, unlike a LayerNorm's.
    """
    x = args[0]
    if ctx.node.op == "call_module":
        m, name = ctx.module(), ctx.node.target
        k = len(m.normalized_shape)
        params = {"norm_weight": f"{name}.weight" if m.weight is not None else None}
    else:
        k = len(arg(args, kwargs, 1, "normalized_shape"))
        params = _param_args(ctx, args, kwargs, (("norm_weight", 2, "weight"),))
        if params is None:
            return None
    label, d = _over_trailing(ctx, x, k, params)
    if d is not None:
        ctx.node.meta["fxprune_contract"] = True  # the reference zeroes the removed channels first
    return label


def _param_args(ctx, args, kwargs, slots):
    """``{role: parameter name}`` of a functional norm's affine arguments; None (all pinned)
    where one is computed at run time."""
    found = {role: arg(args, kwargs, i, name) for role, i, name in slots}
    if any(t is not None and getattr(t, "param", None) is None for t in found.values()):
        pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} takes affine parameters computed at run time")
        return None
    return {role: t.param if t is not None else None for role, t in found.items()}


def _over_trailing(ctx, x, k: int, params: dict):
    """A norm over the last ``k`` dims of ``x``: ``(label, d)``, ``d`` the dim inside them
    that carries channels (its parameters made members along it), or None where none does."""
    label, nd = x.label, len(x.shape)
    inside = [d for d in varying(label) if d >= nd - k]
    if not inside:
        return label, None
    if len(varying(label)) > 1:
        ctx.pin(label, f"{describe(ctx.node, ctx.gm)} normalises over channels spread over several dims")
        return None, None
    d = inside[0]
    ids = along(label, d, x.shape[d])
    for role, p in params.items():
        if p is not None:
            ctx.member(p, d - (nd - k), ids, "producer", role)
    return label, d


def resize_layer_norm(m, node, rw):
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(rw.new_shape(node)[-k:])


def fix_layer_norm(node, rw):
    k = len(arg(node.args, node.kwargs, 1, "normalized_shape"))
    rw.set_arg(node, 1, "normalized_shape", list(rw.new_shape(node)[-k:]))


def _eps(eps, x: fx.Node) -> float:
    """RMSNorm's ``eps``; None means the input dtype's machine epsilon, as torch reads it."""
    if eps is not None:
        return float(eps)
    meta = x.meta.get("val", x.meta.get("tensor_meta"))
    return torch.finfo(getattr(meta, "dtype", torch.float32)).eps


def fix_rms_norm(node, rw):
    """``rms_norm(x, shape, weight, eps)`` over ``n`` channels of which ``k`` are kept:
    the kept shape, ``eps n/k``, and the weight times ``sqrt(n/k)`` (a ``mul`` on the weight,
    which ONNX Runtime folds; without a weight, on the output: the node becomes that ``mul``)."""
    x = node.args[0]
    k = len(arg(node.args, node.kwargs, 1, "normalized_shape"))
    old, new = list(rw.old_shape(x)[-k:]), list(rw.new_shape(x)[-k:])
    if old == new:
        return
    ratio = math.prod(old) / math.prod(new)
    eps = _eps(arg(node.args, node.kwargs, 3, "eps"), x)
    rw.set_arg(node, 1, "normalized_shape", new)
    rw.set_arg(node, 3, "eps", eps * ratio)
    mul = torch.ops.aten.mul.Tensor if isinstance(node.target, torch._ops.OpOverload) else torch.mul
    weight = arg(node.args, node.kwargs, 2, "weight")
    with node.graph.inserting_before(node):
        if isinstance(weight, fx.Node):
            node.replace_input_with(weight, node.graph.call_function(mul, (weight, math.sqrt(ratio))))
            return
        inner = node.graph.call_function(node.target, node.args, node.kwargs)
    node.target, node.args, node.kwargs = mul, (inner, math.sqrt(ratio)), {}


def resize_rms_norm(m, node, rw):
    """``nn.RMSNorm``: the kept shape, ``eps n/k`` and the weight times ``sqrt(n/k)`` (see
    :func:`rms_norm_rule`); one without a weight gets one, ``sqrt(n/k)`` everywhere."""
    k = len(m.normalized_shape)
    new = tuple(rw.new_shape(node)[-k:])
    ratio = math.prod(m.normalized_shape) / math.prod(new)
    if ratio == 1:
        return
    dtype = m.weight.dtype if m.weight is not None else torch.get_default_dtype()
    m.eps = (m.eps if m.eps is not None else torch.finfo(dtype).eps) * ratio
    m.normalized_shape = new
    if m.weight is not None:
        m.weight.data.mul_(math.sqrt(ratio))  # the copy's own sliced tensor
    else:
        m.weight = torch.nn.Parameter(torch.full(new, math.sqrt(ratio)), requires_grad=False)


def weight_norm_rule(ctx, args, kwargs):
    """``torch._weight_norm(v, g, dim)``, the weight of ``nn.utils.parametrizations.weight_norm``: each slice
    along ``dim`` of ``v`` scaled by ``g`` over its norm. Along ``dim=0`` (the default: a conv's or linear's
    rows) the rows pass, ``v``'s and ``g``'s tied; another ``dim`` mixes the rows (pins)."""
    v, g = args[0], args[1]
    dim = arg(args, kwargs, 2, "dim", 0)
    labels = [t.label for t in (v, g) if isinstance(t, T) and t.label is not None]
    if not labels:
        return None
    if dim % len(v.shape) != 0 or any(varying(lab) not in ([0], []) for lab in labels):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} normalises a weight across its rows")
    rows = along(labels[0], 0, v.shape[0])
    for lab in labels[1:]:
        rows = ctx.unify(rows, along(lab, 0, v.shape[0]), f"{describe(ctx.node, ctx.gm)} scales each row by its gain")
    return rows.reshape((-1,) + (1,) * (len(v.shape) - 1))
