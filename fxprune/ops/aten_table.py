"""The rule table of ``torch.export`` graphs: :data:`FX_RULES`' rows plus the ATen overloads
that export's default (training) IR keeps (``aten.conv2d.default``, ``aten.view.default``, ...).

An ATen row is one more spelling of an existing rule; where ATen's argument order differs
from ``torch.nn.functional``'s the rule says so (:func:`~.norm.aten_batch_norm`,
:func:`~.conv.aten_convolution`), and where a literal argument names channel counts the
row's ``fix`` recomputes it (``aten.view(x, [1, 768, 196])``, ``split_with_sizes``, slices).
An overload with no row pins the channels it touches, as in :data:`FX_RULES`.

A module type of a package the table does not import is spelled by its qualified name
(``"transformers.pytorch_utils.Conv1D"``): such a row only resizes the module of a pruned copy
(``output="module"``); export's graph has no ``call_module`` node for it to couple.

Example::

    >>> import torch
    >>> from fxprune.ops import ATEN_RULES
    >>> ATEN_RULES[torch.ops.aten.conv2d.default].couple.__name__
    'conv_function'
    >>> ATEN_RULES[torch.ops.aten.view.default].fix is not None, len(ATEN_RULES) > 300
    (True, True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import baddbmm_rule, einsum_rule, fix_sdpa, grouped_mm_rule, matmul_rule, sdpa_rule
from .conv import (addmm_function, aten_convolution, conv_call_spec, conv_function, conv_transpose_function,
                   conv_weight_rows, embedding_function, fix_groups, linear_function, linear_weight_rows,
                   resize_conv1d_hf)
from .elementwise import (constant_like, elementwise, extreme_fix, filled_like, first_input, fold, glu_rule,
                          grid_sample_rule, index_add_rule, max_min_rule, mean_fix, norm_over, normalize_over, pad,
                          reduce_over, spatial, unfold, variance_fix, variance_over, zero_joined_fix)
from .fx_table import FX_RULES
from .norm import (aten_batch_norm, fix_group_norm, fix_layer_norm, fix_rms_norm, group_norm_rule, layer_norm_rule,
                   per_sample, prelu_function, rms_norm_rule, weight_norm_rule)
from .recurrent import aten_recurrent
from .schema import Rule
from .shape import (aten_index_rule, cat_rule, expand_as_rule, fix_shape_args, fix_slice, fix_split_aten, fix_unflatten,
                    reshape_as_rule, reversed_dims, select_rule, shape_op, slice_rule)

ATEN_RULES = FX_RULES.extended("aten")
register = ATEN_RULES.register


def overloads(*names):
    """The ATen overloads ``"relu.default"``, ``"add.Tensor"``, ... that this torch has."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out


def with_inplace(*names):
    """Each ``"op.overload"`` and its in-place ``"op_.overload"``."""
    return overloads(*names, *(f"{n.split('.')[0]}_.{n.partition('.')[2] or 'default'}" for n in names))


register(Rule(elementwise), *with_inplace(
    # activations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "hardtanh", "softplus", "log_sigmoid", "threshold",
    # arithmetic
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar", "div.Tensor",
    "multiply.Tensor", "multiply.Scalar", "subtract.Tensor", "subtract.Scalar", "divide.Tensor", "divide.Scalar",
    "true_divide.Tensor", "true_divide.Scalar",
    "div.Scalar", "div.Tensor_mode", "rsub.Tensor", "rsub.Scalar", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "reciprocal", "erf", "sin", "cos", "square", "log1p", "expm1", "pow.Tensor_Scalar", "pow.Tensor_Tensor",
    "maximum", "minimum",
    "clamp", "clamp.Tensor", "clamp_min", "clamp_max", "where.self", "floor", "ceil", "round", "sign",
    "addcmul", "addcdiv", "lerp.Scalar", "lerp.Tensor",
    # dropout (eval mode: identity)
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    # copies, aliases, layout
    "clone", "contiguous", "detach", "alias", "lift_fresh_copy"))
register(Rule(first_input), *overloads("to.dtype", "to.dtype_layout", "to.device", "to.other", "type_as", "_to_copy"))
register(Rule(constant_like), *overloads("new_zeros", "new_ones", "new_full", "new_empty", "empty_like"))
register(Rule(filled_like), *overloads("zeros_like", "ones_like", "full_like"))
register(Rule(normalize_over(1)), *overloads("softmax.int", "log_softmax.int", "_softmax", "_log_softmax"))
register(Rule(aten_recurrent), *overloads("lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input"))

register(Rule(conv_function, fix=fix_groups(6), spec=conv_call_spec(3, 4, 5, 6), weight_rows=conv_weight_rows()),
         *overloads("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding"))
register(Rule(aten_convolution, fix=fix_groups(8), spec=conv_call_spec(3, 4, 5, 8, transposed=6),
              weight_rows=conv_weight_rows(transposed=6)),
         *overloads("convolution", "_convolution"))
register(Rule(conv_transpose_function), *overloads("conv_transpose1d", "conv_transpose2d.input",
                                                   "conv_transpose3d.input"))
