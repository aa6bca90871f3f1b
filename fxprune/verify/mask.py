"""Checks that a pruned model is right: mask-equivalence and ONNX Runtime agreement.

**Mask-equivalence.** In a copy of the original, the consumer slices of every removed
channel (conv/linear input columns) are zeroed; that model and the pruned one then
run on the same random inputs, and *every* node's output is compared, the original's
gathered at the kept channels. Comparing each intermediate tensor, not only the logits,
keeps the check sharp on randomly initialised models whose logits are degenerate (a
zero-initialised head gives all-zero logits whatever the features). Tolerance:
``|pruned - masked| <= MASK_RTOL * max|masked| + MASK_ATOL`` per node.

**ONNX agreement.** The pruned module is exported with ``torch.onnx.export`` (one file,
dynamic batch), checked with ``onnx.checker``, run in ONNX Runtime on the CPU, and its
outputs compared with torch's: ``|ort - torch| <= ORT_RTOL * max|torch| + ORT_ATOL``.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> small = fxprune.compile(net, (torch.randn(1, 3, 8, 8),), ratio=0.5, onnx=False)
    >>> fxprune.report(small).mask["ok"]
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import VerificationError
from ..labels import kept_along, kept_mask, select_kept
from ..ops import rule_of
from ..ops.norm import group_norm_rule
from ..ops.schema import arg
from ..rewrite.graph import copy_modules
from ..rewrite.scopes import module_calls
from ..utils import eval_mode

MASK_RTOL, MASK_ATOL = 1e-4, 1e-6
ORT_RTOL, ORT_ATOL = 1e-4, 1e-5


def random_inputs(example_inputs: tuple, seed: int = 0, batch: int | None = None) -> tuple:
    """Inputs shaped like the examples (floats redrawn from N(0, 1), others kept)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            if batch is not None and x.dim() > 0:
                x = x[:1].expand((batch,) + tuple(x.shape[1:]))
            if x.is_floating_point():
                x = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            else:
                x = x.clone()
        out.append(x)
    return tuple(out)


class _Capture(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op in ("placeholder", "call_module", "call_function", "call_method"):
            self.values[n.name] = out
        return out


class _Reference(_Capture):
    """The masked original, with two exceptions the rules mark in ``node.meta``.

    ``fxprune_contract`` (a matmul or einsum summing over channels, q @ k^T; a sum or norm over them;
    a conv across them, ECA's): the removed
    channels of its inputs are zeroed first, as their producers are not. ``fxprune_approx``
    (a LayerNorm over channels, or a GroupNorm of one group; see "approximate" groups): the norm is
    recomputed over the kept channels only, as the pruned model computes it.
    """

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep = keep
        self._modules = dict(gm.named_modules())

    def run_node(self, n):
        if n.meta.get("fxprune_contract") or n.meta.get("fxprune_approx") is not None:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args = tuple(self._zeroed(v, a) for v, a in zip(args, n.args))
                out = getattr(self, n.op)(n.target, args, kwargs)
                if n.meta.get("fxprune_approx") is not None:
                    out = self._renormalised(n, out, args, kwargs)
            self.values[n.name] = out
            return out
        return super().run_node(n)

    def _zeroed(self, value, node):
        if isinstance(value, (tuple, list)) and isinstance(node, (tuple, list)):
            return type(value)(self._zeroed(v, a) for v, a in zip(value, node))
        label = node.meta.get("fxprune") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor) or not isinstance(label, torch.Tensor) or label.dim() != value.dim():
            return value
        kept = kept_mask(label, self.keep)
        if bool(kept.all()):
            return value
        return value.masked_fill(~kept, 0.0)

    def _renormalised(self, n, out, args, kwargs):
        d = n.meta["fxprune_approx"]
        x = args[0]
        kept = torch.nonzero(kept_along(n.meta["fxprune"], d, x.shape[d], self.keep)).flatten()
        if kept.numel() == x.shape[d]:
            return out
        if _is_group_norm(n, self._modules):   # one group (see fxprune.ops.norm.group_norm_rule)
            if n.op == "call_module":
                m = self.module.get_submodule(n.target)
                weight, bias, eps = m.weight, m.bias, m.eps
            else:
                weight, bias, eps = (arg(args, kwargs, i, name) for i, name in ((2, "weight"), (3, "bias"), (4, "eps")))
            xk = x.index_select(1, kept)
            wk = weight.index_select(0, kept) if weight is not None else None
            bk = bias.index_select(0, kept) if bias is not None else None
            yk = torch.nn.functional.group_norm(xk, 1, wk, bk, 1e-5 if eps is None else eps)
            return out.index_copy(1, kept, yk)
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            k, weight, bias, eps = len(m.normalized_shape), m.weight, m.bias, m.eps
        else:
            k = len(args[1] if len(args) > 1 else kwargs["normalized_shape"])
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            bias = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        pd = d - (x.dim() - k)
        xk = x.index_select(d, kept)
        wk = weight.index_select(pd, kept) if weight is not None else None
        bk = bias.index_select(pd, kept) if bias is not None else None
        yk = torch.nn.functional.layer_norm(xk, xk.shape[x.dim() - k:], wk, bk, eps)
        return out.index_copy(d, kept, yk)


