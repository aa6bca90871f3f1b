"""Rules of transformer ops: contractions (matmul, einsum), multi-head attention
(``nn.MultiheadAttention``, torchvision Swin's wrapped attention), Swin's patch merging.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..labels import FIXED, along, grid_of, varying
from .elementwise import elementwise, first_input
from .schema import T, arg, describe, pin_all, tied


def _contract(ctx, operands, out_letters, sources=()):
    """Shared by matmul and einsum: ``operands`` is a list of (T, letters), one letter per dim;
    ``sources`` the graph nodes they are (where known).

    A letter's channels must agree in every operand that has it (they are unified); a
    letter summed over (absent from the output) that carries channels makes the node a
    contraction over channels (exact under pruning when both sides drop the same ones).
    An operand without channels summed against channels (a relative position table computed
    from parameters, ``q @ rel.T``) is read at the kept positions: ``sum_c q[c] r[c]`` over the kept
    ``c`` is what the masked original sums (``node.meta["fxprune_contract_gather"]``, see
    :func:`fxprune.rewrite.graph.gather_contracted`).
    """
    ids_of: dict[str, list] = {}
    if any(t.label is not None and len(varying(t.label)) > 1 for t, _ in operands):
        found = _contract_grids(ctx, operands, out_letters)
        if found is not False:
            return found
        operands = [(tied(ctx, t), letters) for t, letters in operands]
    if any(t.param is not None or t.transposed is not None for t, _ in operands):
        return _by_parameter(ctx, operands, out_letters)
    for t, letters in operands:
        vary = varying(t.label)
        if len(vary) > 1:
            return pin_all(ctx, [t for t, _ in operands], {},
                           f"{describe(ctx.node, ctx.gm)} sees channels spread over several dims")
    for n, (t, letters) in enumerate(operands):
        vary = varying(t.label)
        for d, letter in enumerate(letters):
            ids_of.setdefault(letter, []).append(
                (along(t.label, d, t.shape[d]) if d in vary else None, t.shape[d], n, d))
    result: dict[str, torch.Tensor] = {}
    for letter, found in ids_of.items():
        carried = [i for i, *_ in found if i is not None]
        if not carried:
            continue
        ids = carried[0]
        for other in carried[1:]:
            ids = ctx.unify(ids, other, f"{describe(ctx.node, ctx.gm)} combines them with fixed channels")
        fixed = [(n, d) for i, size, n, d in found if i is None and size > 1]
        if fixed and not _gathered_contraction(ctx, letter, out_letters, found, fixed, operands, sources):
            ctx.pin(ids, f"{describe(ctx.node, ctx.gm)} combines them with an operand whose channels are fixed")
        result[letter] = ids
    summed = [letter for letter in result if letter not in out_letters]
    kept_out = [letter for letter in out_letters if letter in result]
    if summed:
        ctx.node.meta["fxprune_contract"] = True
    if len(kept_out) > 1:
        # one output dim may carry channels: the dim with the most keeps them, the others' are pinned (a bias
        # per head added to scores that meet v's per-head dims: the heads stay, the dims prune); not a dim
        # that a softmax soon normalises over, which pins its channels anyway (XCiT's channel attention)
        softmaxed = _normalised_soon(ctx, out_letters)
        widest = max(kept_out, key=lambda letter: (letter != softmaxed, result[letter].numel(),
                                                   kept_out.index(letter)))
        for letter in kept_out:
            if letter != widest:
                ctx.pin(result[letter], f"{describe(ctx.node, ctx.gm)} puts channels on several output dims"
                        + (", and a softmax normalises over these" if letter == softmaxed else ""))
        kept_out = [widest]
    ctx.cost(*[result[letter] for letter in summed + kept_out])
    if not kept_out:
        return None
    d = out_letters.index(kept_out[0])
    shape = [1] * len(out_letters)
    shape[d] = -1
    return result[kept_out[0]].view(shape)


def _normalised_soon(ctx, out_letters: str) -> str | None:
    """The letter of the output dim that a softmax normalises over, where one follows the node through ops
    that keep its shape position by position (a temperature, a dropout): ``softmax(q @ k^T * t, -1)``."""
    node, shape = ctx.node, ctx.out_shape
    for _ in range(4):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        couple = ctx.rule_of(node).couple
        dim_of = getattr(couple, "dim_of", None)
        if dim_of is not None:
            dim = dim_of(node)
            return out_letters[dim % len(out_letters)] if isinstance(dim, int) else None
        if couple not in (elementwise, first_input) or ctx.shape_of(node) != shape:
            return None
    return None


def _gathered_contraction(ctx, letter, out_letters, found, fixed, operands, sources) -> bool:
    """Whether the operands without channels along summed ``letter`` can be read at the kept positions
    (:func:`_contract`): each is a graph value with ``letter`` on one dim, and one operand carries the
    channels there (the rewrite reads which are kept from its label)."""
    carriers = [(n, d) for i, _, n, d in found if i is not None]
    if letter in out_letters or len(carriers) != 1 or len(sources) != len(operands):
        return False
    n, d = carriers[0]
    if not isinstance(sources[n], fx.Node) or any(
            not isinstance(sources[m], fx.Node) or operands[m][1].count(letter) != 1 for m, _ in fixed):
        return False
    gathers = ctx.node.meta.setdefault("fxprune_contract_gather", [])
    gathers.extend((sources[m].name, e, sources[n].name, d) for m, e in fixed)
    return True


def _by_parameter(ctx, operands, out_letters):
    """``x @ W`` with ``W`` a 2-d parameter (SwiftFormer's ``query @ w_g``; Falcon's ``x @ weight.T``, its dims
    swapped) is a linear layer: ``W``'s summed
    letter reads ``x``'s channels there (its slices along that dim are consumers), its other letter makes
    new channels (producers), which the result carries. ``W`` may have more dims, each either in neither ``x``
    nor the result (a mixture of experts' ``[experts, in, out]`` under :func:`grouped_mm_rule`) or in both
    (Llama 4's ``x.view(experts, -1, d) @ W``): every expert then keeps the same channels. Any other use of a
    parameter pins."""
    params = [(t, letters) for t, letters in operands if t.param is not None or t.transposed is not None]
    others = [(t, letters) for t, letters in operands if t.param is None and t.transposed is None]
    reason = f"{describe(ctx.node, ctx.gm)} multiplies by a parameter"
    if len(params) != 1 or len(others) != 1:
        return pin_all(ctx, [t for t, _ in operands], {}, reason)
    (w, wl), (x, xl) = params[0], others[0]
    name, wshape = w.param or w.transposed, tuple(w.shape)
    if w.transposed is not None:   # weight.T: the value's last two dims are the parameter's, swapped
        wl, wshape = wl[:-2] + wl[-1] + wl[-2], wshape[:-2] + (wshape[-1], wshape[-2])
    summed = [c for c in wl if c in xl and c not in out_letters]
    made = [c for c in wl if c not in xl and c in out_letters]
    batched = [c for c in wl if (c in xl) == (c in out_letters) and c not in summed]
    vary = varying(x.label)
    if len(wl) != 2 + len(batched) or len(summed) != 1 or len(made) != 1 or any(xl[d] != summed[0] for d in vary):
        return pin_all(ctx, [t for t, _ in operands], {}, reason)
    ds, dm = wl.index(summed[0]), wl.index(made[0])
    ids = None
    if vary:
        ids = along(x.label, vary[0], x.shape[vary[0]])
        ctx.member(name, ds, ids, "consumer", "weight")
    fresh = ctx.fresh(wshape[dm])
    ctx.member(name, dm, fresh, "producer", "weight")
    ctx.cost(fresh, *([ids] if ids is not None else []))
    shape = [1] * len(out_letters)
    shape[out_letters.index(made[0])] = -1
    return fresh.view(shape)


def _contract_grids(ctx, operands, out_letters):
    """A contraction over attention heads whose channels sit on a grid (heads x dims per head, see
    :func:`fxprune.ops.shape.grid_label`): ``q @ k^T`` (both grids on the same letters, the dims
    summed: unified position by position, no channels out) or ``attention @ v`` (v's grid on letters
    of the output, the other operand without channels and without v's dims letter: v's grid out).
    False for any other contraction (the caller ties the grids).

    An operand whose channels lie along the grid's heads letter alone (scores plus a bias per head made by a
    layer: Swin V2's continuous position bias) keeps them: the heads stay while each prunes its own dims."""
    blocks = {letters[g[0]] for t, letters in operands if t.label is not None and t.param is None
              and len(set(letters)) == len(letters) for g in [grid_of(t.label)] if g is not None}
    if len(blocks) == 1:
        block = blocks.pop()
        for i, (t, letters) in enumerate(operands):
            vary = varying(t.label) if t.label is not None else []
            if vary and grid_of(t.label) is None and all(letters[d] == block for d in vary):
                ctx.pin(t.label, f"{describe(ctx.node, ctx.gm)} reads channels per head: the heads stay")
                operands = operands[:i] + [(T(None, t.shape), letters)] + operands[i + 1:]
    grids = []
    for t, letters in operands:
        if t.param is not None or len(set(letters)) != len(letters):
            return False
        if t.label is not None:
            grid = grid_of(t.label)
            if grid is None:
                return False
            grids.append(((letters[grid[0]], letters[grid[1]]), grid[2], letters))
    keys = {key for key, _, _ in grids}
    if len(keys) != 1:
        return False
    block, dim = keys.pop()
    if len(grids) == 2 and len(operands) == 2 and dim not in out_letters:  # q @ k^T
        ctx.unify(grids[0][1], grids[1][1], f"{describe(ctx.node, ctx.gm)} combines them with fixed channels")
        ctx.node.meta["fxprune_contract"] = True
        ctx.cost(grids[0][1])
        return None
    if len(grids) == 1 and block in out_letters and dim in out_letters and \
            all(dim not in letters for t, letters in operands if t.label is None):  # attention @ v
        if out_letters.index(block) > out_letters.index(dim):
            return False
        shape = [1] * len(out_letters)
        shape[out_letters.index(block)], shape[out_letters.index(dim)] = grids[0][1].shape
        out = grids[0][1].reshape(shape)
        ctx.cost(out)
        return out
    return False


GROUPED_MM_MULTIPLE = 8


def grouped_mm_rule(ctx, args, kwargs):
    """``grouped_mm(x [S, K], W [E, K, N], offs)``: the rows of ``x`` sorted by group, each times its group's
    ``W[e]`` (a mixture of experts' layer: ``torch._grouped_mm``, ``F.grouped_mm``, transformers' CPU
    fallback). Every expert is a linear layer over the same channels (:func:`_by_parameter`), so each keeps
    the same ones; any other layout pins."""
    x, w = arg(args, kwargs, 0, "input", arg(args, kwargs, 0, "mat_a")), arg(args, kwargs, 1, "weight",
                                                                            arg(args, kwargs, 1, "mat_b"))
    if len(x.shape) != 2 or len(w.shape) != 3 or len(ctx.out_shape) != 2:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} groups other than rows of a 2-d input")
    out = _contract(ctx, [(x, "sk"), (w, "ekn")], "sn", ctx.node.args[:2])
    for t in (x.label, out):   # its kernels need 16-byte aligned rows: 8 channels at 16 bits (4 at 32)
        if isinstance(t, torch.Tensor) and varying(t):
            ctx.count_multiple(along(t, 1, ctx.out_shape[1] if t is out else x.shape[1]), GROUPED_MM_MULTIPLE)
    return out


def matmul_rule(ctx, args, kwargs):
    """``a @ b`` (matmul, bmm): contraction over a's last and b's second-to-last dim."""
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other", arg(args, kwargs, 1, "mat2"))
    if len(a.shape) < 2 or len(b.shape) < 2:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} on a vector is not supported")
    nd = len(ctx.out_shape)
    batch = "abcdefgh"[:nd - 2]
    la = batch[len(batch) - (len(a.shape) - 2):] + "ik"
    lb = batch[len(batch) - (len(b.shape) - 2):] + "kj"
    return _contract(ctx, [(a, la), (b, lb)], batch + "ij", ctx.node.args[:2])


