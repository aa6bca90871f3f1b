"""The command line, run in-process: inspect (table, JSON, graph), prune (--save, --plan, --out, --latency), export."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import fxprune
from digits import SmallResNet
from fxprune.cli import main
from fxprune.view.inspect import group_rows

MODEL = "digits:SmallResNet"
SHAPE = ["--input-shape", "2,1,8,8"]


def wide():
    """A factory for the --latency test: convolutions heavy enough to time."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_table_and_json(capsys):
    code, out, _ = run(capsys, "inspect", MODEL, *SHAPE)
    assert code == 0
    lines = out.splitlines()
    graph = fxprune.analyze(SmallResNet().eval(), (torch.randn(2, 1, 8, 8),))
    rows = group_rows(graph)
    assert lines[0] == repr(graph).splitlines()[0]
    assert [ln.split("|")[1].strip() for ln in lines[3:]] == [r["name"] for r in rows]   # sorted by FLOPs share
    assert "FLOPs share" in lines[1] and "pins" in lines[1]
    code, out, _ = run(capsys, "inspect", MODEL, *SHAPE, "--json")
    data = json.loads(out)
    assert [d["name"] for d in data] == [r["name"] for r in rows]
    fc = next(d for d in data if d["name"] == "fc")
    assert fc["prunable"] == 0 and any("output" in p for p in fc["pins"])
    assert sum(d["size"] for d in data) == graph.num_channels


def test_inspect_graph(capsys, tmp_path):
    dot = str(tmp_path / "g.dot")
    code, out, _ = run(capsys, "inspect", MODEL, *SHAPE, "--graph", dot, "--collapse", "none")
    assert code == 0 and f"wrote {dot}" in out
    text = open(dot).read()
    assert text.startswith("digraph") and 'subgraph "cluster_stage1.0"' in text
    code, _, err = run(capsys, "inspect", MODEL, *SHAPE, "--graph", str(tmp_path / "g.gif"))
    assert code == 2 and ".svg, .png" in err
    if shutil.which("dot"):
        svg = str(tmp_path / "g.svg")
        assert run(capsys, "inspect", MODEL, *SHAPE, "--graph", svg)[0] == 0
        assert "<svg" in open(svg).read()