def _is_group_norm(n: fx.Node, modules: dict) -> bool:
    rule = rule_of(n, modules)
    return rule is not None and rule.couple is group_norm_rule


def mask_equivalence(graph, keep: torch.Tensor, pruned: fx.GraphModule, inputs: tuple) -> dict:
    """Compare ``pruned`` with the masked original node by node; returns the figures.

    A float32 mismatch is run again in float64 (both models and the inputs converted, copies
    only): a right rewrite agrees there by orders of magnitude more, while float32 rounding
    that a deep or badly conditioned model amplifies (a softmax over large logits sums its
    terms in another order once the zeros are gone) does not survive the change of precision.
    The result then says ``checked_in: "float64"`` and keeps the float32 figures beside it.
    """
    result = _compare(graph, keep, pruned, inputs)
    if result["ok"]:
        return result
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # constants the forward makes (torch.ones, arange().float())
        again = _compare(graph, keep, pruned, inputs, torch.float64)
    except (VerificationError, RuntimeError, TypeError, MemoryError) as exc:  # no float64 run: the float32 verdict
        cause = exc.__cause__ or exc  # a node's failure: what the node raised
        return {**result, "float64_error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}"}
    finally:
        torch.set_default_dtype(previous)
    if not again["ok"] or again["nodes_compared"] != result["nodes_compared"] or again["nan_nodes"] > result["nan_nodes"]:
        return result  # (NaNs on both sides compare equal: a run that made new ones proves nothing)
    return {**again, "checked_in": "float64", "float32_max_rel_diff": result["max_rel_diff"],
            "float32_worst_node": result["worst_node"]}