matmul_rule.takes_grids = True


def baddbmm_rule(ctx, args, kwargs):
    """``baddbmm(input, b1, b2)``, ``beta * input + alpha * (b1 @ b2)`` (Bloom's scores with ALiBi): the
    product's channels (:func:`matmul_rule`), then the sum's (:func:`~.elementwise.elementwise`)."""
    x, b1, b2 = args[0], arg(args, kwargs, 1, "batch1"), arg(args, kwargs, 2, "batch2")
    product = _contract(ctx, [(b1, "aik"), (b2, "akj")], "aij", ctx.node.args[1:3])
    return elementwise(ctx, (x, T(product, tuple(ctx.out_shape))), {})


baddbmm_rule.takes_grids = True


def _einsum_operands(args) -> list:
    """``einsum(equation, a, b)`` or ``einsum(equation, [a, b])``: the operands."""
    return list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])


def einsum_rule(ctx, args, kwargs):
    equation = args[0].replace(" ", "")
    operands = _einsum_operands(args)
    if "..." in equation or "->" not in equation:
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: only explicit einsum equations are supported")
    ins, out = equation.split("->")
    ins = ins.split(",")
    if len(ins) != len(operands) or any(len(s) != len(t.shape) for s, t in zip(ins, operands)):
        return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)}: equation does not fit its operands")
    return _contract(ctx, list(zip(operands, ins)), out, _einsum_operands(ctx.node.args))


