"""Shape and FLOPs formulas of modules on the ``meta`` device (a rule's ``on_meta``): what
shape propagation uses instead of running the module.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_flop_count


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """ATen's CPU kernel of ``scaled_dot_product_attention``, counted as ``flop_counter`` counts its CUDA kernels.
    Without it the CPU kernel counted nothing, while the same attention given ``scale=`` (as a pruned model's
    keeps its original scale) runs as two counted ``bmm``: a pruned BERT at ``flops=0.5`` read 0.52."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``grouped_mm(a [S, K], b [E, K, N], offs)``: each of the ``S`` rows times its group's ``K x N`` matrix
    (a mixture of experts' layer, the rows sorted by expert); other layouts count as their output times ``K``."""
    return 2 * math.prod(out_shape) * a_shape[-1]


# shape formulas of ATen ops ``flop_counter`` has none for, as ``FlopCounterMode(custom_mapping=...)`` takes them
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
                       torch.ops.aten._grouped_mm: _grouped_mm_flop}
# the same, for custom ops of packages fxprune does not import, by their qualified names
EXTRA_FLOP_FORMULAS_BY_NAME = {"transformers::grouped_mm_fallback": _grouped_mm_flop}


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one ATen call (``func`` an ``OpOverload``): ``flop_counter``'s formula, or one of
    :data:`EXTRA_FLOP_FORMULAS`; 0 for an op with neither."""
    packet = func._overloadpacket
    formula = flop_registry.get(packet)
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=out))
    extra = EXTRA_FLOP_FORMULAS.get(packet) or EXTRA_FLOP_FORMULAS_BY_NAME.get(func.name())
    if extra is None:
        return 0
    return int(extra(*tree_map(_shape_of, args), out_shape=tree_map(_shape_of, out), **kwargs))


def _shape_of(value):
    return value.shape if isinstance(value, torch.Tensor) else value


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
