"""``output="module"`` over models of the families catalogue (``tools/families.py``): the user's own class back.

Each model runs in its own subprocess (a wall-clock limit each): ``fxprune.compile(model, args, method="l2",
ratio=0.5, capture="auto", output="module")`` with verification (mask-equivalence of the pruned graph, the copy
against the pruned graph at its outputs and module boundaries, and ONNX Runtime on the copy unless ``--no-onnx``).
A row records the tracer, parameters before and after, the figures of each check, and the channels pinned
because a literal in the model's code counts them (the first such pin's file and line).

Usage::

    python tools/module_sweep.py                                   # the default list; writes tools/results/module_sweep.md
    python tools/module_sweep.py --models hf:BertModel,timm:resnet10t --no-onnx
    python tools/module_sweep.py --models hf:BertModel --update    # re-run some rows of the table, keep the others
    python tools/module_sweep.py --worker hf:BertModel             # one model: prints a JSON line
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # this checkout's fxprune first
import families  # noqa: E402

TABLE = os.path.join(HERE, "results", "module_sweep.md")
DEFAULT = ("ultralytics:yolov8n", "ultralytics:yolo11n", "ultralytics:yolov8n-cls", "ultralytics:yolov8n-seg",
           "ultralytics:yolo11n-pose", "ultralytics:yolo11n-obb", "ultralytics:yolov10n", "ultralytics:yolo26n",
           "hf:BertModel", "hf:DistilBertModel", "hf:LlamaForCausalLM", "hf:MistralForCausalLM", "hf:Qwen2ForCausalLM",
           "hf:GPT2LMHeadModel", "hf:T5EncoderModel", "hf:ViTForImageClassification", "hf:SwinForImageClassification",
           "hf:ConvNextForImageClassification", "hf:Wav2Vec2Model", "timm:resnet10t", "timm:vit_tiny_patch16_224",
           "timm:mobilenetv3_small_050", "timm:efficientvit_m0", "timm:efficientvit_b0", "timm:levit_128s",
           "timm:mobilevit_xxs", "smp:Unet-resnet18", "timm:caformer_s18", "timm:ghostnetv2_100", "timm:convnext_atto")
LITERAL = ("in the model's code", "ends a channel shuffle", "could not be checked for literal sizes", "reads the size")


def worker(name: str, onnx: bool) -> dict:
    import torch

    import fxprune
    from zoo_families import positional

    row = {"model": name}
    model, args, kwargs = families.build(name)
    if kwargs:
        model, args = positional(model, len(args), list(kwargs)), args + tuple(kwargs.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    try:
        pipe = fxprune.Pipeline(model, args, onnx=onnx, output="module")
        from fxprune.passes import magnitude
        copy = pipe.build(pipe.planner(magnitude.l2, "l2")(ratio=0.5), method="l2")
    except Exception as exc:
        row.update(status=type(exc).__name__, error=str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "",
                   wall_s=round(time.perf_counter() - t0, 1))
        return row
    rep = fxprune.report(copy)
    literal = [(g.name, p.reason) for g in pipe.graph.groups.values() for p in g.pins if any(s in p.reason for s in LITERAL)]
    row.update(status="verified", cls=type(copy).__name__, tracer=rep.capture.get("tracer"),
               params_before=rep.params_before, params_after=rep.params_after,
               mask_rel=rep.mask["max_rel_diff"], modules_compared=rep.mask["module"]["modules_compared"],
               module_rel=rep.mask["module"]["max_rel_diff"], onnx_abs=rep.onnx.get("max_abs_diff") if rep.onnx else None,
               literal_groups=len({g for g, _ in literal}), first_literal=literal[0][1][:200] if literal else None,
               input_unchanged=all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()),
               wall_s=round(time.perf_counter() - t0, 1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--update", action="store_true", help="keep the table's rows of the models not run")
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, not a.no_onnx)))
        return
    rows = []
    for name in a.models.split(","):
        cmd = [sys.executable, __file__, "--worker", name] + (["--no-onnx"] if a.no_onnx else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout).stdout.strip().splitlines()
            row = json.loads(out[-1]) if out else {"model": name, "status": "no output"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": f"over {a.timeout:.0f} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| model | status | tracer | params before → after | mask rel | modules compared (rel) | ORT abs | "
             "literal-pinned groups | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "verified":
            lines.append(f"| {r['model']} | {r['status']}: {r.get('error', '')[:120]} | | | | | | | {r.get('wall_s', '')} |")
            continue
        onnx = "—" if r["onnx_abs"] is None else f"{r['onnx_abs']:.1e}"
        lines.append(f"| {r['model']} | verified | {r['tracer']} | {r['params_before']:,} → {r['params_after']:,} | "
                     f"{r['mask_rel']:.1e} | {r['modules_compared']} ({r['module_rel']:.1e}) | {onnx} | "
                     f"{r['literal_groups']} | {r['wall_s']} |")
    if a.update and os.path.exists(TABLE):  # the rows of the models not run now, in their place
        fresh = {line.split(" | ")[0]: line for line in lines[2:]}
        old = [line for line in open(TABLE).read().splitlines() if line.startswith("| ") and not line.startswith("| model |")]
        lines = lines[:2] + [fresh.pop(line.split(" | ")[0], line) for line in old] + list(fresh.values())
    with open(TABLE, "w") as f:
        f.write("# output=\"module\" sweep\n\n`python tools/module_sweep.py` (l2, `ratio=0.5`; rows re-run with "
                "`--models ... --update` as the code changed)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
