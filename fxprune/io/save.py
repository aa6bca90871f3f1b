"""Save and load a pruned model without pickled code: the plan and the weights, rebuilt from the architecture.

:func:`save` writes one ``torch.save`` file holding plain data only: the
:class:`~fxprune.plan.Plan` (JSON), the pruned ``state_dict``, the example input shapes,
the training mode the graph was traced in, and a *structure* (one line per node of the
pruned graph, with the ``repr`` of its module), so it loads with ``weights_only=True``.
:func:`load` calls ``model_factory()`` for the original architecture, re-applies the plan
(:func:`fxprune.apply`), checks that the rebuilt graph and every weight's name and shape
are the ones saved, and loads the weights. Any difference raises
:class:`~fxprune.errors.PlanError` naming it: never a silently wrong model.

Example::

    >>> import torch, tempfile, os, fxprune
    >>> def make():
    ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> small = fxprune.compile(make(), (x,), ratio=0.5, onnx=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
    >>> fxprune.save(small, path)
    >>> again = fxprune.load(path, make, (x,))
    >>> torch.equal(again(x), small(x))
    True
"""
from __future__ import annotations

import copy
import os

import torch
import torch.fx as fx

from ..errors import ConfigError, PlanError
from ..pipeline import Pipeline
from ..plan import Plan
from ..view.report import report

FORMAT = "fxprune.saved/1"


def structure(gm: torch.nn.Module) -> list[str]:
    """One line per node of ``gm``: the node as fx prints it, and the ``repr`` of the module it calls.

    Two graphs with the same lines compute the same function of their weights. For a module
    that is not a ``GraphModule`` (``output="module"``), one line per submodule: its name,
    class and ``extra_repr`` (its channel counts).
    """
    if not isinstance(gm, fx.GraphModule):
        return [f"{name or '<root>'}: {type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})"
                for name, m in gm.named_modules()]
    lines = []
    for node in gm.graph.nodes:
        line = node.format_node() or node.name
        if node.op == "call_module":
            line += "  # " + " ".join(repr(gm.get_submodule(node.target)).split())
        lines.append(line)
    return lines


def save(pruned: torch.nn.Module, path) -> None:
    """Write ``pruned`` (a module returned by :func:`fxprune.compile` or :func:`fxprune.apply`,
    either output) to ``path``."""
    rep = report(pruned)  # ConfigError if this is not fxprune's output
    if rep.output == "parts":
        raise ConfigError("a model pruned part by part (fxprune.partial) holds one plan per part, which fxprune.save "
                          "does not write yet: keep it with torch.save(model) or its state_dict")
    optional = []
    if isinstance(pruned, fx.GraphModule):
        shapes, dtypes = [], []
        for node in pruned.graph.nodes:
            if node.op == "placeholder":
                meta = node.meta.get("tensor_meta")
                shapes.append(list(meta.shape) if meta is not None else None)
                dtypes.append(str(meta.dtype) if meta is not None else None)
                optional.append(bool(node.args))   # an argument with a default (timm's attn_mask=None)
        traced_training = bool(pruned.meta.get("fxprune_training", pruned.training))
    else:
        sig = rep.signature or {}
        shapes, dtypes = sig.get("input_shapes", []), sig.get("input_dtypes", [])
        traced_training = bool(sig.get("traced_training", pruned.training))
    payload = {
        "format": FORMAT,
        "output": "graph" if isinstance(pruned, fx.GraphModule) else "module",
        "plan": rep.plan.to_json(),
        "traced_training": traced_training,
        "tracer": rep.capture.get("tracer", "fx"),
        "training": bool(pruned.training),
        "input_shapes": shapes,
        "input_dtypes": dtypes,
        "input_optional": optional,
        "structure": structure(pruned),
        "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu().clone() for k, v in pruned.state_dict().items()},
    }
    torch.save(payload, path)


