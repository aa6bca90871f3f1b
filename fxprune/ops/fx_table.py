"""The rule table of ``torch.fx.symbolic_trace`` graphs: every spelling of every op, one row each.

The rules themselves live beside their op family (:mod:`.elementwise`, :mod:`.conv`,
:mod:`.norm`, :mod:`.shape`, :mod:`.attention`); this file only says which spellings
(module types, functions, method names) each rule answers for. Adding an op is adding
a row here.

Example::

    >>> import torch
    >>> from fxprune.ops import FX_RULES
    >>> FX_RULES[torch.nn.Conv2d].couple.__name__, FX_RULES["view"].couple.__name__
    ('conv_module', 'shape_op_rule')
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .attention import (baddbmm_rule, einsum_rule, fix_sdpa, fix_swin_attention, grouped_mm_rule, matmul_rule,
                        mha_module, patch_merging_pad_rule, relative_position_bias_rule, resize_mha, sdpa_rule,
                        swin_attention_rule)
from .conv import (conv_call_spec, conv_function, conv_module, conv_module_spec, conv_weight_rows, embedding_function,
                   embedding_functional, embedding_module, fix_conv_function, linear_function, linear_module,
                   linear_weight_rows, resize_conv, resize_embedding, resize_linear)
from .elementwise import (elementwise, extreme_fix, filled_like, fold, glu_rule, grid_sample_rule, index_add_rule,
                          max_min_rule, mean_fix, norm_over, normalize_module, normalize_over, normalize_rule, pad,
                          reduce_over, spatial, unfold, variance_fix, variance_over, zero_joined_fix)
from .formulas import conv_on_meta, linear_on_meta, same_shape
from .norm import (batch_norm_function, fix_group_norm, fix_layer_norm, group_norm_rule, layer_norm_rule,
                   norm_module, local_response_norm_rule, resize_group_norm, weight_norm_rule, per_sample,
                   prelu_function, prelu_module, resize_layer_norm, resize_norm, resize_prelu, resize_rms_norm,
                   rms_norm_rule, fix_rms_norm)
from .recurrent import recurrent_module, resize_recurrent
from .schema import Rule, RuleTable
from .shape import (fix_getitem, fix_shape_args, fix_split, fix_unflatten, getitem_rule, method, module_shape_op,
                    reshape_as_rule, expand_as_rule, attribute_rule,
                    resize_unflatten, shape_op, cat_rule)

FX_RULES = RuleTable("fx")
register = FX_RULES.register

ELEMENTWISE = Rule(elementwise)
register(Rule(elementwise, on_meta=same_shape),
         nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
         nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
         nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
         nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, torchvision.ops.StochasticDepth)
register(ELEMENTWISE,
         # arithmetic
         operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.abs,
         operator.iadd, operator.isub, operator.imul, operator.itruediv,
         torch.add, torch.sub, torch.mul, torch.div, torch.multiply, torch.subtract, torch.divide, torch.true_divide,
         torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
         torch.rsqrt, torch.pow, torch.square, torch.reciprocal, torch.erf, torch.sin, torch.cos, torch.log1p,
         torch.expm1, torch.maximum,
         torch.minimum, torch.clamp, torch.where, torch.addcmul, torch.addcdiv, torch.lerp,
         "addcmul", "addcdiv", "lerp",
         "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "abs", "exp", "log", "sqrt",
         "rsqrt", "pow", "square", "reciprocal", "erf", "sin", "cos", "log1p", "expm1", "clamp", "clamp_", "clamp_min",
         "clamp_max",
         "clone", "detach", "to", "float",
         "half", "double", "type_as", "contiguous", "sigmoid", "sigmoid_", "tanh", "relu", "relu_",
         # activations and dropout, functional spellings (modules above)
         F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
         F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.logsigmoid,
         F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
         torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.nn.functional.threshold,
         torchvision.ops.stochastic_depth,
         # timm's fx-wrapped ``scores if mask is None else scores + mask`` (by name: timm is not imported)
         "timm.layers.attention.maybe_add_mask")

register(Rule(filled_like), torch.zeros_like, torch.ones_like, torch.full_like)
register(Rule(weight_norm_rule), torch._weight_norm)
register(Rule(normalize_over(1)), F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
         "softmax", "log_softmax")
register(Rule(normalize_module), nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
register(Rule(recurrent_module, resize=resize_recurrent), nn.LSTM, nn.GRU, nn.RNN)
register(Rule(conv_module, resize=resize_conv, on_meta=conv_on_meta, spec=conv_module_spec), nn.Conv1d, nn.Conv2d,
         nn.Conv3d)
register(Rule(conv_module, resize=resize_conv), nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
register(Rule(conv_function, fix=fix_conv_function, spec=conv_call_spec(3, 4, 5, 6), weight_rows=conv_weight_rows()),
         F.conv1d, F.conv2d, F.conv3d)
register(Rule(linear_module, resize=resize_linear, on_meta=linear_on_meta), nn.Linear)
register(Rule(linear_function, weight_rows=linear_weight_rows), F.linear)
register(Rule(embedding_module, resize=resize_embedding), nn.Embedding)
register(Rule(embedding_functional), F.embedding)
register(Rule(embedding_function), torch.embedding)   # aten.embedding's order: (weight, indices)
register(Rule(norm_module, resize=resize_norm, on_meta=same_shape),
         nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, torchvision.ops.FrozenBatchNorm2d)
register(Rule(per_sample(norm_module), resize=resize_norm, on_meta=same_shape),
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
register(Rule(batch_norm_function), F.batch_norm)
register(Rule(per_sample(batch_norm_function)), F.instance_norm)   # F.batch_norm's first five arguments
register(Rule(prelu_module, resize=resize_prelu, on_meta=same_shape), nn.PReLU)
register(Rule(prelu_function), F.prelu, torch.prelu)
register(Rule(group_norm_rule, resize=resize_group_norm, on_meta=same_shape), nn.GroupNorm)
register(Rule(group_norm_rule, fix=fix_group_norm), F.group_norm)
register(Rule(local_response_norm_rule, on_meta=same_shape), nn.LocalResponseNorm)
register(Rule(spatial),
         nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
         nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
         F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
         F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
         F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample)
register(Rule(unfold), F.unfold, nn.Unfold)
register(Rule(fold), F.fold, nn.Fold)
register(Rule(pad), F.pad, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
         nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
         nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
register(Rule(reduce_over(exact=True)), torch.sum, "sum")
register(Rule(reduce_over(exact=True), fix=mean_fix(torch.sum, torch.div)), torch.mean, "mean")
register(Rule(reduce_over(exact=True), fix=extreme_fix(torch.clamp_min, "clamp_min")), torch.amax, "amax")
register(Rule(reduce_over(exact=True), fix=extreme_fix(torch.clamp_max, "clamp_max")), torch.amin, "amin")
register(Rule(max_min_rule, fix=zero_joined_fix), torch.max, torch.min, "max", "min")
register(Rule(variance_over, fix=variance_fix(False)), torch.var, "var")
register(Rule(variance_over, fix=variance_fix(True)), torch.std, "std")
register(Rule(norm_over(1, "ord")), torch.linalg.vector_norm)
register(Rule(norm_over(1, "p")), torch.norm, "norm")
register(Rule(normalize_rule), F.normalize)

FIX_SHAPE = fix_shape_args()
for _name in ("view", "reshape", "expand"):
    register(Rule(shape_op(method(_name)), fix=FIX_SHAPE), _name)
register(Rule(shape_op(torch.reshape), fix=FIX_SHAPE), torch.reshape)
register(Rule(attribute_rule), getattr)   # x.T, x.mT
register(Rule(reshape_as_rule), "reshape_as", "view_as")
register(Rule(expand_as_rule), "expand_as")
register(Rule(shape_op(torch.roll)), torch.roll)
register(Rule(shape_op(method("roll"))), "roll")
# copies of positions (a channel repeated is tied to its copies; the pruned op repeats the kept ones)
register(Rule(shape_op(torch.repeat_interleave)), torch.repeat_interleave)
register(Rule(shape_op(method("repeat_interleave"))), "repeat_interleave")
register(Rule(shape_op(torch.tile)), torch.tile)
register(Rule(shape_op(method("repeat"))), "repeat")
register(Rule(shape_op(method("tile"))), "tile")
register(Rule(shape_op(method("unflatten")), fix=fix_unflatten), "unflatten")
register(Rule(shape_op(torch.unflatten), fix=fix_unflatten), torch.unflatten)
for _fn in (torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.movedim,
            torch.swapaxes, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, torch.t):
    register(Rule(shape_op(_fn)), _fn)
for _name in ("flatten", "permute", "transpose", "squeeze", "unsqueeze", "movedim", "swapaxes", "t", "unbind"):
    register(Rule(shape_op(method(_name))), _name)
register(Rule(shape_op(torch.unbind)), torch.unbind)

register(Rule(module_shape_op), nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
register(Rule(module_shape_op, resize=resize_unflatten), nn.Unflatten)
register(Rule(shape_op(torch.split), fix=fix_split), torch.split)
register(Rule(shape_op(torch.chunk), fix=fix_split), torch.chunk)
register(Rule(shape_op(torch.tensor_split), fix=fix_split), torch.tensor_split)
register(Rule(shape_op(method("split")), fix=fix_split), "split")
register(Rule(shape_op(method("chunk")), fix=fix_split), "chunk")
register(Rule(getitem_rule, fix=fix_getitem), operator.getitem)
register(Rule(index_add_rule), torch.index_add, "index_add", "index_add_")
register(Rule(glu_rule), nn.GLU, torch.nn.functional.glu)
register(Rule(grid_sample_rule), torch.nn.functional.grid_sample, torch.grid_sampler, torch.grid_sampler_2d,
         torch.grid_sampler_3d)
register(Rule(cat_rule), torch.cat, torch.concat, torch.concatenate, torch.stack)

register(Rule(layer_norm_rule, resize=resize_layer_norm, on_meta=same_shape), nn.LayerNorm)
register(Rule(layer_norm_rule, fix=fix_layer_norm), F.layer_norm)
register(Rule(rms_norm_rule, resize=resize_rms_norm, on_meta=same_shape), nn.RMSNorm)
register(Rule(rms_norm_rule, fix=fix_rms_norm), F.rms_norm)
register(Rule(matmul_rule), torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
register(Rule(baddbmm_rule), torch.baddbmm, "baddbmm")
register(Rule(sdpa_rule, fix=fix_sdpa), F.scaled_dot_product_attention)
register(Rule(einsum_rule), torch.einsum)
register(Rule(grouped_mm_rule), *[f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None))
                                   if f is not None], "transformers::grouped_mm_fallback")
try:
    from torchvision.models.swin_transformer import _patch_merging_pad

    register(Rule(patch_merging_pad_rule), _patch_merging_pad)
except ImportError:  # an older torchvision
    pass

register(Rule(mha_module, resize=resize_mha), nn.MultiheadAttention)
try:
    from torchvision.models.swin_transformer import shifted_window_attention

    register(Rule(swin_attention_rule, fix=fix_swin_attention), shifted_window_attention)
except ImportError:
    pass

try:
    from torchvision.models.swin_transformer import _get_relative_position_bias

    register(Rule(relative_position_bias_rule), _get_relative_position_bias)
except ImportError:
    pass
