"""Rules of the ops that move channel positions: view/reshape/flatten/permute/shuffles, indexing,
split/chunk and concatenation, with the fixes of their literal sizes at rewrite time.

Part of the fx rule table (:mod:`fxprune.ops.fx_table`).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from torch.fx.node import map_aggregate

from ..labels import FIXED, along, expand_to, grid_of, varying
from .schema import T, arg, describe, one_axis, pin_all, tied


def shape_op(fn):
    """Ops that only move positions: apply the same op to the label."""

    def shape_op_rule(ctx, args, kwargs):
        x = args[0]
        if x.label is None:
            if getattr(x, "param", None) is not None and len(x.shape) >= 2 and _swaps_last_dims(fn, x, args, kwargs):
                ctx.transposed_param(x.param)   # weight.T, or experts' weights [E, out, in].transpose(-2, -1)
            return None
        if _empty(ctx):
            return _empty_label(ctx, x)
        rest = [a.label if hasattr(a, "label") else a for a in args[1:]]
        if len(varying(x.label)) > 1:  # a grid: moved whole, or merged blocks first; else tied here
            out = fn(expand_to(x.label, x.shape), *rest, **kwargs)
            moved = None if isinstance(out, (tuple, list)) else _grid_moved(ctx, x, out)  # split pieces: tied
            if moved is not None:
                return moved
            x = tied(ctx, x)
        full = expand_to(x.label, x.shape)
        out = fn(full, *rest, **kwargs)
        if isinstance(out, (tuple, list)):
            return tuple(one_axis(ctx, o) for o in out)
        if len(varying(ctx.canonical(out))) > 1 or (out.shape == full.shape and not torch.equal(out, full)):
            positions = torch.arange(full.numel()).view(full.shape)
            found = permutation(ctx, x, fn(positions, *rest, **kwargs))
            if found is not False:
                return found
            grid = grid_label(ctx, x, out)
            if grid is not None:
                return grid
        return one_axis(ctx, out)

    shape_op_rule.takes_grids = True
    return shape_op_rule


def _swaps_last_dims(fn, x, args, kwargs) -> bool:
    """Whether shape op ``fn`` swaps the last two dims of parameter ``x`` and moves nothing else: tried on a
    small stand-in of its shape (a parameter of experts can hold billions of positions), so an op whose
    arguments name ``x``'s sizes (a view) is not taken for one."""
    small = tuple(min(int(d), 5) for d in x.shape)
    positions = torch.arange(math.prod(small)).view(small)
    try:
        out = fn(positions, *args[1:], **kwargs)
    except Exception:  # sizes of the real parameter
        return False
    swapped = positions.transpose(-2, -1)
    return isinstance(out, torch.Tensor) and out.shape == swapped.shape and torch.equal(out, swapped)


def reversed_dims(t, *_):
    """``t.T`` (``numpy_T``): every dim reversed."""
    return t.permute(*reversed(range(t.dim())))


def attribute_rule(ctx, args, kwargs):
    """``getattr(x, name)`` as ``symbolic_trace`` records a tensor attribute: ``x.T`` and ``x.mT`` move
    positions as their permutes do; any other attribute pins."""
    name = args[1]
    if name == "T":
        return shape_op(reversed_dims)(ctx, args[:1], {})
    if name == "mT":
        return shape_op(lambda t, *_: t.transpose(-2, -1))(ctx, args[:1], {})
    return pin_all(ctx, args, kwargs, f"{describe(ctx.node, ctx.gm)} reads the attribute '{name}'")


def reshape_as_rule(ctx, args, kwargs):
    """``x.reshape_as(other)``, ``x.view_as(other)``: a reshape to ``other``'s shape (LeViT's
    ``bn(x.flatten(0, 1)).reshape_as(x)``).
    The pruned model reads that shape from the pruned ``other``, so the result's channels are tied to
    ``other``'s, position by position."""
    other = args[1]
    shape = tuple(other.shape)
    out = shape_op(lambda t, *_: t.reshape(shape))(ctx, args[:1], {})
    reason = f"{describe(ctx.node, ctx.gm)} takes its shape from a tensor whose channels differ"
    if out is None or other.label is None:
        ctx.pin(out if out is not None else other.label, reason)
        return None
    return ctx.canonical(ctx.unify(out, other.label, reason))