register(Rule(linear_function, weight_rows=linear_weight_rows), *overloads("linear"))
register(Rule(addmm_function), *overloads("addmm"))
register(Rule(embedding_function), *overloads("embedding"))
register(Rule(aten_batch_norm), *overloads("batch_norm"))
register(Rule(per_sample(aten_batch_norm)), *overloads("instance_norm"))  # batch_norm's first five arguments
register(Rule(prelu_function), *overloads("prelu", "_prelu_kernel"))
register(Rule(group_norm_rule, fix=fix_group_norm), *overloads("group_norm"))  # F.group_norm's order
register(Rule(layer_norm_rule, fix=fix_layer_norm), *overloads("layer_norm"))  # F.layer_norm's order
register(Rule(rms_norm_rule, fix=fix_rms_norm), *overloads("rms_norm"))  # F.rms_norm's order

register(Rule(spatial), *overloads(
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_linear1d.vec", "upsample_bilinear2d.vec", "upsample_trilinear3d.vec", "upsample_bicubic2d.vec",
    "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d.vec", "_upsample_nearest_exact2d"))
register(Rule(unfold), *overloads("im2col"))
register(Rule(fold), *overloads("col2im"))
register(Rule(pad), *overloads("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
                               "replication_pad1d", "replication_pad2d"))
register(Rule(reduce_over(exact=True)), *overloads("sum.dim_IntList"))
register(Rule(reduce_over(exact=True), fix=mean_fix(torch.ops.aten.sum.dim_IntList, torch.ops.aten.div.Tensor)),
         *overloads("mean.dim"))
register(Rule(reduce_over(exact=True), fix=extreme_fix(torch.ops.aten.clamp_min.default, "clamp_min")),
         *overloads("amax"))
register(Rule(reduce_over(exact=True), fix=extreme_fix(torch.ops.aten.clamp_max.default, "clamp_max")),
         *overloads("amin"))
register(Rule(max_min_rule, fix=zero_joined_fix), *overloads("max.dim", "min.dim"))
register(Rule(variance_over, fix=variance_fix(False)), *overloads("var.correction", "var.dim"))
register(Rule(variance_over, fix=variance_fix(True)), *overloads("std.correction", "std.dim"))
register(Rule(norm_over(1, "ord")), *overloads("linalg_vector_norm"))
register(Rule(norm_over(1, "p")), *overloads("norm.ScalarOpt_dim"))

FIX_SHAPE = fix_shape_args()
register(Rule(shape_op(torch.reshape), fix=FIX_SHAPE), *overloads("view", "reshape", "_unsafe_view"))
register(Rule(shape_op(lambda t, size, **k: t.expand(size)), fix=FIX_SHAPE), *overloads("expand"))
register(Rule(shape_op(torch.unflatten), fix=fix_unflatten), *overloads("unflatten.int"))
for _name, _fn in (("permute", torch.permute), ("transpose.int", torch.transpose), ("flatten.using_ints", torch.flatten),
                   ("unsqueeze", torch.unsqueeze), ("squeeze", torch.squeeze), ("squeeze.dim", torch.squeeze),
                   ("squeeze.dims", torch.squeeze), ("movedim.int", torch.movedim), ("t", torch.t),
                   ("pixel_shuffle", F.pixel_shuffle), ("pixel_unshuffle", F.pixel_unshuffle),
                   ("channel_shuffle", torch.channel_shuffle), ("native_channel_shuffle", torch.channel_shuffle),
                   ("unbind.int", torch.unbind), ("roll", torch.roll),
                   ("repeat_interleave.self_int", torch.repeat_interleave), ("repeat", torch.Tensor.repeat),
                   ("tile", torch.tile)):
    register(Rule(shape_op(_fn)), *overloads(_name))
register(Rule(shape_op(reversed_dims)), *overloads("numpy_T"))  # x.T
register(Rule(reshape_as_rule), *overloads("reshape_as", "view_as"))
register(Rule(aten_index_rule), *overloads("index.Tensor"))
register(Rule(index_add_rule), *with_inplace("index_add"))
register(Rule(glu_rule), *overloads("glu"))
register(Rule(grid_sample_rule), *overloads("grid_sampler", "grid_sampler_2d", "grid_sampler_3d"))
register(Rule(weight_norm_rule), *overloads("_weight_norm"))
register(Rule(expand_as_rule), *overloads("expand_as"))
register(Rule(shape_op(torch.split), fix=fix_split_aten), *overloads("split_with_sizes", "split.Tensor"))
register(Rule(shape_op(torch.chunk), fix=fix_split_aten), *overloads("chunk"))
register(Rule(slice_rule, fix=fix_slice), *overloads("slice.Tensor"))
register(Rule(select_rule), *overloads("select.int"))
register(Rule(cat_rule), *overloads("cat", "concat", "concatenate", "stack"))

register(Rule(matmul_rule), *overloads("matmul", "bmm", "mm"))
register(Rule(baddbmm_rule), *overloads("baddbmm"))
register(Rule(einsum_rule), *overloads("einsum"))
register(Rule(grouped_mm_rule), *overloads("_grouped_mm"))
register(Rule(sdpa_rule, fix=fix_sdpa), *overloads("scaled_dot_product_attention"))

# module rows for output="module": resize what the module's own forward reads (a call_module node of one pins)
register(Rule(ATEN_RULES.default.couple, resize=resize_conv1d_hf), "transformers.pytorch_utils.Conv1D")
