"""Models whose root no tracer captures, pruned part by part (``fxprune.compile`` with
``capture="auto"``, l2, ratio 0.5): which children were pruned, by which tracer, which were left
whole and why, parameters before and after, and the checks (each part: mask-equivalence and ONNX
Runtime; the whole: it runs and returns the model's output structure). Each model runs in its own
process. torchvision's detectors are built with random weights and, for the R-CNN, RetinaNet and
FCOS families, ``min_size=max_size=320`` (one 320x320 image).

    python tools/parts.py                                     # the torchvision detectors
    python tools/parts.py --models ssdlite320_mobilenet_v3_large --out /tmp/parts.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
          "ssdlite320_mobilenet_v3_large", "fcos_resnet50_fpn", "ssd300_vgg16", "maskrcnn_resnet50_fpn",
          "keypointrcnn_resnet50_fpn"]
SIZED = ("fasterrcnn", "retinanet", "fcos", "maskrcnn", "keypointrcnn")  # take min_size/max_size


def worker(name: str) -> dict:
    import torch
    import torchvision

    import fxprune

    torch.manual_seed(0)
    kwargs = dict(min_size=320, max_size=320) if name.startswith(SIZED) else {}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()
    x = [torch.rand(3, 320, 320)]
    t0 = time.perf_counter()
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5)
    rep = fxprune.report(pruned)
    return {"model": name, "s": round(time.perf_counter() - t0, 1), "params_before": rep.params_before,
            "params_after": rep.params_after, "flops_before": rep.flops_before, "flops_after": rep.flops_after,
            "parts_flops": rep.parts_flops,
            "verified": rep.verified,
            "parts": [(p["name"], p["tracer"], bool(p["mask"]["ok"]),
                       None if p["onnx"] is None else p["onnx"].get("ok")) for p in rep.parts],
            "whole": [(w["name"], w["reason"][:160]) for w in rep.whole if w["params"]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "parts.md"))
    p.add_argument("--worker")
    args = p.parse_args(argv)
    if args.worker:
        print("PARTS-ROW " + json.dumps(worker(args.worker)))
        return
    lines = ["| model | parts pruned (tracer) | left whole (with parameters) | params before → after | "
             "parts' FLOPs kept | whole model's FLOPs kept on the example | checks | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True,
                                 timeout=1800, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
            row = next((json.loads(line[10:]) for line in out.stdout.splitlines() if line.startswith("PARTS-ROW ")),
                       None)
            error = None if row else (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        except subprocess.TimeoutExpired:
            row, error = None, "timed out (30 min)"
        if row is None:
            lines.append(f"| {name} | failed: {error} | | | | | | |")
        else:
            parts = ", ".join(f"{n} ({t})" for n, t, _, _ in row["parts"])
            whole = "; ".join(f"{n}: {r}" for n, r in row["whole"]) or "-"
            flops = (f"{row['flops_after'] / row['flops_before']:.1%}" if row["flops_before"] and row["flops_after"]
                     else "-")
            onnx = sum(o is True for *_, o in row["parts"])
            checks = (f"mask {sum(m for _, _, m, _ in row['parts'])}/{len(row['parts'])}, ONNX {onnx}/"
                      f"{len(row['parts'])}, whole {'ok' if row['verified'] else 'NOT verified'}")
            before, after = row["parts_flops"]
            lines.append(f"| {name} | {parts} | {whole} | {row['params_before']:,} → {row['params_after']:,} | "
                         f"{after / before:.1%} | {flops} | {checks} | {row['s']} |")
        print(lines[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    text = "\n".join(lines) + (
        "\n\nl2, ratio 0.5, one 320x320 image, random weights; the budget applies to each part. Parts' FLOPs: "
        "counted on their graphs for their recorded calls. The whole model's FLOPs on the example move with "
        "the number of boxes that pass the thresholds (random weights: more or fewer after pruning), so "
        f"they can exceed 100 %. `python tools/parts.py --models {args.models}` at commit {commit.strip()}.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