def expand_as_rule(ctx, args, kwargs):
    """``x.expand_as(other)`` (``torch.export``'s spelling of ``F.normalize``'s division): ``x`` broadcast
    to ``other``'s shape, which the pruned model reads from the pruned ``other``. Along the dims where ``x``
    is not broadcast the two carry the same channels; along those where it is, the result has ``other``'s
    (its values are constant there, so it is pruned as ``other`` is).
    """
    x, other = args[0], args[1]
    if other.label is None:   # other keeps its shape: so must x
        if varying(x.label):
            ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} takes its shape from a tensor whose channels are fixed")
            return None
        return x.label
    pad = len(other.shape) - len(x.shape)
    ones = {d for d in range(len(other.shape)) if d < pad or x.shape[d - pad] == 1}
    vary, mine = set(varying(other.label)), {d + pad for d in varying(x.label)}
    reason = f"{describe(ctx.node, ctx.gm)} takes its shape from a tensor whose channels differ"
    if vary <= ones and not mine:   # x's values are constant along other's channels
        return other.label
    if vary & ones:
        ctx.pin(other.label, f"{describe(ctx.node, ctx.gm)} broadcasts over some of the dims that carry channels")
        ctx.pin(x.label, reason)
        return None
    own = torch.full((1,) * len(other.shape), FIXED, dtype=torch.long) if x.label is None else \
        x.label.reshape((1,) * pad + tuple(x.label.shape))
    return ctx.canonical(ctx.unify(own, other.label, reason))


def _empty(ctx) -> bool:
    shape = ctx.out_shape
    return isinstance(shape, tuple) and 0 in shape


def _empty_label(ctx, x):
    """The label of an empty result (Phi-3's ``q[..., rotary_dim:]`` at full rotary width): ``x``'s label
    where it fits the result's shape (materialising it would lose every id), else None."""
    lab, shape = ctx.canonical(x.label), ctx.out_shape
    if lab is not None and lab.dim() == len(shape) and all(lab.shape[d] in (1, shape[d]) for d in range(lab.dim())):
        return one_axis(ctx, lab)
    return None


def grid_label(ctx, x, out):
    """A reshape that splits ``x``'s one channel dim into blocks and positions, blocks first
    (``view(b, n, heads, head_dim)``, or a packed ``reshape(b, n, 3, heads, head_dim)``): the blocks are
    attention heads (:meth:`~fxprune.couple.analysis.Context.heads`). By default the label of ``out`` is kept
    as a *grid*, varying along both dims, and the heads keep equal counts at free positions (each head its
    own dims); with whole heads it varies along the heads dim alone. Any other spread of channels, or a
    split the analysis does not take: None (the caller ties it).

    >>> import torch
    >>> from fxprune.ops.schema import T
    >>> class Ctx:  # what the rule asks of the analysis, for this example
    ...     canonical = staticmethod(lambda lab: lab)
    ...     def heads(self, blocks):  # by default: a balance of each head's dims; True: taken
    ...         print("heads", blocks.tolist())
    ...         return True
    >>> x = T(torch.arange(6).view(1, 6), (2, 6))
    >>> grid_label(Ctx(), x, torch.arange(6).view(1, 2, 3)).shape
    heads [[0, 1, 2], [3, 4, 5]]
    torch.Size([1, 2, 3])
    """
    src, lab = ctx.canonical(x.label), ctx.canonical(out)
    dims, vary = varying(lab), varying(src)
    if lab is None or len(dims) < 2 or x.param is not None or len(vary) != 1:
        return None
    grid = lab[tuple(slice(None) if d in dims else 0 for d in range(lab.dim()))]  # [blocks..., positions]
    ids = along(src, vary[0], x.shape[vary[0]])
    if bool((grid < 0).any()) or torch.unique(grid).numel() != grid.numel() or ids.numel() != grid.numel() or \
            not torch.equal(ids.view(grid.shape), grid):
        return None
    if not ctx.heads(grid):
        return None
    return ctx.canonical(lab)


def _grid_moved(ctx, x, out):
    """``out``'s label where a shape op keeps ``x``'s grid intact (its dims moved, blocks still before
    positions) or merges it back into one channel dim blocks first; else None."""
    grid, lab = grid_of(ctx.canonical(x.label)), ctx.canonical(out)
    if grid is None or lab is None:
        return None
    moved = grid_of(lab)
    if moved is not None:
        return lab if torch.equal(moved[2], grid[2]) else None
    vary = varying(lab)
    if len(vary) == 1 and torch.equal(along(lab, vary[0], lab.shape[vary[0]]), grid[2].flatten()):
        return lab
    return None