def _in_dtype(tensors, dtype):
    """``{id(t): t converted to dtype}`` for the floating tensors among ``tensors``."""
    return {id(t): (torch.nn.Parameter(t.detach().to(dtype), requires_grad=False) if isinstance(t, torch.nn.Parameter)
                    else t.to(dtype)) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Every parameter, buffer and tensor attribute (``get_attr`` target) of ``gm``."""
    out = [t for _, t in gm.named_parameters(remove_duplicate=False)]
    out += [t for _, t in gm.named_buffers(remove_duplicate=False)]
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            value = getattr(gm.get_submodule(owner), attr, None)
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def _compare(graph, keep: torch.Tensor, pruned: fx.GraphModule, inputs: tuple, dtype=None) -> dict:
    """:func:`mask_equivalence` at the models' own precision, or with every floating tensor in ``dtype``."""
    # The masked original: new modules, the zeroed weights new tensors, every other tensor
    # the original's own, only read (a second copy of a 2.6 GB model is what runs out of memory).
    state = dict(graph.module.named_parameters(remove_duplicate=False))
    state.update(graph.module.named_buffers(remove_duplicate=False))
    memo = {id(t): t for t in state.values()}
    given = pruned
    if dtype is not None:
        memo.update(_in_dtype(_tensors(graph.module), dtype))
        pruned = copy_modules(pruned, _in_dtype(_tensors(pruned), dtype))
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)

    def writable(param):
        """The masked copy of ``param``, cloned on first write (the original is only read; a converted copy is ours)."""
        old = state[param]
        if memo[id(old)] is old:
            memo[id(old)] = torch.nn.Parameter(old.detach().clone(), requires_grad=False) \
                if isinstance(old, torch.nn.Parameter) else old.detach().clone()
        return memo[id(old)]

    with torch.no_grad():
        for (param, dim), channels in graph.param_channels.items():
            if graph.param_kinds[(param, dim)] != "consumer":
                continue
            removed = (channels >= 0) & ~keep[channels.clamp(min=0)]
            if bool(removed.any()):
                writable(param).index_fill_(dim, torch.nonzero(removed).flatten(), 0.0)
        for (param, dim), channels in graph.grouped_params.items():  # grouped conv: each group's own columns
            removed = (channels >= 0) & ~keep[channels.clamp(min=0)]
            if bool(removed.any()):
                new = writable(param)
                for b, part in enumerate(new.chunk(channels.shape[0], 1 if dim == 0 else 0)):
                    part.index_fill_(dim, torch.nonzero(removed[b]).flatten(), 0.0)
    masked = copy_modules(graph.module, memo).eval()
    if dtype is not None:  # an export graph spells `x.to(weight.dtype)` with the dtype as a literal
        for gm, source in ((masked, graph.module), (pruned, given)):
            assert gm.graph is not source.graph  # copy_modules copied the graph: edits stay in the copies
            for n in gm.graph.nodes:
                n.args = map_aggregate(n.args, lambda a: dtype if a is torch.float32 else a)
                n.kwargs = map_aggregate(n.kwargs, lambda a: dtype if a is torch.float32 else a)
    with torch.no_grad():
        ref = _Reference(masked, keep)
        _run(ref, inputs, "the masked original")
    with torch.no_grad(), eval_mode(pruned):
        got = _Capture(pruned)
        _run(got, inputs, "the pruned model")
    pruned_eval = pruned
    labels = {n.name: n.meta.get("fxprune") for n in graph.module.graph.nodes}
    params = set()  # parameters, and values computed from them alone: sliced as members, not labelled
    for n in graph.module.graph.nodes:
        tensors_in = [a for a in n.all_input_nodes if "tensor_meta" in a.meta]
        if n.op == "get_attr" or (n.op != "placeholder" and tensors_in and all(a.name in params for a in tensors_in)):
            params.add(n.name)
    worst, worst_failing, compared, nan_nodes = (0.0, None), (0.0, None), 0, 0
    for name, value in got.values.items():
        if name not in ref.values or name in params:
            continue
        for a, b in _align(ref.values[name], value, labels.get(name), keep):
            if a.shape != b.shape:
                raise VerificationError(f"node '{name}': pruned output has shape {tuple(b.shape)}, "
                                        f"the masked original {tuple(a.shape)}")
            if not a.is_floating_point() or a.numel() == 0:
                continue
            scale, err = _scale_and_error(a, b)
            rel = err / (scale + 1e-30)
            compared += 1
            nan_nodes += bool(torch.isnan(a).any())
            worst = max(worst, (rel, name), key=lambda w: w[0])
            if not err <= MASK_RTOL * scale + MASK_ATOL:  # also catches NaN
                worst_failing = max(worst_failing, (rel, name), key=lambda w: w[0] if w[0] == w[0] else float("inf"))
                if worst_failing[1] is None:
                    worst_failing = (rel, name)
    ok = worst_failing[1] is None
    rel, node = worst if ok else worst_failing
    outs_ref = tree_flatten(_output(graph.module, ref))[0]
    outs_new = tree_flatten(_output(pruned_eval, got))[0]
    out_err = max((float((a - b).abs().max()) for a, b in zip(outs_ref, outs_new)
                   if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == b.shape), default=0.0)
    approximate = sum(1 for name, g in graph.groups.items() if g.approximate
                      and not bool(keep[graph.offsets[name]:graph.offsets[name] + g.size].all()))
    return {"ok": ok, "nodes_compared": compared, "nan_nodes": nan_nodes, "approximate_groups": approximate,
            "max_rel_diff": rel, "worst_node": node,
            "output_max_abs_diff": out_err, "rtol": MASK_RTOL, "atol": MASK_ATOL}