def load(path, model_factory, example_inputs, *, verify: bool = False, leaf_modules=(),
         concrete_args=None, output: str | None = None) -> torch.nn.Module:
    """Rebuild the pruned model saved at ``path`` from ``model_factory()`` and load its weights.

    ``output`` is what to rebuild: ``"graph"`` (a ``GraphModule``) or ``"module"`` (a pruned
    copy of the factory's model, see :func:`fxprune.compile`); by default, what was saved.

    ``model_factory`` is a callable returning the original architecture (its weights do
    not matter), or such a module itself (it is copied, not changed). ``example_inputs``
    must have the shapes the model was pruned with (the batch size may differ). With
    ``verify`` the rebuilt structure is also checked by mask-equivalence before the
    weights are loaded. Raises :class:`PlanError` when the file does not match.
    """
    data = _read(path)
    if isinstance(model_factory, torch.nn.Module):
        model = copy.deepcopy(model_factory)
    elif callable(model_factory):
        model = model_factory()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model_factory returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        raise ConfigError("model_factory must be a callable returning the original nn.Module (or that module)")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    _check_inputs(data, example_inputs)
    model.train(data["traced_training"])  # trace the branches the saved graph was traced with
    plan = Plan.from_json(data["plan"])
    saved = data.get("output", "graph")
    output = output or saved
    pruned = Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                      verify=verify, onnx=False, capture=data.get("tracer", "auto"), output=output).apply(plan)
    state = data["state_dict"]
    if output == saved:
        _check_structure(data, pruned)
    else:  # the other output of the same plan: its weights are a subset of the saved ones (same names)
        state = {k: v for k, v in state.items() if k in pruned.state_dict()}
    _check_weights(state, pruned)
    pruned.load_state_dict(state, strict=True)
    pruned.train(data["training"])
    return pruned


def _read(path) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"no such file: '{path}'")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PlanError(f"'{path}' is not an fxprune save file (or is damaged): {type(exc).__name__}: "
                        f"{str(exc)[:300]}. Write one with fxprune.save(pruned, path).") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PlanError(f"'{path}' is not an fxprune save file (format {found!r}, expected {FORMAT!r}). "
                        "Write one with fxprune.save(pruned, path).")
    return data


def _check_inputs(data, example_inputs) -> None:
    shapes = data["input_shapes"]
    optional = data.get("input_optional") or [False] * len(shapes)
    required = max((i + 1 for i, opt in enumerate(optional) if not opt), default=0)   # the trailing ones may go
    if not required <= len(example_inputs) <= len(shapes):
        need = f"{required} to {len(shapes)}" if required < len(shapes) else f"{len(shapes)}"
        raise PlanError(f"the model was saved with {need} inputs, {len(example_inputs)} given")
    for i, (saved, x) in enumerate(zip(shapes, example_inputs)):
        if saved is None or not isinstance(x, torch.Tensor):
            continue
        if len(saved) != x.dim() or list(x.shape[1:]) != saved[1:]:
            raise PlanError(f"input {i} has shape {tuple(x.shape)} but the model was pruned with "
                            f"{tuple(saved)}: pass example inputs of that shape (any batch size)")


def _check_structure(data, pruned) -> None:
    saved, now = data["structure"], structure(pruned)
    if saved == now:
        return
    for i, (a, b) in enumerate(zip(saved, now)):
        if a != b:
            where = f"node {i}: saved `{a[:200]}`, rebuilt `{b[:200]}`"
            break
    else:
        where = f"the saved graph has {len(saved)} nodes, the rebuilt one {len(now)}"
    raise PlanError("the model from model_factory is not the architecture that was saved: " + where +
                    f". Pass the factory of the original model (saved with torch {data.get('torch_version')}).")


def _check_weights(state, pruned) -> None:
    expected = pruned.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise PlanError(f"the saved weights do not fit the rebuilt model: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}. Was the file saved from this architecture?")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
            raise PlanError(f"weight '{k}' is {tuple(state[k].shape)} {state[k].dtype} in the file but "
                            f"{tuple(v.shape)} {v.dtype} in the rebuilt model. Was the file saved from this architecture?")