_CHAIN_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "swapaxes",
                  "movedim"}
_CHAIN_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.movedim, torch.swapaxes,
                    torch.unflatten, torch.channel_shuffle}
_CHAIN_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.ChannelShuffle)


def permutation(ctx, x, positions):
    """A channel shuffle: the shape ops from ``ctx.node`` on (through single users) that permute the
    channel dim of ``x`` and nothing else, e.g. ``view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)``.

    ``positions`` is ``ctx.node`` applied to ``arange(numel).view(x.shape)``. Where the chain ends on
    ``x``'s shape with its entries moved along the channel dim only, the last node's label is the
    permuted input label (no channels tied: any kept set works), and the rewrite replaces it with an
    ``index_select`` of the kept channels in the shuffled order (``node.meta["fxprune_perm"]``); the
    ops before it carry no label and drop out. Returns the label of ``ctx.node`` (None inside a chain),
    or False where there is no such chain.
    """
    vary = varying(x.label)
    if len(vary) != 1 or x.param is not None or not ctx.node.args or not isinstance(ctx.node.args[0], fx.Node):
        return False
    d, shape = vary[0], tuple(x.shape)
    chain = [ctx.node]
    while tuple(positions.shape) != shape and len(chain) < 8:
        users = list(chain[-1].users)
        if len(users) != 1 or not _chain_op(ctx, users[0]):
            return False
        nxt = users[0]
        stop = []

        def value(a):
            if a is chain[-1]:
                return positions
            if isinstance(a, fx.Node):
                v = ctx.known(a)
                if v is None or hasattr(v, "label") or not isinstance(v, (int, float, tuple, list, torch.Size)):
                    stop.append(a)
                return v
            return a

        args, kwargs = map_aggregate(nxt.args, value), map_aggregate(nxt.kwargs, value)
        if stop:
            return False
        try:
            if nxt.op == "call_method":
                positions = getattr(args[0], nxt.target)(*args[1:], **kwargs)
            elif nxt.op == "call_function":
                positions = nxt.target(*args, **kwargs)
            else:
                positions = ctx.gm.get_submodule(nxt.target)(*args, **kwargs)
        except Exception:
            return False
        chain.append(nxt)
    if tuple(positions.shape) != shape:
        return False
    full = torch.arange(positions.numel()).view(shape)
    stride = int(full.stride(d))
    perm = positions[tuple(slice(None) if i == d else 0 for i in range(len(shape)))] // stride % shape[d]
    if not torch.equal(torch.sort(perm).values, torch.arange(shape[d])) or \
            not torch.equal(positions, full.index_select(d, perm)) or torch.equal(perm, torch.arange(shape[d])):
        return False
    ids = along(x.label, d, shape[d])[perm]
    label = ids.view([-1 if i == d else 1 for i in range(len(shape))])
    last = chain[-1]
    last.meta["fxprune_perm"] = (d, perm, len(chain) - 1)
    for n in chain[:-1]:
        n.meta["fxprune_perm_inner"] = True
    if last is ctx.node:
        return label
    ctx.later_label(last, label)
    return None


def _chain_op(ctx, node) -> bool:
    if node.op == "call_method":
        return node.target in _CHAIN_METHODS
    if node.op == "call_function":
        return node.target in _CHAIN_FUNCTIONS
    if node.op == "call_module":
        return isinstance(ctx.gm.get_submodule(node.target), _CHAIN_MODULES)
    return False



def method(name):
    return lambda t, *a, **k: getattr(t, name)(*a, **k)