def _run(interpreter: _Capture, inputs: tuple, what: str) -> None:
    """Run a model node by node; a failure is a :class:`VerificationError` naming the node."""
    try:
        interpreter.run(*inputs)
    except Exception as exc:
        done = set(interpreter.values)
        node = next((n.name for n in interpreter.module.graph.nodes
                     if n.op in ("call_module", "call_function", "call_method") and n.name not in done), "?")
        raise VerificationError(f"{what} fails at node '{node}': {type(exc).__name__}: {str(exc).splitlines()[0]}. "
                                "This is a bug in fxprune: please report it with the model; meanwhile pass "
                                f"ignore=[...] with the groups of the channels that reach node '{node}'.") from exc


def _scale_and_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The largest finite magnitude of ``a`` and the largest difference of ``b`` from it, where equal values
    (infinities of the same sign included: masks filled with -inf, ``log(0)`` in position buckets) differ by 0.
    A NaN in only one of them stays a difference (NaN)."""
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros((), dtype=a.dtype), (a - b).abs())
    finite = a[torch.isfinite(a)]
    return (float(finite.abs().max()) if finite.numel() else 0.0), float(diff.max())


def _output(gm, capture):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return map_aggregate(out.args[0], lambda a: capture.values.get(a.name) if isinstance(a, fx.Node) else a)


def _align(ref, new, label, keep):
    """Pairs (ref gathered at the kept channels, pruned) for one node's value(s)."""
    if isinstance(ref, (tuple, list)) and isinstance(new, (tuple, list)):
        labels = label if isinstance(label, (tuple, list)) else [None] * len(ref)
        return [p for r, n, lab in zip(ref, new, labels) for p in _align(r, n, lab, keep)]
    if not isinstance(ref, torch.Tensor) or not isinstance(new, torch.Tensor):
        return []
    if isinstance(label, torch.Tensor) and label.dim() == ref.dim():
        ref = select_kept(ref, label, keep)
    return [(ref, new)]


def graph_param(gm, name):
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def check_mask(result: dict) -> None:
    if not result["ok"]:
        raise VerificationError(
            f"the pruned model differs from the masked original at node '{result['worst_node']}' "
            f"(relative difference {result['max_rel_diff']:.2e} > {MASK_RTOL:.0e}). This is a bug in fxprune: "
            "please report it with the model; meanwhile pass ignore=[...] for the groups around that node."
            + (f" (The float64 re-check, which tells float32 rounding from a wrong rewrite, could not run: "
               f"{result['float64_error']}.)" if result.get("float64_error") else ""))


