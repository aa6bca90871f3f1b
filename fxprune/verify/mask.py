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

from ..errors import VerificationError, is_out_of_memory
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
    """Runs a graph node by node; :meth:`record` sees each node's value as it is computed
    (here: kept in ``values``), and ``at`` names the node running (a failure's node).

    ``as_run`` (optional) gives the tensor to use in place of each parameter, buffer or
    constant, made when a node reads it and dropped after: a module call runs with its
    tensors swapped in its (copied) modules, a ``get_attr`` returns the new tensor.
    """

    def __init__(self, gm, as_run=None):
        super().__init__(gm)
        self.values: dict[str, object] = {}
        self.at: str | None = None
        self.as_run = as_run

    def get_attr(self, target, args, kwargs):
        return self._own(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        if self.as_run is None:
            return super().call_module(target, args, kwargs)
        swapped = []   # set as attributes: a module may keep its own list of them (an LSTM's flat weights)
        for m in self.fetch_attr(target).modules():
            for key, t in list(m._parameters.items()) + list(m._buffers.items()):
                new = t if t is None else self.as_run(t)
                if new is not t:
                    swapped.append((m, key, t))
                    setattr(m, key, new)
        try:
            return super().call_module(target, args, kwargs)
        finally:
            for m, key, t in swapped:
                setattr(m, key, t)

    def run_node(self, n):
        self.at = n.name
        out = super().run_node(n)
        if n.op in ("placeholder", "call_module", "call_function", "call_method"):
            self.record(n, out)
        return out

    def record(self, n: fx.Node, value) -> None:
        self.values[n.name] = value

    def _own(self, t):
        """A module's tensor as this run uses it (see ``as_run``)."""
        return self.as_run(t) if self.as_run is not None and isinstance(t, torch.Tensor) else t


class _Reference(_Capture):
    """The masked original, with two exceptions the rules mark in ``node.meta``.

    ``fxprune_contract`` (a matmul or einsum summing over channels, q @ k^T; a sum or norm over them;
    a conv across them, ECA's): the removed
    channels of its inputs are zeroed first, as their producers are not. ``fxprune_approx``
    (a LayerNorm over channels, or a GroupNorm of one group; see "approximate" groups): the norm is
    recomputed over the kept channels only, as the pruned model computes it.

    Each node the pruned model also has goes, as it is computed, to ``beside`` (a
    :class:`_Compared`), gathered at the kept channels (:func:`_snapshot`).
    """

    def __init__(self, gm, keep, beside: _Compared, as_run=None):
        super().__init__(gm, as_run)
        self.keep = keep
        self.beside = beside
        self._modules = dict(gm.named_modules())
        self._unset: dict[int, object] = {}   # storages of tensors allocated uninitialised (see _uninitialised)

    def record(self, n, value):
        if n.name not in self.beside.pending:
            return
        if _uninitialised(n, value, self._unset):
            self.beside.skip(n.name)
        else:
            self.beside.expect(n.name, _snapshot(value, n.meta.get("fxprune"), self.keep))

    def run_node(self, n):
        if n.meta.get("fxprune_contract") or n.meta.get("fxprune_approx") is not None:
            self.at = n.name
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args = tuple(self._zeroed(v, a) for v, a in zip(args, n.args))
                out = getattr(self, n.op)(n.target, args, kwargs)
                if n.meta.get("fxprune_approx") is not None:
                    out = self._renormalised(n, out, args, kwargs)
            self.record(n, out)
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
                weight, bias, eps = self._own(m.weight), self._own(m.bias), m.eps
            else:
                weight, bias, eps = (arg(args, kwargs, i, name) for i, name in ((2, "weight"), (3, "bias"), (4, "eps")))
            xk = x.index_select(1, kept)
            wk = weight.index_select(0, kept) if weight is not None else None
            bk = bias.index_select(0, kept) if bias is not None else None
            yk = torch.nn.functional.group_norm(xk, 1, wk, bk, 1e-5 if eps is None else eps)
            return out.index_copy(1, kept, yk)
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            k, weight, bias, eps = len(m.normalized_shape), self._own(m.weight), self._own(m.bias), m.eps
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


def float_literals_to(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Write ``dtype`` for every ``torch.float32`` literal in ``gm``'s graph, in place: an export graph spells
    ``x.to(weight.dtype)`` with the dtype as a literal, which a float64 copy must follow (the caller recompiles
    where it runs ``gm``'s code rather than its graph)."""
    for n in gm.graph.nodes:
        n.args = map_aggregate(n.args, lambda a: dtype if a is torch.float32 else a)
        n.kwargs = map_aggregate(n.kwargs, lambda a: dtype if a is torch.float32 else a)


def _like(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as a frozen parameter if ``t`` is a parameter (a module may check the type)."""
    return torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new


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
    # Both models run on their own tensors, each one converted to ``dtype`` and, in the original,
    # masked (the removed channels' consumer columns zeroed) only while a node uses it
    # (:class:`_Capture`'s ``as_run``): a masked or converted copy of every weight at once is
    # what runs out of memory on a 400 M-parameter model.
    state = dict(graph.module.named_parameters(remove_duplicate=False))
    state.update(graph.module.named_buffers(remove_duplicate=False))
    removed = [(param, dim, (ch >= 0) & ~keep[ch.clamp(min=0)]) for (param, dim), ch in graph.param_channels.items()
               if graph.param_kinds[(param, dim)] == "consumer"]
    removed += [(param, dim, (ch >= 0) & ~keep[ch.clamp(min=0)])   # a grouped conv: each group's own columns
                for (param, dim), ch in graph.grouped_params.items()]
    zeroed: dict[int, list] = {}  # id(tensor): [(dim, positions to zero, or one such list per group)]
    for param, dim, gone in removed:
        if bool(gone.any()):
            where = torch.nonzero(gone).flatten() if gone.dim() == 1 else [torch.nonzero(g).flatten() for g in gone]
            zeroed.setdefault(id(state[param]), []).append((dim, where))

    def masked_original(t: torch.Tensor) -> torch.Tensor:
        cuts = zeroed.get(id(t))
        if cuts is None:
            return converted(t)
        new = t.detach().to(dtype or t.dtype, copy=True)
        for dim, where in cuts:
            if isinstance(where, torch.Tensor):
                new.index_fill_(dim, where, 0.0)
            else:
                for part, columns in zip(new.chunk(len(where), 1 if dim == 0 else 0), where):
                    part.index_fill_(dim, columns, 0.0)
        return _like(t, new)

    def converted(t: torch.Tensor) -> torch.Tensor:
        return _like(t, t.detach().to(dtype)) if dtype is not None and t.is_floating_point() else t

    given = pruned
    if dtype is not None:
        pruned = copy_modules(pruned, {id(t): t for t in _tensors(pruned)})  # its own graph; the same tensors
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    masked = copy_modules(graph.module, {id(t): t for t in _tensors(graph.module)}).eval()
    if dtype is not None:
        for gm, source in ((masked, graph.module), (pruned, given)):
            assert gm.graph is not source.graph  # copy_modules copied the graph: edits stay in the copies
            float_literals_to(gm, dtype)
    params = set()  # parameters, and values computed from them alone: sliced as members, not labelled
    for n in graph.module.graph.nodes:
        tensors_in = [a for a in n.all_input_nodes if "tensor_meta" in a.meta]
        if n.op == "get_attr" or (n.op != "placeholder" and tensors_in and all(a.name in params for a in tensors_in)):
            params.add(n.name)
    with torch.no_grad(), eval_mode(pruned):
        got = _Compared(pruned, {n.name for n in pruned.graph.nodes} - params,
                        converted if dtype is not None else None)
        got.start(inputs)
        outs_ref = _run(_Reference(masked, keep, got, masked_original), inputs, "the masked original")
        got.until(None)
        outs_new = got.result
    ok = got.failing[1] is None
    rel, node = got.worst if ok else got.failing
    outs_ref, outs_new = tree_flatten(outs_ref)[0], tree_flatten(outs_new)[0]
    out_err = max((float((a - b).abs().max()) for a, b in zip(outs_ref, outs_new)
                   if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == b.shape), default=0.0)
    approximate = sum(1 for name, g in graph.groups.items() if g.approximate
                      and not bool(keep[graph.offsets[name]:graph.offsets[name] + g.size].all()))
    return {"ok": ok, "nodes_compared": got.compared, "nan_nodes": got.nan_nodes, "approximate_groups": approximate,
            "max_rel_diff": rel, "worst_node": node,
            "output_max_abs_diff": out_err, "rtol": MASK_RTOL, "atol": MASK_ATOL}


class _Compared(_Capture):
    """The pruned model, run beside the masked original (:class:`_Reference`) one node at a time:
    each node's value is compared with the original's as soon as both exist, so that only the
    values of the nodes between the two runs are held (not every node's output of a whole model).

    ``pending``: the nodes the original has still to give (``expect``); ``until(name)`` runs this
    model up to that node. Figures: ``compared`` tensors, ``nan_nodes``, and ``worst`` and ``failing``
    as (relative difference, node).
    """

    def __init__(self, gm, names: set[str], as_run=None):
        super().__init__(gm, as_run)
        self.pending = set(names)
        self.expected: dict[str, object] = {}  # the original's snapshots, waiting for this model's node
        self.early: dict[str, object] = {}     # this model's snapshots, waiting for the original's node
        self.worst, self.failing, self.compared, self.nan_nodes = (0.0, None), (0.0, None), 0, 0

    def start(self, inputs: tuple) -> None:
        self.env, self.ran, self.result = {}, set(), None
        self.args_iter = iter(self.graph.process_inputs(*inputs))
        self._nodes = iter(self.graph.nodes)

    def until(self, name: str | None = None) -> None:
        """Run nodes until ``name`` has run (``None``: to the output)."""
        while name is None or name not in self.ran:
            node = next(self._nodes, None)
            if node is None:
                return
            try:
                self.env[node] = self.run_node(node)
            except VerificationError:
                raise
            except Exception as exc:
                raise _node_failure(exc, node.name, "the pruned model") from exc
            self.ran.add(node.name)
            for gone in self.user_to_last_uses.get(node, []):
                del self.env[gone]
            if node.op == "output":
                self.result = self.graph.process_outputs(self.env[node])

    def skip(self, name: str) -> None:
        """The original's value of ``name`` is not to be compared (:func:`_uninitialised`)."""
        self.pending.discard(name)
        self.early.pop(name, None)

    def expect(self, name: str, snapshot) -> None:
        self.pending.discard(name)
        if name in self.early:
            self._compare(name, snapshot, self.early.pop(name))
        else:
            self.expected[name] = snapshot
            self.until(name)

    def record(self, n, value):
        if n.name in self.expected:
            self._compare(n.name, self.expected.pop(n.name), value)
        elif n.name in self.pending:
            self.early[n.name] = _snapshot(value, None, None)

    def _compare(self, name, ref, value):
        for a, b in _align(ref, value):
            if a.shape != b.shape:
                raise VerificationError(f"node '{name}': pruned output has shape {tuple(b.shape)}, "
                                        f"the masked original {tuple(a.shape)}")
            if not a.is_floating_point() or a.numel() == 0:
                continue
            scale, err = _scale_and_error(a, b)
            rel = err / (scale + 1e-30)
            self.compared += 1
            self.nan_nodes += bool(torch.isnan(a).any())
            self.worst = max(self.worst, (rel, name), key=lambda w: w[0])
            if not err <= MASK_RTOL * scale + MASK_ATOL:  # also catches NaN
                nan_last = lambda w: w[0] if w[0] == w[0] else float("inf")  # noqa: E731
                if self.failing[1] is None or nan_last((rel,)) > nan_last(self.failing):
                    self.failing = (rel, name)


def _run(interpreter: _Capture, inputs: tuple, what: str):
    """Run a model node by node and return its outputs; a failure is a :class:`VerificationError` naming the node."""
    interpreter.extra_traceback = False
    try:
        return interpreter.run(*inputs)
    except VerificationError:
        raise
    except Exception as exc:
        raise _node_failure(exc, interpreter.at or "?", what) from exc


def _node_failure(exc: Exception, node: str, what: str) -> VerificationError:
    if is_out_of_memory(exc):
        return VerificationError(
            f"out of memory at node '{node}' of {what} while checking the pruned model: the check runs the masked "
            "original and the pruned model side by side on the example inputs. Pass smaller example inputs "
            "(a batch of 1), or verify=False to skip the check.")
    first = (str(exc).splitlines() or [""])[0]
    return VerificationError(f"{what} fails at node '{node}': {type(exc).__name__}: {first}. "
                             "This is a bug in fxprune: please report it with the model; meanwhile pass "
                             f"ignore=[...] with the groups of the channels that reach node '{node}'.")


def _scale_and_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The largest finite magnitude of ``a`` and the largest difference of ``b`` from it, where equal values
    (infinities of the same sign included: masks filled with -inf, ``log(0)`` in position buckets) differ by 0.
    A NaN in only one of them stays a difference (NaN)."""
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros((), dtype=a.dtype), (a - b).abs())
    finite = a[torch.isfinite(a)]
    return (float(finite.abs().max()) if finite.numel() else 0.0), float(diff.max())


_EMPTY = {torch.empty, torch.empty_like, torch.empty_strided, "new_empty", "new_empty_strided",
          *(getattr(getattr(torch.ops.aten, op), overload) for op, overload in (
              ("empty", "memory_format"), ("empty_like", "default"), ("empty_strided", "default"),
              ("new_empty", "default"), ("new_empty_strided", "default")))}


def _uninitialised(n: fx.Node, value, unset: dict) -> bool:
    """Whether ``value`` (node ``n``'s) may hold memory not yet written: an ``empty`` allocation (DeepSeek's
    ``q.new_empty(...)``, filled by in-place copies later), or a view of one (the slice a copy then fills).
    Such a value is not compared (its positions are whatever the allocator gave); what is read from it once
    filled is, at the nodes that read it. ``unset``: the storages of the allocations seen so far, by address
    (held, so that no later tensor gets the address of a freed one)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.layout != torch.strided:
        return False
    storage = value.untyped_storage()
    if n.op in ("call_function", "call_method") and n.target in _EMPTY:
        unset[storage.data_ptr()] = storage
    return storage.data_ptr() in unset


def _snapshot(value, label, keep):
    """``value`` as the pruned model should have it: gathered at the kept channels (:func:`select_kept`),
    each tensor copied as it is now (a later in-place op, ``relu_``, must not change what is compared).
    Values of other kinds (dicts, numbers) are not compared: ``None``."""
    if isinstance(value, (tuple, list)):
        labels = label if isinstance(label, (tuple, list)) else [None] * len(value)
        return [_snapshot(v, lab, keep) for v, lab in zip(value, labels)]
    if not isinstance(value, torch.Tensor):
        return None
    kept = select_kept(value, label, keep) if label is not None else value
    return kept.clone() if kept is value else kept


def _align(ref, new):
    """Pairs (masked original's snapshot, pruned) of one node's tensors."""
    if isinstance(ref, (tuple, list)) and isinstance(new, (tuple, list)):
        return [p for r, n in zip(ref, new) for p in _align(r, n)]
    if not isinstance(ref, torch.Tensor) or not isinstance(new, torch.Tensor):
        return []
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

    def record(self, n, value):
        if n in self.kept:
            self.values[n.name] = _cloned(value)


def check_module(result: dict) -> None:
    if not result["ok"]:
        raise VerificationError(
            f"the pruned copy of the model differs from the pruned graph at {result['worst_module']} "
            f"(relative difference {result['max_rel_diff']:.2e} > {MASK_RTOL:.0e}). This is a bug in fxprune: "
            "please report it with the model; meanwhile use output='graph'.")
