"""Per-head dims against whole heads on transformer families (``compile(heads=...)``).

Each model of the catalogue in ``tools/families.py`` is pruned twice with ``l2`` at ``ratio=0.5``,
once with ``heads="dims"`` (the default: every head keeps the same number of dims) and once with
``heads="whole"`` (whole heads, ``head_dim`` kept), each verified by mask-equivalence and in ONNX
Runtime. The table gives parameters after, the groups left unprunable, and which attention
projections lost anything. Rounding is off (``round_to=None``), as in the zoo sweeps.

Run::

    python tools/heads_sweep.py                         # the default list below, ~10 min on 2 cores
    python tools/heads_sweep.py hf:LlamaForCausalLM     # any catalogue names
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULT = [f"hf:{n}" for n in (
    "BertModel", "DistilBertModel", "RobertaModel", "AlbertModel", "DebertaV2Model", "MPNetModel",
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "BloomForCausalLM", "LlamaForCausalLM",
    "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM", "StableLmForCausalLM", "T5EncoderModel",
    "BartModel", "WhisperEncoder", "ViTForImageClassification", "Dinov2Model", "CLIPVisionModel",
    "SiglipVisionModel")] + [f"timm:{n}" for n in (
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "efficientvit_m0",
    "coat_lite_tiny", "pvt_v2_b0")]


def attention_kept(rep, model) -> str:
    """'q 50 %' style: the kept fraction of the first attention projection's output features, if pruned."""
    for name, keep in rep.plan.keep.items():
        if any(k in name for k in ("q_proj", "query", "qkv", "c_attn", "q_lin", ".q")):
            return f"{name.rsplit('.', 1)[-1]} {len(keep)}/{rep.plan.sizes[name]}"
    return "-"


def run(name: str) -> dict:
    import torch

    import families
    import fxprune

    model, args, _ = families.build(name)
    row = {"name": name}
    for heads in ("dims", "whole"):
        t0 = time.perf_counter()
        try:
            pruned = fxprune.compile(model, args, method="l2", ratio=0.5, heads=heads, round_to=None)
            rep = fxprune.report(pruned)
            row[heads] = {"params": [rep.params_before, rep.params_after], "mask": rep.mask["ok"],
                          "onnx": rep.onnx["ok"], "pinned": [rep.pinned_groups, rep.groups],
                          "attention": attention_kept(rep, model), "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as exc:  # reported in the table, the sweep goes on
            row[heads] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        torch.manual_seed(0)
    return row


def table(rows) -> str:
    def cell(r):
        if "error" in r:
            return f"error: {r['error'][:80]}", "", ""
        ok = "ok" if r["mask"] and r["onnx"] else "NOT verified"
        return f"{r['params'][1]:,}", f"{r['pinned'][0]}/{r['pinned'][1]}", f"{r['attention']} ({ok})"
    lines = ["| model | params | dims: after | pinned groups | attention kept | whole: after | pinned groups | "
             "attention kept |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        before = next((r["params"][0] for r in (row["dims"], row["whole"]) if "params" in r), "")
        lines.append(f"| {row['name']} | {before:,} | " + " | ".join(cell(row["dims"])) + " | "
                     + " | ".join(cell(row["whole"])) + " |")
    verified = {h: sum(1 for r in rows if r[h].get("mask") and r[h].get("onnx")) for h in ("dims", "whole")}
    smaller = sum(1 for r in rows if "params" in r["dims"] and "params" in r["whole"]
                  and r["whole"]["params"][1] < r["dims"]["params"][1])
    larger = sum(1 for r in rows if "params" in r["dims"] and "params" in r["whole"]
                 and r["whole"]["params"][1] > r["dims"]["params"][1])
    return ("\n".join(lines) + f"\n\n{len(rows)} models; verified (mask-equivalence and ONNX Runtime): dims "
            f"{verified['dims']}, whole {verified['whole']}. Whole heads leave fewer parameters on {smaller}, "
            f"more on {larger}, the same on {len(rows) - smaller - larger}.\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "heads.jsonl"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "heads.md"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("FXPRUNE_ROUND_TO", "none")
    done = {}
    if os.path.exists(args.cache):
        with open(args.cache) as f:
            done = {r["name"]: r for r in map(json.loads, f)}
    if not args.table_only:
        import torch
        torch.set_num_threads(1)
        for name in args.names:
            row = run(name)
            done[name] = row
            print(json.dumps(row), flush=True)
            with open(args.cache, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in done.values())
    rows = [done[n] for n in args.names if n in done]
    text = ("# Attention heads: per-head dims against whole heads (`python tools/heads_sweep.py`)\n\n"
            "l2, ratio 0.5, no rounding; each result verified by mask-equivalence and ONNX Runtime. "
            "'attention kept': the first attention projection's group, kept/total channels (dims mode: dims "
            "over all heads; whole mode: heads, or key/value groups of heads with GQA).\n\n" + table(rows))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