einsum_rule.takes_grids = True


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


def _attention(ctx, x, heads, qkv_weight, qkv_bias, proj_weight, proj_bias):
    """Self-attention whose inner width must equal its input width (``nn.MultiheadAttention``,
    Swin's ``shifted_window_attention``): ``qkv = x @ W^T`` packs q, k, v, each split into
    ``heads`` heads of ``width // heads`` channels; ``proj`` maps back to the stream.

    Inner channel ``j`` of q, k and v is tied to stream channel ``j`` (the module forces
    equal widths), and the heads are balanced blocks (:meth:`~fxprune.couple.analysis.Context.balance`):
    every head keeps the same ``head_dim``, each at its own positions. The q/k/v rows are recorded as consumer-kind members: the masked
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
    if (ids < 0).any():
        return pin_all(ctx, [x], {}, f"{describe(ctx.node, ctx.gm)} mixes fixed and prunable features")
    ctx.balance(ids.view(heads, width // heads), whole=False)   # the module keeps its num_heads
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


def relative_position_bias_rule(ctx, args, kwargs):
    """Swin's ``_get_relative_position_bias``: one bias per attention head. Heads stay whole
    (the attention rules prune ``head_dim`` instead), so the table's head dim is kept."""
    return pin_all(ctx, args, kwargs, "the relative-position bias has one entry per attention head, and heads are "
                                      "kept whole (head_dim is pruned instead)")


