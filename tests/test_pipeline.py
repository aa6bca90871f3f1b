"""One orchestrator: every route to a pruned model carries the same report, counted the same way,
and ``fxprune.report`` / ``fxprune.save`` / ``fxprune.load`` accept each result."""
from __future__ import annotations

import warnings

import pytest
import torch

import fxprune
from fxprune.cost import graph_flops
from fxprune.passes import catro, oicsr
from fxprune.verify import random_inputs
from digits import SmallResNet

X = torch.randn(1, 1, 8, 8)


def model():
    torch.manual_seed(0)
    return SmallResNet(8).eval()


def routes():
    """(route name, pruned module) for every way fxprune makes one."""
    net = model()
    data = (torch.randn(60, 1, 8, 8), torch.arange(60) % 10)
    out = {"compile": fxprune.compile(net, (X,), method="l2", flops=0.6, onnx=False)}
    out["apply"] = fxprune.apply(net, (X,), fxprune.report(out["compile"]).plan, onnx=False)
    out["catro"] = fxprune.compile(net, (X,), method="catro", data=data, ratio=0.5, onnx=False,
                                   method_options={"progress": False})
    out["catro sub-task"] = catro.subtask(net, (X,), [1, 3, 5], data, ratio=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["oicsr greedy"] = oicsr.prune(net, (X,), flops=0.6, step=0.2, cap=0.5, residual=True,
                                          retrain=lambda m: None)
        out["latency search"] = fxprune.compile(net, (X,), method="l2", latency=0.9, onnx=False,
                                                latency_model=False,   # the FLOPs search (CURL's and CATRO's)
                                                latency_options={"steps": 1, "repeats": 4, "warmup": 1, "rounds": 1})
    return net, out


@pytest.fixture(scope="module")
def results():
    return routes()


@pytest.mark.parametrize("route", ["compile", "apply", "catro", "catro sub-task", "oicsr greedy", "latency search"])
def test_every_route_reports_and_saves_alike(results, route, tmp_path):
    net, out = results
    pruned = out[route]
    rep = fxprune.report(pruned)
    base = fxprune.report(out["compile"])
    # counted the same way: the original's figures agree, the pruned model's FLOPs are graph_flops of it
    assert (rep.params_before, rep.flops_before) == (base.params_before, base.flops_before)
    assert rep.flops_after == graph_flops(pruned, (X,)) < rep.flops_before
    assert rep.params_after == sum(p.numel() for p in pruned.parameters()) < rep.params_before
    assert rep.capture["tracer"] == "fx" and rep.mask is not None and rep.mask["ok"]
    assert rep.plan.removed > 0
    if route in ("catro sub-task", "oicsr greedy"):  # their own entry points check ONNX Runtime by default
        assert rep.onnx["ok"] and rep.verified
    path = str(tmp_path / "p.pt")
    fxprune.save(pruned, path)
    if route == "catro sub-task":  # the sub-task plan shrinks the pinned classifier: rebuilt by subtask only
        return
    loaded = fxprune.load(path, model, (X,))
    x = random_inputs((X,), seed=3)[0]
    torch.testing.assert_close(loaded(x), pruned(x))


def test_the_latency_search_is_recorded_in_the_report(results):
    rep = fxprune.report(results[1]["latency search"])
    assert len(rep.search) == 1 and rep.search[0]["flops"] == pytest.approx(0.9)
    assert rep.plan.meta["latency"] == 0.9 and "latency_ratio" in rep.plan.meta
    assert rep.plan.meta["ranking"] == "importance" and "flops_budget" in rep.plan.meta


def test_oicsr_report_merges_the_rounds(results):
    rep = fxprune.report(results[1]["oicsr greedy"])
    assert rep.mask["rounds"] >= 1 and rep.method == "oicsr"
    assert rep.flops_after <= 0.6 * rep.flops_before + 1e-6 * rep.flops_before


def test_one_budget_search_serves_every_planner():
    """make_plan, CURL's raw ranking and CATRO's greedy order all meet a FLOPs budget through plan.search."""
    net = model()
    graph = fxprune.analyze(net, (X,))
    from fxprune.passes import curl, magnitude
    from fxprune.plan import Budget
    from fxprune.cost import CostModel

    cost = CostModel(graph)
    scores = magnitude.l2(graph)
    for plan in (fxprune.make_plan(graph, scores, flops=0.5),
                 curl.select(graph, scores, flops=0.5, min_keep_frac=0.1)):
        assert cost.flops(plan.mask(graph).numpy()) <= 0.5 * cost.base_flops
    # the floor is written once: a group keeps ceil(floor * size) channels, its pins, and at least one
    g = next(g for g in graph.prunable_groups())
    assert Budget(flops=0.5, floor=0.4).min_kept(g) == max(1, -(-4 * g.size // 10), int(g.pinned.sum()))
    with pytest.raises(fxprune.ConfigError, match="exactly one budget"):
        Budget(flops=0.5, ratio=0.5)


def test_a_rounding_step_past_the_budget_is_given_back_to_the_other_groups():
    """The step that meets ``flops=0.5`` moves group '0' from 16 to 8 channels (its rounding knows no
    count between) and leaves 0.29 of the FLOPs; the search gives group '2' back its most important
    channels while the budget holds: 15 of them, 0.48 of the FLOPs."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
    graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    from fxprune.cost import CostModel
    scores = {"0": torch.ones(16), "2": torch.arange(1.0, 17.0)}
    to_8_or_16 = lambda name, n: (8 if n <= 8 else 16) if name == "0" else n   # noqa: E731
    plan = fxprune.make_plan(graph, scores, flops=0.5, round_to=to_8_or_16)
    assert len(plan.keep["0"]) == 8 and plan.keep["2"] == list(range(1, 16))   # the least important went
    cost = CostModel(graph)
    kept = cost.flops(plan.mask(graph).numpy()) / cost.base_flops
    assert 0.47 < kept <= 0.5


def test_an_onnx_failure_of_the_unpruned_model_too_is_reported_not_raised(monkeypatch):
    """When the pruned model's ONNX file fails, the unpruned model is tried: failing too, it is the
    exporter's limit (the model comes back, checked by mask-equivalence, with a warning); passing, the
    pruned model's failure is fxprune's, and it raises."""
    import fxprune.pipeline as pipeline
    net = model()
    n_params = sum(p.numel() for p in net.parameters())

    def fails_for(which):
        def export(module, inputs, *a, **k):
            pruned = sum(p.numel() for p in module.parameters()) < n_params
            if which == "both" or pruned:
                raise RuntimeError("Nodes in a graph must be topologically sorted")
            return {"ok": True}
        return export

    monkeypatch.setattr(pipeline, "export_onnx", fails_for("both"))
    with pytest.warns(UserWarning, match="and so does the unpruned model's"):
        pruned = fxprune.compile(net, (X,), method="l2", ratio=0.5)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] is None and rep.onnx["unpruned_fails"] and not rep.verified
    assert "not checkable" in str(rep)
    with torch.no_grad():
        assert pruned(X).shape == (1, 10)

    monkeypatch.setattr(pipeline, "export_onnx", fails_for("pruned"))
    with pytest.raises(fxprune.VerificationError, match="the unpruned model's passes"):
        fxprune.compile(net, (X,), method="l2", ratio=0.5)


def test_an_op_the_onnx_exporter_cannot_convert_is_reported_not_raised():
    """``torch.onnx`` has no conversion for ``cummax``: the pruned model's export fails, and so does the
    unpruned model's (Mixtral's expert routing fails the same way), so the model comes back checked by
    mask-equivalence with a warning, not an ``ExportError``."""

    class Cummax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x + torch.cummax(x, 3).values)))

    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="and so does the unpruned model's"):
        pruned = fxprune.compile(Cummax().eval(), (x,), method="l2", ratio=0.5, round_to=None)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] is None and "ONNX export failed" in rep.onnx["error"]
    assert pruned.get_submodule("a").out_channels == 8
    with pytest.raises(fxprune.ExportError):
        fxprune.export_onnx(pruned, (x,))


def test_export_onnx_leaves_the_model_as_it_was():
    """The ONNX check runs on the model itself (no copy of its weights), in eval mode: afterwards its
    ``training`` flags, its tensors (BatchNorm's running statistics too) and its hooks are as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxprune.export_onnx(model, (torch.randn(2, 3, 8, 8),))
    assert result["ok"] and result["batches"] == [1, 3]
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_batch_the_exporter_writes_inside_the_graph_is_checked_at_the_example_batch(monkeypatch):
    """The exporter can leave the input's batch symbolic and still write the example's batch into a reshape
    inside (timm's LeViT with one query dim per head: ONNX Runtime "cannot reshape {3,196,128} to
    {196,128}"). The check then exports at the example batch and checks there, instead of failing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fxprune.io import onnx as onnx_io

    real = onnx_io.write_onnx

    def batch_inside(module, example_inputs, path, *, dynamic_batch=True):
        if not dynamic_batch:
            return real(module, example_inputs, path, dynamic_batch=False)
        shape = numpy_helper.from_array(torch.tensor([1, 4]).numpy(), "shape")
        graph = helper.make_graph([helper.make_node("Reshape", ["input_0", "shape"], ["out"])], "g",
                                  [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, ["batch", 4])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], [shape])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return False

    monkeypatch.setattr(onnx_io, "write_onnx", batch_inside)
    result = onnx_io.export_onnx(torch.nn.Flatten(), (torch.randn(1, 4),))
    assert result["ok"] and result["dynamic_batch"] is False and result["batches"] == ["example"]


class Cancelling(torch.nn.Module):  # large activations summed into a small output: float32 rounding shows
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 8, bias=False)
        self.b = torch.nn.Linear(64, 8, bias=False)
        with torch.no_grad():
            self.a.weight.mul_(1e4)
            self.b.weight.copy_(self.a.weight + torch.randn_like(self.a.weight))

    def forward(self, x):
        return self.a(x) - self.b(x)


@pytest.mark.parametrize("off", [0.0, 0.5])
def test_onnx_runtime_as_near_the_float64_result_as_torch_agrees(monkeypatch, off):
    """Where ONNX Runtime misses torch's float32 output, a float64 run decides: ORT as near it as torch's own
    float32 run is agrees (the runtimes round the model's large activations differently); an ORT output that is
    far from it (``off``: half the output's scale) does not."""
    import onnxruntime

    torch.manual_seed(0)
    model = Cancelling().eval()
    exact = Cancelling().eval()
    exact.load_state_dict(model.state_dict())
    exact.double()

    def run(self, names, feed):   # ONNX Runtime giving the float64 result (plus ``off``)
        x = torch.from_numpy(next(iter(feed.values()))).double()
        with torch.no_grad():
            y = exact(x)
        return [(y + off * y.abs().max()).float().numpy()]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)
    x = torch.randn(2, 64)
    with torch.no_grad():
        rounding = float((model(x).double() - exact(x.double())).abs().max() / exact(x.double()).abs().max())
    assert rounding > 1e-4   # torch's float32 run alone misses the tolerance against the exact result
    result = fxprune.export_onnx(model, (x,), check=False)
    assert result["max_rel_diff"] > 1e-4 and result["ok"] == (off == 0.0), result
    if off == 0.0:
        assert result["float64"]["ort_rel_diff"] < 1e-6 < result["float64"]["torch_rel_diff"]