def fix_shape_args(first: int = 1):
    """view/reshape/expand: literal sizes of dims that carry channels follow the pruning."""

    def fix(node, rw):
        sizes = list(node.args[first:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
        kind = list if packed and isinstance(sizes[0], list) else tuple  # as written: an unchanged literal stays equal
        if packed:
            sizes = list(sizes[0])
        new = rw.new_shape(node)
        for d in rw.varying_dims(node):
            if d < len(sizes) and not (isinstance(sizes[d], int) and sizes[d] == -1):
                sizes[d] = new[d]
        node.args = tuple(node.args[:first]) + ((kind(sizes),) if packed else tuple(sizes))
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

    if not isinstance(x, T):  # a tuple from a multi-output node
        item = x[index]
        return item.label if isinstance(item, T) else None
    if x.label is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    vary = varying(x.label)
    for d, item in _index_dims(index, len(x.shape)):
        if d in vary and not isinstance(item, slice):
            ctx.pin(x.label, f"indexing at '{ctx.node.name}' picks single channels")
            return None
        if d in vary and item.step not in (None, 1) and not _strided(ctx, x, d, item.step):
            return None
    if any(not isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in index):
        return _gathered_positions(ctx, x, index)
    if _empty(ctx):
        return _empty_label(ctx, x)
    return one_axis(ctx, expand_to(x.label, x.shape)[index])


def _strided(ctx, x, dim: int, step: int) -> bool:
    """``x[..., a:b:step]`` along a dim that carries channels (GPT-J's and EVA's interleaved rotary
    ``x[..., ::2]``, ``x[..., 1::2]``): each block of ``step`` consecutive positions from 0 becomes one
    channel (tied), so a kept block keeps every one of its positions and the pruned value sliced with the
    same step reads exactly the kept ones (:func:`kept_slice`). A dim that is not whole blocks pins."""
    size = x.shape[dim]
    if size % step:
        ctx.pin(x.label, f"slicing at '{ctx.node.name}' picks every {step}th of {size} channels")
        return False
    blocks = expand_to(x.label, x.shape).unflatten(dim, (size // step, step))
    for j in range(1, step):
        ctx.unify(blocks.select(dim + 1, 0), blocks.select(dim + 1, j),
                  f"slicing at '{ctx.node.name}' takes every {step}th channel")
    return True


def kept_slice(kept: torch.Tensor, start, stop, step) -> slice:
    """The slice of a pruned dim (``kept``: its original positions' bool mask) that reads what
    ``slice(start, stop, step)`` read of the original at kept positions; with ``step > 1`` blocks of
    ``step`` positions are kept or removed whole (:func:`_strided`)."""
    size = kept.numel()
    start, stop, step = slice(start, stop, step).indices(size)
    read = int(kept[start:max(stop, start):step].sum())
    if step == 1:
        first = int(kept[:start].sum())
        return slice(first, first + read, None)
    first = step * int(kept.view(-1, step)[:start // step, 0].sum()) + start % step
    return slice(first, first + step * (read - 1) + 1 if read else first, step)


def _gathered_positions(ctx, x, index):
    """Advanced indexing by one tensor along a dim without channels (a relative position table read at an
    index of positions, ``table[index.view(-1)]``): every position of that dim has the same channels, so the
    result's label is the input's read at position 0 there (the rewrite leaves the index as it is)."""
    tensors = [i for i in index if isinstance(i, T)]
    others = [i for i in index if not isinstance(i, (T, slice, int, type(None), type(Ellipsis)))]
    vary = varying(x.label)
    dims = [d for d, item in _index_dims(index, len(x.shape)) if isinstance(item, T)]
    if len(tensors) != 1 or others or tensors[0].label is not None or dims[0] in vary:
        ctx.pin(x.label, f"advanced indexing at '{ctx.node.name}'")
        return None
    zeros = torch.zeros(tensors[0].shape, dtype=torch.long)
    label = expand_to(x.label, x.shape)[tuple(zeros if isinstance(i, T) else i for i in index)]
    if tuple(label.shape) != tuple(ctx.out_shape):   # a boolean mask, or an index the label cannot follow
        ctx.pin(x.label, f"advanced indexing at '{ctx.node.name}'")
        return None
    return one_axis(ctx, label)


def aten_index_rule(ctx, args, kwargs):
    """ATen's ``index.Tensor(x, indices)`` (``x[..., idx]`` exported): one index tensor along a dim without
    channels passes them (:func:`_gathered_positions`); other indexing pins."""
    x, indices = args[0], list(args[1])
    if not isinstance(x, T) or x.label is None:
        return None
    return _gathered_positions(ctx, x, tuple(slice(None) if i is None else i for i in indices))


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
            items[pos] = kept_slice(rw.kept_along(src, d), item.start, item.stop, item.step)
    node.args = (src, tuple(items) if packed else items[0])


STACKS = (torch.stack, torch.ops.aten.stack.default)  # the spellings of stack (cat_rule serves both)


def cat_rule(ctx, args, kwargs):
    """cat/stack: along the channel dim, offsets are tracked; along another dim, channels coincide."""

    xs = list(arg(args, kwargs, 0, "tensors"))
    sources = list(arg(ctx.node.args, ctx.node.kwargs, 0, "tensors"))
    nd = len(ctx.out_shape)
    dim = arg(args, kwargs, 1, "dim", 0) % nd
    if nd > 1:  # torch.cat skips a 1-d empty piece (torch.tensor([]): XLM's empty cache) whatever the others' dims
        kept = [i for i, t in enumerate(xs) if tuple(t.shape) != (0,)]
        xs, sources = [xs[i] for i in kept], [sources[i] for i in kept]
    if ctx.node.target in STACKS:
        xs = [T(None if t.label is None else t.label.unsqueeze(dim), t.shape[:dim] + (1,) + t.shape[dim:], t.param)
              for t in xs]
    labels = [None if t.param is not None else t.label for t in xs]
    vary = {d for lab in labels for d in varying(lab)}
    if vary <= {dim}:  # DenseNet, Inception, chunk -> cat: offsets
        parts = [along(lab, dim, t.shape[dim]) for t, lab in zip(xs, labels)]
        return torch.cat(parts).view([1] * dim + [-1] + [1] * (nd - dim - 1))
    if dim not in vary:  # e.g. a class token joined along the token dim: channels coincide
        result, joined = None, []
        for t, lab, src in zip(xs, labels, sources):
            if t.shape[dim] == 0:  # an empty piece (Phi-3's rotary pass-through at full rotary width)
                continue
            if lab is None:
                param = param_behind(ctx, src, t, vary)
                if param is not None:  # a learned token: its entries follow the channels
                    joined.append((param, t))
                    continue
                lab = torch.full([t.shape[d] if d in vary else 1 for d in range(nd)], FIXED, dtype=torch.long)
            result = lab if result is None else ctx.unify(result, lab, f"'{ctx.node.name}' joins them with fixed channels")
        for param, t in joined:
            broadcast_member(ctx, param, result, vary, t.shape, nd)
        return result.narrow(dim, 0, 1)
    return pin_all(ctx, args, kwargs, f"'{ctx.node.name}' concatenates channels along two dims at once")


def fix_split(node, rw):
    """split/chunk: piece sizes follow the pruning; chunk becomes split with explicit sizes."""
    dim = arg(node.args, node.kwargs, 2, "dim", 0)
    x = node.args[0]
    dim = dim % len(rw.old_shape(x))
    if dim not in rw.varying_dims(x):
        return
    if _still_chunks(node, rw, dim):
        return
    sizes = [s[dim] for s in rw.new_shape(node)]
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, sizes, dim)
    node.kwargs = {}


def fix_split_aten(node, rw):
    """ATen's split_with_sizes/split.Tensor/chunk (dim at 2): piece sizes follow the pruning, as
    ``aten.split_with_sizes`` with explicit sizes."""
    dim = arg(node.args, node.kwargs, 2, "dim", 0)
    x = node.args[0]
    dim = dim % len(rw.old_shape(x))
    if dim not in rw.varying_dims(x):
        return
    if _still_chunks(node, rw, dim):
        return
    sizes = [s[dim] for s in rw.new_shape(node)]
    node.target = torch.ops.aten.split_with_sizes.default
    node.args = (x, sizes, dim)
    node.kwargs = {}


def _still_chunks(node, rw, dim: int) -> bool:
    """Whether ``node`` is a ``chunk(n)`` whose pieces carry the same channels position by position (a gated
    MLP's ``gate, up = x.chunk(2, -1)``, the halves tied by ``act(gate) * up``): under any plan they keep equal
    counts, so the same call splits the pruned tensor right; the node is left as it is (and a module copy,
    running that code, prunes those channels too)."""
    chunk = node.target in (torch.chunk, "chunk") or node.target is getattr(torch.ops.aten.chunk, "default", None)
    labels, shapes = node.meta.get("fxprune"), rw.old_shape(node)
    if not chunk or not isinstance(labels, (tuple, list)) or len(labels) != len(shapes) or \
            arg(node.args, node.kwargs, 1, "chunks", None) != len(shapes) or len({s[dim] for s in shapes}) != 1 or \
            not all(isinstance(label, torch.Tensor) for label in labels):
        return False
    pieces = [along(label, dim, shape[dim]) for label, shape in zip(labels, shapes)]
    return all(torch.equal(pieces[0], p) for p in pieces[1:])


def slice_rule(ctx, args, kwargs):
    """``aten.slice.Tensor(x, dim, start, end, step)``, which ``x[:, a:b]`` becomes in ATen graphs."""
    x = args[0]
    if x.label is None:
        return None
    dim = arg(args, kwargs, 1, "dim", 0) % len(x.shape)
    step = arg(args, kwargs, 4, "step", 1)
    if dim in varying(x.label) and step != 1 and not _strided(ctx, x, dim, step):
        return None
    if _empty(ctx):
        return _empty_label(ctx, x)
    full = expand_to(x.label, x.shape)
    return one_axis(ctx, full[(slice(None),) * dim + (slice(arg(args, kwargs, 2, "start"), arg(args, kwargs, 3, "end"),
                                                             step),)])


def fix_slice(node, rw):
    """A slice along a dim that carries channels: its bounds count the kept positions only."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or not isinstance(src.meta.get("fxprune"), torch.Tensor):
        return
    shape = rw.old_shape(src)
    dim = arg(node.args, node.kwargs, 1, "dim", 0) % len(shape)
    if dim not in rw.varying_dims(src):
        return
    new = kept_slice(rw.kept_along(src, dim), arg(node.args, node.kwargs, 2, "start"),
                     arg(node.args, node.kwargs, 3, "end"), arg(node.args, node.kwargs, 4, "step", 1))
    rw.set_arg(node, 1, "dim", dim)
    rw.set_arg(node, 2, "start", new.start)
    rw.set_arg(node, 3, "end", new.stop)


def select_rule(ctx, args, kwargs):
    """``aten.select.int(x, dim, index)`` (``x[:, 0]``): one position of a dim that carries no channels."""
    x = args[0]
    if x.label is None:
        return None
    dim = arg(args, kwargs, 1, "dim") % len(x.shape)
    if dim in varying(x.label):
        ctx.pin(x.label, f"indexing at '{ctx.node.name}' picks single channels")
        return None
    return ctx.canonical(x.label.select(dim, 0))


def module_shape_op(ctx, args, kwargs):
    return shape_op(ctx.module())(ctx, args, kwargs)


def resize_unflatten(m, node, rw):
    new = rw.new_shape(node)
    start = m.dim % len(rw.old_shape(node.args[0]))
    m.unflattened_size = tuple(new[start:start + len(m.unflattened_size)])


BROADCASTS = (torch.ops.aten.expand.default, torch.ops.aten.contiguous.default, torch.ops.aten.clone.default,
              torch.ops.aten.alias.default)  # ATen spellings of what param_behind looks through


def broadcast_member(ctx, param, label, vary, shape, nd):
    """``param`` (``(name, dim)``, found by :func:`param_behind`) is sliced along its ``dim`` as the one
    channel dim ``vary`` of the ``nd``-dim value it is broadcast to (its own ``shape`` there), as ``label``
    says: a ``scale`` member."""
    (d,) = vary
    name, dim = param
    ctx.member(name, dim, along(label, d, shape[d]), "producer", "scale")


RESHAPES = ("reshape", "view", torch.reshape, torch.ops.aten.view.default, torch.ops.aten.reshape.default)


def param_behind(ctx, node, t, vary):
    """``(name, dim)`` of the parameter that ``node`` broadcasts, when the entries along its ``dim`` line
    up with the channel dim ``vary`` of the value ``t``: a class token (``class_token.expand(n, -1, -1)``),
    or a vector reshaped with ``-1`` at that dim (LayerScale's ``gamma.view(1, -1, 1, 1)``: slicing the
    vector slices the view); else None."""
    while isinstance(node, fx.Node) and (node.op == "call_method" and node.target in ("expand", "contiguous", "clone")
                                         or node.op == "call_function" and node.target in BROADCASTS):
        node = node.args[0]
    if len(vary) != 1 or not isinstance(node, fx.Node):
        return None
    (d,) = vary
    if node.op in ("call_method", "call_function") and node.target in RESHAPES and len(node.args) >= 2:
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        td = d - (len(ctx.out_shape) - len(t.shape))  # the channel dim among the view's own dims
        vector = _parameter(ctx, node.args[0])
        if vector is None or len(vector[1]) != 1 or len(sizes) != len(t.shape) or not 0 <= td < len(sizes) \
                or sizes[td] != -1 or any(s != 1 for i, s in enumerate(sizes) if i != td):
            return None
        return vector[0], 0
    found = _parameter(ctx, node)
    if found is None:
        return None
    name, shape = found
    pd = d - (len(t.shape) - len(shape))
    return (name, pd) if 0 <= pd < len(shape) and shape[pd] == t.shape[d] else None


def _parameter(ctx, node):
    """``(name, shape)`` of the parameter a ``get_attr`` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return node.target, ctx.gm.get_parameter(node.target).shape
    except AttributeError:
        return None