def test_prune_save_plan_out_then_export(capsys, tmp_path):
    onnx_path, plan_path, saved = (str(tmp_path / n) for n in ("p.onnx", "p.json", "p.pt"))
    code, out, _ = run(capsys, "prune", MODEL, *SHAPE, "--flops", "0.5", "--out", onnx_path, "--plan", plan_path,
                       "--save", saved)
    assert code == 0
    assert "ONNX Runtime checked at batches | 1, 3" in out and "(one file)" in out
    assert sorted(os.listdir(tmp_path)) == ["p.json", "p.onnx", "p.pt"]   # no external-data sidecar
    dim0 = onnx.load(onnx_path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value                         # a symbolic batch
    x = torch.randn(5, 1, 8, 8)                                          # another batch size
    loaded = fxprune.load(saved, SmallResNet, (x,))
    assert fxprune.report(loaded).plan.keep == fxprune.Plan.load(plan_path).keep
    rep = fxprune.report(loaded)
    assert rep.flops_after <= 0.5 * rep.flops_before
    got = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        want = loaded(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
    # export rebuilds from the saved file, and from the plan
    out2 = str(tmp_path / "e.onnx")
    code, out, _ = run(capsys, "export", MODEL, *SHAPE, "--load", saved, "--out", out2)
    assert code == 0 and "| verdict" in out and "ok" in out
    got2 = ort.InferenceSession(out2, providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]
    assert np.abs(got2 - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
    # a saved file given the wrong architecture is refused, with the reason
    code, _, err = run(capsys, "export", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--load", saved,
                       "--out", str(tmp_path / "bad.onnx"))
    assert code == 2 and "fxprune: error:" in err and "pruned with" in err


def test_prune_output_module_save(capsys, tmp_path):
    saved = str(tmp_path / "p.pt")
    code, out, _ = run(capsys, "prune", MODEL, *SHAPE, "--ratio", "0.5", "--output", "module", "--save", saved)
    assert code == 0 and "a pruned copy of the model" in out and "module copy vs pruned graph" in out
    x = torch.randn(3, 1, 8, 8)
    loaded = fxprune.load(saved, SmallResNet, (x,))
    assert type(loaded) is SmallResNet and fxprune.report(loaded).output == "module"
    assert loaded.stage1[0].conv1.out_channels == 8
    with torch.no_grad():
        again = fxprune.apply(SmallResNet().eval(), (x,), fxprune.report(loaded).plan, onnx=False)
        again.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in again.state_dict()})
        assert (again(x) - loaded(x)).abs().max() <= 1e-5
    code, out, _ = run(capsys, "export", MODEL, *SHAPE, "--load", saved, "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and "ok" in out
    # inspect shows the pins of module output: a literal in the model's code, with its line
    code, out, _ = run(capsys, "inspect", "test_module_output:Literal", "--input-shape", "2,3,8,8", "--json",
                       "--output", "module")
    c2 = next(d for d in json.loads(out) if d["name"] == "c2")
    assert code == 0 and c2["prunable"] == 0 and any("test_module_output.py:" in p for p in c2["pins"])


def test_a_torchvision_model_is_built_the_same_every_run():
    """Random weights drawn from seed 0, without touching the caller's random state: the same plan every run."""
    from fxprune.cli import load_model

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = load_model("torchvision:resnet18"), load_model("torchvision:resnet18")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_timm_model_by_name_at_its_native_size(capsys):
    """``timm:<name>``: built with random weights from seed 0 at the input size of its pretrained config
    (mobilevit_xxs: 256x256), pruned and verified; an unknown name is a clear error."""
    pytest.importorskip("timm")
    from fxprune.cli import load_model, native_input_shape

    assert native_input_shape("timm:mobilevit_xxs") == (1, 3, 256, 256)
    assert native_input_shape("timm:vit_tiny_patch16_224") == (1, 3, 224, 224)
    a, b = load_model("timm:resnet10t"), load_model("timm:resnet10t")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    code, out, _ = run(capsys, "prune", "timm:resnet10t", "--input-shape", "1,3,64,64", "--ratio", "0.5",
                       "--round-to", "none")
    assert code == 0 and "mask-equivalence" in out and "ok" in out
    code, _, err = run(capsys, "inspect", "timm:no_such_net")
    assert code == 2 and "timm has no model 'no_such_net'" in err


@pytest.mark.parametrize("ranking, said", [(None, "latency-weighted ranking"), ("importance", "importance ranking"),
                                            ("per-ms", "per ms ranking")])
def test_prune_latency(capsys, ranking, said):
    code, out, _ = run(capsys, "prune", "test_cli:wide", "--input-shape", "1,3,32,32", "--latency", "0.6",
                       "--steps", "1", "--repeats", "8", "--round-to", "8",
                       *(["--latency-ranking", ranking] if ranking else []))
    assert code == 0
    assert "predicted latency budget |" in out and "ONNX Runtime CPU latency:" in out and said in out
    steps = [ln for ln in out.splitlines() if re.match(r"^\|\s+\d+ \|\s+0\.\d+ \|", ln)]
    assert len(steps) == 1 and steps[0].split("|")[2].strip() == "0.6"
    assert "mask-equivalence" in out and "ok" in out


def test_bench_prints_both_latencies_per_batch(capsys, tmp_path):
    saved, plan_path = str(tmp_path / "p.pt"), str(tmp_path / "p.json")
    code, _, _ = run(capsys, "prune", MODEL, *SHAPE, "--flops", "0.5", "--save", saved, "--plan", plan_path)
    assert code == 0
    code, out, _ = run(capsys, "bench", MODEL, *SHAPE, "--load", saved, "--batch", "1", "4", "--threads", "1",
                       "--repeats", "4", "--rounds", "2")
    assert code == 0
    flops = float(re.search(r"FLOPs kept (\d\.\d+)", out).group(1))
    rep = fxprune.report(fxprune.load(saved, SmallResNet, (torch.randn(2, 1, 8, 8),)))
    assert flops == pytest.approx(rep.flops_after / rep.flops_before, abs=1e-3)
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if re.match(r"^\|\s+\d+ \|", ln)]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(1, 1, 4), (4, 1, 4)]   # batch, threads, runs
    for r in rows:
        orig, pruned, ratio = float(r[3]), float(r[5]), float(r[7])
        lo, hi = (float(v) for v in r[8].split("-"))
        assert orig > 0 and pruned > 0 and lo <= ratio <= hi   # the median of the per-round ratios
    code, out2, _ = run(capsys, "bench", MODEL, *SHAPE, "--plan", plan_path, "--repeats", "2", "--rounds", "2")
    assert code == 0 and f"FLOPs kept {flops:.3f}" in out2
    code, _, err = run(capsys, "bench", MODEL, *SHAPE, "--plan", plan_path, "--repeats", "1", "--rounds", "2")
    assert code == 2 and "--repeats 1 must be at least --rounds 2" in err


def test_bad_input_is_a_clear_error(capsys):
    code, _, err = run(capsys, "inspect", "resnet18")
    assert code == 2 and "torchvision:<name>" in err
    code, _, err = run(capsys, "inspect", "torchvision:no_such_net")
    assert code == 2 and "no model 'no_such_net'" in err
    with pytest.raises(SystemExit):
        main(["prune", MODEL, "--flops", "0.5", "--latency", "0.5"])   # one budget only
    with pytest.raises(SystemExit):
        main(["inspect", MODEL, "--collapse", "-1"])
    with pytest.raises(SystemExit):
        main(["prune", MODEL, "--flops", "0.5", "--round-to", "0"])    # fast, none or a positive multiple
