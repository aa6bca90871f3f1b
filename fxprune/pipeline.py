"""The one orchestrator: every route to a pruned model runs the same stages and ends in the same report.

    capture → couple → score → plan → rewrite → verify → report

:class:`Pipeline` holds one model and its example inputs. :meth:`~Pipeline.analyze`
captures and couples it (once); :meth:`~Pipeline.planner` turns a method into a function
from a budget to a :class:`~fxprune.plan.Plan` (a criterion's scores planned by
:func:`~fxprune.plan.make_plan`, or a method that plans itself, such as CURL and CATRO);
:meth:`~Pipeline.build` rewrites, verifies and attaches the :class:`~fxprune.view.report.Report`;
:meth:`~Pipeline.finish` attaches the report to a module made elsewhere (OICSR's greedy
loop retrains between its cuts). :func:`fxprune.compile`, :func:`fxprune.apply`, the
latency search, OICSR's loop, CATRO's sub-task mode, ``fxprune.load`` and the CLI all go
through it, so every result is counted the same way and accepted by
:func:`fxprune.report` and :func:`fxprune.save`.

Stage contracts:

=========  ====================================================  ==========================================
stage      requires                                              ensures
=========  ====================================================  ==========================================
capture    an ``nn.Module`` and inputs it runs on                a ``GraphModule`` sharing the model's
                                                                 parameters, ``tensor_meta``/``value``/
                                                                 ``flops`` on every node; the model unchanged
couple     a captured graph and its rule table                   a ``ChannelGraph``: every parameter slice
                                                                 in at most one group per dim, pins with reasons
plan       a ``ChannelGraph``, scores or a planner, one budget    a ``Plan`` that keeps every pinned channel
                                                                 and at least one channel of every value
rewrite    a ``ChannelGraph`` and a ``Plan`` made for it           a new ``GraphModule``; the analysed module
                                                                 and the user's model unchanged
verify     the original, the plan, the pruned module              mask-equivalence node by node (and ONNX
                                                                 Runtime agreement), else ``VerificationError``
=========  ====================================================  ==========================================

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import magnitude
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> pipe = Pipeline(net, (torch.randn(1, 3, 8, 8),), onnx=False)
    >>> plan = pipe.planner(magnitude.l2, "l2")(ratio=0.5)
    >>> small = pipe.build(plan, method="l2")
    >>> fxprune.report(small).params_after, small.get_submodule("0").out_channels
    (132, 4)
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
import torch.fx as fx

from .capture import capture_model
from .cost import CostModel, count_params, graph_flops
from .cost.latency_table import FAST_UNDER, FastCounts, LatencyError, LatencyModel, nchwc_block
from .couple import BLOCK, couple
from .errors import ConfigError, DataError, ExportError, FxPruneError, VerificationError
from .io.onnx import export_onnx
from .ir import ChannelGraph
from .ops import FX_RULES
from .plan import Plan, make_plan
from .plan.budget import DEFAULT, default_round_to, is_default
from .rewrite import pin_literals, rewrite, rewrite_module
from .rewrite.graph import weight_gathers
from .utils import as_tuple, paused_gc
from .verify import check_mask, mask_equivalence, random_inputs
from .verify.mask import check_module, module_equivalence
from .view.report import Report


class Pipeline:
    """The stages of fxprune over one model; see the module docstring.

    ``capture`` picks the tracer (``"auto"``: ``symbolic_trace``, else ``torch.export``; ``"fx"``;
    ``"export"``; see :func:`fxprune.capture.capture_model`); ``leaf_modules`` and
    ``concrete_args`` go to ``symbolic_trace``; ``verify`` runs
    mask-equivalence on every result, and ``onnx`` (with ``verify``) the ONNX Runtime check.
    ``output`` is what :meth:`build` returns by default: ``"graph"`` (a ``GraphModule``) or
    ``"module"`` (a pruned copy of the model, same class, from either capture: :mod:`fxprune.rewrite.module`;
    channels counted by literals of the model's code are then pinned before planning).
    ``heads`` is what attention heads prune: ``"dims"`` (each head's dims, the same count per head)
    or ``"whole"`` heads, and ``groups`` what a grouped conv loses (``"balanced"`` counts, ``"whole"``
    groups, or ``"blocked"``: whole where ORT runs them blocked; see :func:`fxprune.couple.couple`); a plan
    records both. ``block`` is ORT's NCHWc block that ``"blocked"`` means (default: this machine's,
    :func:`~fxprune.cost.latency_table.nchwc_block`, or 16 where ORT blocks nothing; a plan records it).
    """

    def __init__(self, model: torch.nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None,
                 verify: bool = True, onnx: bool = True, capture: str = "auto", output: str = "graph",
                 heads: str = "dims", groups: str = "balanced", block: int | None = None):
        if output not in ("graph", "module"):
            raise ConfigError(f"output must be 'graph' or 'module', not {output!r}")
        self.output = output
        self.model = model
        self.example_inputs = as_tuple(example_inputs)
        self.leaf_modules = leaf_modules
        self.concrete_args = concrete_args
        self.verify = verify
        self.onnx = onnx
        self.capture = capture
        self.heads = heads
        self.groups = groups
        self.block = block
        self.table = FX_RULES  # the capture replaces it with its dialect's table
        self._graph: ChannelGraph | None = None

    # -- capture and couple
    @property
    def graph(self) -> ChannelGraph:
        """The model's :class:`~fxprune.ir.ChannelGraph` (analysed on first use)."""
        if self._graph is None:
            self._graph = self.analyze()
        return self._graph

    @paused_gc
    def analyze(self) -> ChannelGraph:
        """Capture a copy-free graph of the model and find its channel groups."""
        t0 = time.perf_counter()
        gm, self.table, info = capture_model(self.model, self.example_inputs, self.capture,
                                             leaf_modules=self.leaf_modules, concrete_args=self.concrete_args,
                                             stack_traces=self.output == "module")
        t1 = time.perf_counter()
        try:
            if self.block is None:
                self.block = nchwc_block() or BLOCK
            graph = couple(gm, self.example_inputs, self.table, heads=self.heads, groups=self.groups,
                           block=self.block)
        except FxPruneError:
            raise
        except Exception as exc:  # the rules' own failures become pins; this is the analysis itself
            raise FxPruneError(f"the coupling analysis failed: {type(exc).__name__}: {exc}. This is a bug in fxprune: "
                               "please report it with the model.") from exc
        graph.source_names = {id(m): name for name, m in self.model.named_modules()}
        graph.capture = info
        graph.timings = {"trace": t1 - t0, "couple": time.perf_counter() - t1}
        if self.output == "module":  # a module copy cannot rewrite the literals of the model's code
            t2 = time.perf_counter()
            pin_literals(graph, self.model)
            graph.timings["pin literals"] = time.perf_counter() - t2
        self._graph = graph
        return graph

    # -- score and plan
    def rounding(self, round_to=DEFAULT, latency_model=None, *, strict: bool = False):
        """``(round_to, latency_model)`` for plans on this model: :func:`resolve_rounding` on its graph.

            >>> import torch
            >>> pipe = Pipeline(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), (torch.randn(1, 4),))
            >>> pipe.rounding(8)
            (8, None)
        """
        return resolve_rounding(self.graph, round_to, latency_model, strict=strict, stacklevel=4)

    def planner(self, criterion, name: str | None = None, *, data=None, seed: int = 0, method_options=None,
                ignore=(), min_keep: int = 1, floor: float = 0.0, round_to=None, meta=None, latency_model=None,
                ranking: str | None = None):
        """A function ``(ratio=, flops=, params=, latency=) -> Plan`` for ``criterion`` on this model.

        A criterion with a ``plan`` attribute chooses its own channels under the budget
        (CURL, CATRO): ``criterion.plan(graph, data=, seed=, ratio=, flops=, params=, round_to=,
        min_keep=, floor=, ignore=, meta=, **method_options)``, ``round_to="fast"`` passed as a
        :class:`~fxprune.cost.latency_table.FastCounts` of ``latency_model``. Any other criterion is called
        once, ``criterion(graph, data=, seed=, **method_options)``, and its scores are planned
        by :func:`~fxprune.plan.make_plan` for every budget asked (``latency=`` and
        ``round_to="fast"`` with ``latency_model``, a :class:`~fxprune.cost.latency_table.LatencyModel`;
        ``ranking`` says how channels are ranked, None: :func:`~fxprune.plan.budget.default_ranking`, and
        importance for a training-time method's cut).
        """
        if not callable(criterion):
            raise ConfigError(f"method must be a registered name or a callable, not {type(criterion).__name__}")
        name = name or getattr(criterion, "__name__", "custom")
        meta = {"method": name, **({"heads": self.heads} if self.heads != "dims" else {}),
                **({"groups": self.groups} if self.groups != "balanced" else {}),
                **({"block": self.block} if self.groups == "blocked" else {}), **(meta or {})}
        options = dict(method_options or {})
        graph = self.graph
        common = dict(round_to=round_to, min_keep=min_keep, floor=floor, ignore=ignore, meta=meta)
        own = getattr(criterion, "plan", None)
        relaxed = getattr(criterion, "relaxed_fast_counts", False)
        if round_to == "fast" and (callable(own) or relaxed):
            # as make_plan does: the latency model built here when not given; a criterion whose cut takes the
            # channels its training schedule drove to zero rounds as that schedule did (resolve_rounding)
            fast = FastCounts(latency_model or LatencyModel(graph))
            common["round_to"] = fast.relaxed() if relaxed else fast
        if relaxed and ranking is None:   # the cut takes what the method's schedule chose, ranked by importance
            ranking = "importance"
        if callable(own):

            def plan(ratio=None, flops=None, params=None, latency=None) -> Plan:
                if latency is not None:
                    raise ConfigError(f"method '{name}' chooses its own channels: it takes no latency= budget "
                                      "here (fxprune.compile fits its FLOPs budget to a latency)")
                t0 = time.perf_counter()
                with _method_errors(name, graph, data):
                    result = own(graph, data=data, seed=seed, ratio=ratio, flops=flops, params=params, **common,
                                 **options)
                graph.timings["score + plan"] = time.perf_counter() - t0
                return result
            return plan
        scores = None

        def plan(ratio=None, flops=None, params=None, latency=None) -> Plan:
            nonlocal scores
            t0 = time.perf_counter()
            if scores is None:
                with _method_errors(name, graph, data):
                    scores = criterion(graph, data=data, seed=seed, **options)
                graph.timings["score"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = make_plan(graph, scores, ratio=ratio, flops=flops, params=params, latency=latency,
                               latency_model=latency_model, ranking=ranking, **common)
            graph.timings["plan"] = time.perf_counter() - t1
            return result

        def scored() -> dict:   # the scores every plan is made from (computed by the first plan)
            return scores

        plan.scores = scored
        return plan

    # -- rewrite, verify, report
    def build(self, plan: Plan, *, method: str | None = None, search=None, output: str | None = None,
              onnx: bool | None = None):
        """The pruned model of ``plan`` on this model, verified, with its report attached: a
        ``GraphModule``, or with ``output="module"`` (default: the pipeline's ``output``) a pruned
        copy of the model, checked against the ``GraphModule`` at its outputs and every module
        (``onnx`` overrides the pipeline's ONNX Runtime check for this result)."""
        output = output or self.output
        if output not in ("graph", "module"):
            raise ConfigError(f"output must be 'graph' or 'module', not {output!r}")
        graph = self.graph
        keep = plan.mask(graph)
        t0 = time.perf_counter()
        pruned = rewrite(graph, plan)
        rewrite_s = time.perf_counter() - t0
        gathered = weight_gathers(pruned)
        if gathered:
            layers = ("1 layer computes its weight" if len(gathered) == 1
                      else f"{len(gathered)} layers compute their weights")
            warnings.warn(f"{layers} at run time (standardised or normalised: timm's StdConv2d, weight_norm; first: "
                          f"'{gathered[0]}'): the pruned graph reads such a weight at the kept channels where the "
                          "parameters it is computed from cannot be sliced (the input columns of a weight standardised "
                          "row by row: its statistics span them), so FLOPs drop, but those parameters keep that part "
                          "of their size", stacklevel=3)
        mask_result = None
        if self.verify:
            t0 = time.perf_counter()
            try:
                mask_result = mask_equivalence(graph, keep, pruned, random_inputs(self.example_inputs, seed=0))
            except FxPruneError:
                raise
            except Exception as exc:
                raise VerificationError(f"mask-equivalence could not compare the pruned model with the original: "
                                        f"{type(exc).__name__}: {exc}") from exc
            graph.timings["verify: mask"] = time.perf_counter() - t0
            check_mask(mask_result)
        if output == "module":
            return self._build_module(plan, pruned, method=method, mask=mask_result, keep=keep, search=search,
                                      rewrite_s=rewrite_s, onnx=onnx)
        return self.finish(pruned, plan, method=method, mask=mask_result, keep=keep, search=search,
                           timings={"rewrite": rewrite_s}, onnx=onnx)

    def _build_module(self, plan, pruned_graph, *, method, mask, keep, search, rewrite_s, onnx=None):
        """``output="module"``: the model's pruned copy, compared with ``pruned_graph`` when verifying."""
        graph = self.graph
        t0 = time.perf_counter()
        copy = rewrite_module(graph, plan, self.model)
        times = {"rewrite": rewrite_s, "rewrite: module": time.perf_counter() - t0}
        if self.verify:
            t0 = time.perf_counter()
            mask["module"] = module_equivalence(copy, pruned_graph, random_inputs(self.example_inputs, seed=1))
            times["verify: module"] = time.perf_counter() - t0
            check_module(mask["module"])
        return self.finish(copy, plan, method=method, mask=mask, keep=keep, search=search, timings=times,
                           graph_module=pruned_graph, onnx=onnx)

    def apply(self, plan: Plan, output: str | None = None):
        """:meth:`build` for a plan made earlier (its method, ``heads``, ``groups`` and ``block`` are read from
        the plan)."""
        recorded = {"heads": plan.meta.get("heads", "dims"), "groups": plan.meta.get("groups", "balanced")}
        if recorded["groups"] == "blocked":   # plans made before the block was recorded: 16
            recorded["block"] = plan.meta.get("block", BLOCK)
        for option, made in recorded.items():
            if made != getattr(self, option):
                if self._graph is not None:
                    raise ConfigError(f"the plan was made with {option}={made!r}, this pipeline analysed "
                                      f"{option}={getattr(self, option)!r}")
                setattr(self, option, made)
        return self.build(plan, method=plan.meta.get("method", "plan"), output=output)

    def _onnx_fails_unpruned(self, exc: Exception) -> dict:
        """The pruned model's ONNX file failed to export, load or check: when the unpruned model's fails too,
        that is the exporter's or ONNX Runtime's limit, not the rewrite's (mask-equivalence, which passed,
        is the proof of the rewrite): warn and record it. Else raise :class:`VerificationError`."""
        error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        try:
            export_onnx(self.model, self.example_inputs)
        except Exception as again:  # the same limit on the model as the user gave it
            warnings.warn(f"ONNX Runtime check skipped: the pruned model's ONNX file fails ({error.splitlines()[0]}), "
                          f"and so does the unpruned model's ({type(again).__name__}: {str(again).strip().splitlines()[0][:200]}): "
                          "a limit of torch.onnx or ONNX Runtime on this model, not of the rewrite. The model is "
                          "checked by mask-equivalence only; pass onnx=False to skip the ONNX check.", stacklevel=3)
            return {"ok": None, "error": error, "unpruned_fails": True}
        raise VerificationError(f"the ONNX file of the pruned model failed to load or check (the unpruned model's "
                                f"passes): {error}") from exc

    def finish(self, pruned: torch.nn.Module, plan: Plan, *, method: str | None = None, mask: dict | None = None,
               keep: torch.Tensor | None = None, search=None, timings=None, graph_module=None,
               onnx: bool | None = None) -> torch.nn.Module:
        """Check ``pruned`` in ONNX Runtime (with ``verify`` and ``onnx``) and attach its :class:`Report`.

        ``plan`` is on this pipeline's model; ``mask`` the mask-equivalence figures, when
        they were taken (a module retrained after its cut has none against the original).
        A ``GraphModule`` carries the report in ``meta["fxprune_report"]``, any other module
        in its ``fxprune_report`` attribute; its FLOPs are counted on ``graph_module`` (the
        same function as a ``GraphModule``) when given.
        """
        graph = self.graph
        keep = plan.mask(graph) if keep is None else keep
        times = {k: v for k, v in graph.timings.items() if not k.startswith("verify")}
        times.update(timings or {})
        if mask is not None and "verify: mask" in graph.timings:
            times["verify: mask"] = graph.timings["verify: mask"]
        onnx_result = None
        if self.verify and (self.onnx if onnx is None else onnx):
            t0 = time.perf_counter()
            try:
                onnx_result = export_onnx(pruned, self.example_inputs)
            except ExportError as exc:  # the exporter cannot write it (Mixtral's expert routing)
                onnx_result = self._onnx_fails_unpruned(exc)
            except FxPruneError:
                raise
            except Exception as exc:  # the checker or ONNX Runtime rejecting the file
                onnx_result = self._onnx_fails_unpruned(exc)
            times["verify: onnx"] = time.perf_counter() - t0
        cost = CostModel(graph)
        groups = list(graph.groups.values())
        pinned = [g for g in groups if g.prunable == 0]
        first_pin = next((str(g.pins[0]) for g in pinned if g.pins), None)
        rep = Report(
            method=method or plan.meta.get("method", "plan"), plan=plan, params_before=count_params(self.model),
            params_after=count_params(pruned), flops_before=int(cost.base_flops),
            flops_after=graph_flops(pruned if graph_module is None else graph_module, self.example_inputs),
            flops_predicted=cost.flops(keep.numpy()),
            groups=len(groups), prunable_groups=len(groups) - len(pinned), pinned_groups=len(pinned),
            first_pin=first_pin, mask=mask, onnx=onnx_result, timings=times, capture=dict(graph.capture),
            search=search)
        if isinstance(pruned, fx.GraphModule):
            pruned.meta["fxprune_report"] = rep
        else:  # the user's own class: an attribute (kept by torch.save and copy.deepcopy)
            rep.output = "module"
            rep.signature = {"input_shapes": [list(x.shape) if isinstance(x, torch.Tensor) else None
                                              for x in self.example_inputs],
                             "input_dtypes": [str(x.dtype) if isinstance(x, torch.Tensor) else None
                                              for x in self.example_inputs],
                             "traced_training": bool(graph.module.meta.get("fxprune_training", self.model.training))}
            pruned.fxprune_report = rep
        return pruned


@contextmanager
def _method_errors(name: str, graph: ChannelGraph, data):
    """A criterion's own failure as a :class:`~fxprune.errors.DataError` that says what to check."""
    try:
        yield
    except FxPruneError:
        raise
    except Exception as exc:
        hint = ""
        if data is not None and graph.capture.get("batch") == "fixed":
            hint = (" The model was captured by torch.export at the example's batch size only (it could not keep "
                    "the batch symbolic), and data-driven methods run other batch sizes: use a data-free method "
                    "(l1, l2, bn, random), or make the model's forward batch-independent.")
        raise DataError(f"method '{name}' failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}."
                        f"{hint}") from exc


def warn_if_relaxed(plan: Plan, by_default: bool) -> None:
    """Warn when the default fast counts could not reach the plan's budget and it was met with their relaxed
    form (``plan.meta["missed_fast"]``, ``plan.meta["round_to"]`` :data:`~fxprune.cost.latency_table.FAST_UNDER`):
    the user did not ask for those counts."""
    if by_default and plan.meta.get("missed_fast") and plan.meta.get("round_to") == FAST_UNDER:
        warnings.warn("the fast channel counts (round_to=\"fast\", the default) cannot reach this budget on this "
                      "model: groups below their first fast count keep what the budget needs (ORT pads them "
                      "to it); pass round_to= to choose", stacklevel=3)


def resolve_rounding(graph, round_to=DEFAULT, latency_model=None, *, strict: bool = False, relaxed: bool = False,
                     stacklevel: int = 3):
    """``(round_to, latency_model)`` for plans on ``graph``, as :func:`fxprune.compile` makes them.

    ``round_to=DEFAULT`` (not given) becomes :func:`~fxprune.plan.budget.default_round_to`'s choice;
    ``"fast"`` (and ``latency_model=True``) builds the :class:`~fxprune.cost.latency_table.LatencyModel`
    unless one is given. When it cannot be built, a default ``"fast"`` falls back to unrounded counts with a
    warning, unless ``strict`` (a latency budget needs the model) or ``"fast"`` was asked for. Whatever
    schedules channels for a later ``compile`` (the training-time regularizers, GSM) rounds the same way, so
    that the channels it drives to zero are the ones ``compile`` cuts: ``relaxed`` gives the fast counts as
    :meth:`~fxprune.cost.latency_table.FastCounts.relaxed` from the start, as ``compile`` plans the cut of a
    criterion marked ``relaxed_fast_counts`` (on the strict counts, a schedule over some groups and a cut over
    all of them can settle on different steps: the cut then takes channels the schedule left whole).

        >>> import torch, fxprune
        >>> graph = fxprune.analyze(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), (torch.randn(1, 4),))
        >>> resolve_rounding(graph, None), resolve_rounding(graph, 8)
        ((None, None), (8, None))
    """
    by_default = is_default(round_to)
    if by_default:
        round_to = default_round_to(graph)
    if latency_model is True or (round_to == "fast" and latency_model is None):
        try:
            latency_model = LatencyModel(graph)
        except LatencyError as exc:
            if strict or not by_default:
                raise
            warnings.warn(f"channel counts not rounded for ONNX Runtime (no latency model: {exc}); "
                          "pass round_to= to choose", stacklevel=stacklevel)
            latency_model, round_to = None, None
    if relaxed and round_to == "fast":
        round_to = FastCounts(latency_model).relaxed()
    return round_to, latency_model