def sdpa_rule(ctx, args, kwargs):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale)``:
    ``softmax(q @ k^T * scale) @ v`` over the last two dims, per head (the dims before).

    q's and k's channels are summed over (unified position by position: a contraction, see
    ``fxprune_contract``); v's pass to the output. Channels may sit on the last dim, or on a grid
    of heads x dims per head (:func:`fxprune.ops.shape.grid_label`): each head then keeps its own
    dims, q's and k's the same ones; or on the heads dim alone (whole heads, ``heads="whole"``): head
    ``h`` of q, k and v is then one channel. With fewer key/value heads than query heads
    (``enable_gqa``), key/value head ``g`` goes with query heads ``g * r ... g * r + r - 1``.
    The token dim must carry none.
    The default scale is ``1 / sqrt(q.shape[-1])``: :func:`fix_sdpa` keeps the original one.

    >>> import torch, torch.nn as nn, torch.nn.functional as F, fxprune
    >>> class Heads(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
    ...     def forward(self, x):
    ...         q, k, v = (p(x).view(1, 5, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
    ...         return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 5, 8))
    >>> fxprune.analyze(Heads(), (torch.randn(1, 5, 8),)).groups["q"].blocks.tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(args, kwargs, 3, "attn_mask")
    nd = len(q.shape)
    for t in (q, k, v):
        if t.param is not None or any(d == nd - 2 for d in varying(t.label)):
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} sees channels on its token dim")
    if getattr(mask, "label", None) is not None:
        # a bias per head (a relative position table made by a layer with one output per head): where q, k and
        # v prune dims within each head, the heads stay, so the bias keeps its channels and the rest goes on
        per_head_dims = all(t.label is None or nd - 1 in varying(t.label) for t in (q, k, v))
        if not per_head_dims or any(d >= nd - 2 for d in varying(mask.label)):
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} has a mask that carries channels")
        ctx.pin(mask.label, f"{describe(ctx.node, ctx.gm)} adds a bias per head: the heads stay")
    if q.label is None and k.label is None and v.label is None:
        return None
    fixed = torch.full((1,) * nd, FIXED, dtype=torch.long)
    ql, kl, vl = (fixed if t.label is None else t.label for t in (q, k, v))
    if nd >= 3 and k.shape[-3] != q.shape[-3]:  # grouped-query attention (enable_gqa): k/v head g serves
        rep = q.shape[-3] // k.shape[-3]        # query heads g * rep ... g * rep + rep - 1
        kl, vl = (lab.repeat_interleave(rep, dim=-3) if lab.shape[-3] > 1 else lab for lab in (kl, vl))
    reason = f"{describe(ctx.node, ctx.gm)} combines them with fixed channels"
    ctx.node.meta["fxprune_contract"] = True
    if any(t.label is not None and max(varying(t.label), default=nd) < nd - 2 for t in (q, k, v)):
        # whole heads: head h of q, k and v is one channel, on a dim before the tokens
        if any(nd - 1 in varying(t.label) for t in (q, k, v)):
            return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} mixes whole heads with per-head dims")
        heads = ctx.unify(ctx.unify(ql, kl, reason), vl, reason)
        ctx.cost(heads)
        return ctx.canonical(heads)
    qk = ctx.unify(ql, kl, reason)
    share = q.shape[-1] / (q.shape[-1] + v.shape[-1])
    ctx.cost(qk, share=share)
    ctx.cost(vl, share=1.0 - share)
    return None if v.label is None else ctx.canonical(vl)


sdpa_rule.takes_grids = True


def fix_sdpa(node, rw):
    """After q/k lose channels, keep the original ``1 / sqrt(head_dim)``: passed as ``scale`` to a 4-D
    attention; for other ranks (windowed attention's 5-D q), folded into q as ``q * sqrt(new / old)``,
    since ONNX's exporter takes ``scale`` only with 4-D inputs."""
    q = arg(node.args, node.kwargs, 0, "query")
    if arg(node.args, node.kwargs, 6, "scale") is not None or not isinstance(q, fx.Node):
        return
    old, new = rw.old_shape(q)[-1], rw.new_shape(q)[-1]
    if old == new:
        return
    if len(rw.old_shape(q)) == 4:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(old)}
        return
    with node.graph.inserting_before(node):
        scaled = node.graph.call_function(torch.mul, (q, math.sqrt(new / old)))
    node.replace_input_with(q, scaled)  # q feeds only this node's query: k and v are other nodes