def module_equivalence(module: torch.nn.Module, pruned: fx.GraphModule, inputs: tuple) -> dict:
    """Compare a pruned model of any class (``output="module"``) with the pruned ``GraphModule``.

    ``module`` runs eagerly, with a forward hook on each of its modules that ``pruned`` calls
    (a ``call_module`` node, or in a ``torch.export`` graph a run of nodes with that module in
    their ``nn_module_stack``: :func:`fxprune.rewrite.scopes.module_calls`); ``pruned`` runs node
    by node. The outputs of each module call (in call order) and the model outputs are compared
    with the mask-equivalence tolerance; a module whose calls the graph does not show one for one
    (a call export left no node for, an output of several tensors) is compared at the outputs only.
    Returns the figures (``ok``, ``modules_compared``, ``max_rel_diff``, ``worst_module``,
    ``output_max_abs_diff``).
    """
    nodes: dict[str, list] = {}
    for target, calls in module_calls(pruned).items():
        nodes[target] = [c.outputs[0] if len(c.outputs) == 1 else None for c in calls]
    seen: dict[str, list] = {t: [] for t in nodes}
    hooks = []
    for target in nodes:
        try:
            sub = module.get_submodule(target)
        except AttributeError:
            continue
        hooks.append(sub.register_forward_hook(lambda m, a, out, t=target: seen[t].append(_cloned(out))))
    try:
        with torch.no_grad(), eval_mode(module):
            out_module = module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad(), eval_mode(pruned):
        got = _Snapshots(pruned, {n for outs in nodes.values() for n in outs if n is not None})
        out_graph = got.run(*inputs)
    worst, compared, failing = (0.0, None), 0, None

    def compare(where, a, b):
        nonlocal worst, compared, failing
        xs, ys = tree_flatten(a)[0], tree_flatten(b)[0]
        xs = [x for x in xs if isinstance(x, torch.Tensor)]
        ys = [y for y in ys if isinstance(y, torch.Tensor)]
        if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
            failing = failing or (float("inf"), where)
            return
        for x, y in zip(xs, ys):
            if not x.is_floating_point() or x.numel() == 0:
                continue
            scale, err = float(x.abs().max()), float((x - y).abs().max())
            rel = err / (scale + 1e-30)
            compared += 1
            worst = max(worst, (rel, where), key=lambda w: w[0])
            if not err <= MASK_RTOL * scale + MASK_ATOL:
                failing = failing or (rel, where)

    for target, outs in nodes.items():
        if len(outs) != len(seen[target]):
            continue  # calls the graph does not show one for one
        for node, value in zip(outs, seen[target]):
            if node is not None and len([v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]) == 1:
                compare(f"module '{target}' (node '{node.name}')", got.values[node.name], value)
    compare("the model outputs", out_graph, out_module)
    xs = [x for x in tree_flatten(out_graph)[0] if isinstance(x, torch.Tensor)]
    ys = [y for y in tree_flatten(out_module)[0] if isinstance(y, torch.Tensor)]
    out_err = max((float((x - y).abs().max()) for x, y in zip(xs, ys)
                   if x.is_floating_point() and x.shape == y.shape), default=0.0)
    rel, where = failing or worst
    return {"ok": failing is None, "modules_compared": compared, "max_rel_diff": rel, "worst_module": where,
            "output_max_abs_diff": out_err, "rtol": MASK_RTOL, "atol": MASK_ATOL}


def _cloned(value):
    """``value`` with every tensor cloned: a later in-place op (``out += identity``) must not change it."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


class _Snapshots(_Capture):
    """:class:`_Capture` keeping a copy of the value of each node in ``kept``, taken when it is computed
    (a later in-place op would change it)."""

    def __init__(self, gm, kept):
        super().__init__(gm)
        self.kept = kept

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.kept:
            self.values[n.name] = _cloned(out)
        return out


def check_module(result: dict) -> None:
    if not result["ok"]:
        raise VerificationError(
            f"the pruned copy of the model differs from the pruned graph at {result['worst_module']} "
            f"(relative difference {result['max_rel_diff']:.2e} > {MASK_RTOL:.0e}). This is a bug in fxprune: "
            "please report it with the model; meanwhile use output='graph'.")
