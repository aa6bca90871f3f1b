"""The model-zoo sweep: every torchvision classification model through fxprune and Torch-Pruning.

Each model runs in its own subprocess, under a wall-clock and a memory limit, with
``weights=None``, in eval mode, at its native input size (``model.image_size`` where
the model fixes one, else the crop size of its default weights' transforms). fxprune
runs ``fxprune.compile(model, x, method="l2", ratio=0.5)`` with verification on
(mask-equivalence and ONNX Runtime); Torch-Pruning (an optional extra: ``pip install
torch-pruning``) runs its ``MetaPruner`` with L2 group magnitude at the same ratio, the
classifier ignored, as its README does.

Results go to a JSON-lines cache (one line per model and tool, so a sweep can be
resumed or re-run on a subset) and a Markdown table written with ``tabulate``.

Status "verified" means: mask-equivalence held, ONNX Runtime agreed with torch, and
at least one channel was removed (a model whose every group is pinned does not count).
Where some groups are *approximate* (they pass through a channel-normalising op such
as LayerNorm over channels, whose statistics change when channels go), their nodes are
checked by ORT agreement and finite, shape-correct outputs; the table says how many.

Usage::

    python tools/zoo.py                          # every model, both tools, writes tools/results/zoo.md
    python tools/zoo.py --models resnet18,vit_b_16 --no-tp
    python tools/zoo.py --table-only             # rebuild the table from the cache
    python tools/zoo.py --worker fxprune resnet18  # one model, prints a JSON line (what the sweep runs)

Example (one model, in this process; the sweep itself runs each model in a subprocess)::

    >>> import sys; sys.path.insert(0, "tools")
    >>> from zoo import run_fxprune
    >>> row = run_fxprune("squeezenet1_0", onnx=False)
    >>> row["status"], row["removed"] > 0
    ('mask ok', True)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, "zoo.jsonl")
TABLE = os.path.join(RESULTS, "zoo.md")
RATIO = 0.5
TIMING = "fxprune-timing"  # rows of --timing-only: analysis + rewrite re-timed by a newer version
TP_MEM_MB = 12000  # address-space cap for Torch-Pruning workers (about 8 GB resident)


# ----------------------------------------------------------------------------- models

def model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str):
    """``(model, example_input)``: the model with random weights, in eval mode, at its native size."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = native_size(name, model)
    return model, torch.randn(1, 3, size, size)


def native_size(name: str, model) -> int:
    import torchvision

    fixed = getattr(model, "image_size", None)  # ViT: a model built without weights fixes its size
    if isinstance(fixed, int):
        return fixed
    weights = torchvision.models.get_model_weights(name)
    crop = weights.DEFAULT.transforms().crop_size
    return int(crop[0] if isinstance(crop, (list, tuple)) else crop)


def classifier_modules(model):
    """The modules that write the logits (Torch-Pruning must be told to leave them alone)."""
    import torch.nn as nn

    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == 1000:
            out.append(m)
        elif isinstance(m, nn.Conv2d) and m.out_channels == 1000:
            out.append(m)
    return out


# ----------------------------------------------------------------------------- workers

def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_fxprune(name: str, onnx: bool = True) -> dict:
    """Compile one model with verification; returns one row of figures (never raises)."""
    import torch

    import fxprune
    from fxprune.errors import FxPruneError

    row = {"model": name, "tool": "fxprune"}
    model, x = build(name)
    row["input"] = list(x.shape)
    row["mem_model_mb"] = _peak_mb()
    try:
        row.update(time_fxprune(model, x))
    except Exception as exc:  # the verified run below says what went wrong
        row["timing_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    t0 = time.perf_counter()
    try:
        pruned = fxprune.compile(model, (x,), method="l2", ratio=RATIO, onnx=onnx, round_to=None)
    except FxPruneError as exc:
        row.update(status=_failure_status(exc), error=f"{type(exc).__name__}: {str(exc)[:400]}",
                   wall_s=time.perf_counter() - t0, mem_peak_mb=_peak_mb())
        return row
    except Exception as exc:  # a crash is a bug: record it, never hide it
        row.update(status="out of memory" if _is_oom(exc) else "crash", error=f"{type(exc).__name__}: {str(exc)[:400]}",
                   trace=traceback.format_exc()[-1500:], wall_s=time.perf_counter() - t0, mem_peak_mb=_peak_mb())
        return row
    rep = fxprune.report(pruned)
    t = rep.timings
    analysis = sum(t.get(k, 0.0) for k in ("trace", "couple", "score", "plan"))
    with torch.no_grad():
        y = pruned(x)
    finite = bool(torch.isfinite(y).all()) and tuple(y.shape) == (1, 1000)
    graph_groups = rep.groups
    approx = rep.mask.get("approximate_groups", 0) if rep.mask else 0
    row.update(
        params_before=rep.params_before, params_after=rep.params_after,
        flops_before=rep.flops_before, flops_after=rep.flops_after,
        analysis_s=analysis, trace_s=t.get("trace", 0.0), couple_s=t.get("couple", 0.0),
        rewrite_s=t.get("rewrite", 0.0), verify_s=t.get("verify: mask", 0.0) + t.get("verify: onnx", 0.0),
        mask_s=t.get("verify: mask", 0.0), onnx_s=t.get("verify: onnx", 0.0),
        mask_ok=bool(rep.mask and rep.mask["ok"]), mask_rel=rep.mask["max_rel_diff"] if rep.mask else None,
        ort_ok=bool(rep.onnx and rep.onnx["ok"]), ort_abs=rep.onnx.get("max_abs_diff") if rep.onnx else None,
        ort_rel=rep.onnx.get("max_rel_diff") if rep.onnx else None,
        groups=graph_groups, pinned_groups=rep.pinned_groups, prunable_groups=rep.prunable_groups,
        approximate_groups=approx, first_pin=rep.first_pin, removed=rep.plan.removed, finite=finite,
        wall_s=time.perf_counter() - t0, mem_peak_mb=_peak_mb())
    row["status"] = status_of(row, onnx)
    return row


def time_fxprune(model, x) -> dict:
    """Analysis + rewrite, timed twice: first thing in the process (*cold*: one-time library
    set-up included), then again (*warm*); with the extra peak memory of the cold run over
    the model's own, and fingerprints of the plan and of the pruned model (its code and
    every tensor), so a table can show that two code versions prune identically."""
    import hashlib

    import fxprune
    from fxprune.passes import magnitude
    from fxprune.rewrite import rewrite

    out = {}
    base = _peak_mb()
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        graph = fxprune.analyze(model, (x,))
        t1 = time.perf_counter()
        plan = fxprune.make_plan(graph, magnitude.l2(graph), ratio=RATIO)
        t2 = time.perf_counter()
        pruned = rewrite(graph, plan)
        t3 = time.perf_counter()
        out[f"{run}_s"] = t3 - t0
        out[f"{run}_parts"] = {**{k: round(v, 4) for k, v in graph.timings.items()},
                               "score+plan": round(t2 - t1, 4), "rewrite": round(t3 - t2, 4)}
        if run == "cold":
            out["mem_analysis_mb"] = _peak_mb() - base
            out["plan_sha"] = hashlib.sha1(plan.to_json().encode()).hexdigest()[:12]
            digest = hashlib.sha1(pruned.code.encode())
            for key, t in pruned.state_dict().items():
                digest.update(key.encode())
                digest.update(t.detach().contiguous().numpy().tobytes())
            out["model_sha"] = digest.hexdigest()[:12]
        del graph, plan, pruned
    return out


def status_of(row: dict, onnx: bool = True) -> str:
    """'verified' only when mask-equivalence and ORT agree, the output is finite, and channels went."""
    if not row["mask_ok"]:
        return "mask mismatch"
    if row["removed"] == 0 or row["prunable_groups"] == 0:
        return "all pinned"
    if row.get("same_structure") is False:
        return "other output structure"  # containers or dims other than the original's (an OrderedDict made a dict)
    if not row["finite"]:
        return "non-finite output"
    if not onnx:
        return "mask ok"
    if row.get("onnx_unpruned_fails"):
        return "mask ok, ONNX n/a"  # the unpruned model's ONNX file fails too (exporter / ORT limit)
    return "verified" if row["ort_ok"] else "ORT mismatch"


def _is_oom(exc) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "bad_alloc" in str(exc)


def _failure_status(exc) -> str:
    msg = str(exc)
    if "ONNX export failed" in msg:
        return "ONNX export failed"
    if "ONNX Runtime" in msg:
        return "ORT mismatch"
    if "masked original" in msg:
        return "mask mismatch"
    return type(exc).__name__


def run_torch_pruning(name: str) -> dict:
    """Torch-Pruning's generic recipe at the same ratio; it has no verification of its own."""
    import torch

    row = {"model": name, "tool": "torch-pruning"}
    try:
        import torch_pruning as tp
    except ImportError:
        row.update(status="not installed")
        return row
    row["version"] = tp.__version__
    model, x = build(name)
    params_before = sum(p.numel() for p in model.parameters())
    try:  # cold: first thing in the process, on a second copy, as fxprune's cold run; the run below is warm
        if os.environ.get("FXPRUNE_ZOO_TP_ONCE"):
            raise RuntimeError("skipped (--tp-once): the run below is the only one, and cold")
        cold = build(name)[0]
        base = _peak_mb()
        t0 = time.perf_counter()
        tp.pruner.MetaPruner(cold, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=RATIO,
                             ignored_layers=classifier_modules(cold)).step()
        row["cold_s"] = time.perf_counter() - t0
        row["mem_analysis_mb"] = _peak_mb() - base
        del cold
    except Exception as exc:  # the run below records the failure
        row["cold_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    t0 = time.perf_counter()
    try:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=RATIO,
                                      ignored_layers=classifier_modules(model))
        t1 = time.perf_counter()
        pruner.step()
        t2 = time.perf_counter()
    except Exception as exc:
        row.update(status="crash", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                   wall_s=time.perf_counter() - t0, mem_peak_mb=_peak_mb())
        return row
    row.update(analysis_s=t1 - t0, prune_s=t2 - t1, total_s=t2 - t0,
               params_before=params_before, params_after=sum(p.numel() for p in model.parameters()))
    if os.environ.get("FXPRUNE_ZOO_TP_ONCE"):
        row["cold_s"] = row["total_s"]  # the only run, and the first thing the process did
    try:
        with torch.no_grad():
            y = model(x)
        ok = tuple(y.shape) == (1, 1000) and bool(torch.isfinite(y).all())
        row["status"] = "ran" if ok else "bad output"
    except Exception as exc:
        row.update(status="runs: crash", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    row["mem_peak_mb"] = _peak_mb()
    return row


def worker(tool: str, name: str, threads: int, onnx: bool) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    if tool == "torch-pruning":  # Torch-Pruning's autograd walk grows past 8 GB resident on Swin
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = TP_MEM_MB * 1024 * 1024
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    if tool == "fxprune":
        row = run_fxprune(name, onnx=onnx)
    elif tool == TIMING:
        model, x = build(name)
        row = {"model": name, "tool": TIMING, "status": "timed", **time_fxprune(model, x)}
    else:
        row = run_torch_pruning(name)
    row["commit"] = _commit()
    print("ZOO-ROW " + json.dumps(row), flush=True)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


# ----------------------------------------------------------------------------- the sweep

def _limit_memory(mb: int):
    def apply():
        limit = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_one(tool: str, name: str, *, timeout: int, mem_mb: int, threads: int, onnx: bool, script: str | None = None) -> dict:
    """Run one model in a fresh subprocess under the limits; a kill becomes a status. ``script`` is the
    sweep whose ``--worker TOOL MODEL`` prints the row (default: this file; ``zoo_families.py`` reuses it)."""
    cmd = [sys.executable, script or os.path.abspath(__file__), "--worker", tool, name, "--threads", str(threads)]
    if not onnx:
        cmd.append("--no-onnx")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory(mem_mb) if mem_mb else None)
    except subprocess.TimeoutExpired:
        return {"model": name, "tool": tool, "status": f"timeout ({timeout} s)", "wall_s": timeout}
    for line in proc.stdout.splitlines():
        if line.startswith("ZOO-ROW "):
            return json.loads(line[len("ZOO-ROW "):])
    tail = (proc.stderr or proc.stdout)[-600:]
    status = "out of memory" if ("MemoryError" in tail or "std::bad_alloc" in tail or "alloc" in tail.lower()
                                 or proc.returncode in (-9, 137)) else f"died (rc {proc.returncode})"
    return {"model": name, "tool": tool, "status": status, "error": tail, "wall_s": time.perf_counter() - t0}


def load_cache(path=CACHE) -> dict:
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[(r["tool"], r["model"])] = r
    return rows


def save_cache(rows: dict, path=CACHE) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for key in sorted(rows):
            f.write(json.dumps(rows[key]) + "\n")


def sweep(names, tools, *, timeout, mem_mb, threads, onnx, cache=CACHE, jobs: int = 1, tp_timeout=None,
          script: str | None = None) -> dict:
    """Run every (tool, model) in its own subprocess, ``jobs`` at a time; the cache is saved after each."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    rows = load_cache(cache)
    work = [(tool, n) for n in names for tool in tools]
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(work), unit="run") as bar:
        futures = {pool.submit(run_one, tool, name, mem_mb=mem_mb, threads=threads, onnx=onnx, script=script,
                               timeout=tp_timeout if tool == "torch-pruning" and tp_timeout else timeout):
                   (tool, name) for tool, name in work}
        for fut in as_completed(futures):
            tool, name = futures[fut]
            rows[(tool, name)] = fut.result()
            rows[(tool, name)]["when"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            save_cache(rows, cache)  # after every model: an interrupted sweep keeps what it did
            bar.set_description(f"{tool}: {name}: {rows[(tool, name)]['status']}")
            bar.update()
    return rows


# ----------------------------------------------------------------------------- the table

def _m(n):
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _g(n):
    return "-" if n is None else f"{n / 1e9:.2f}G"


def _s(x):
    return "-" if x is None else f"{x:.2f}"


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


ANALYSIS_GOAL_S, ANALYSIS_GOAL_MB = 5.0, 2048  # the goals: per model, analysis + rewrite


def table(rows: dict, names=None) -> str:
    """The Markdown report: the headline figures, our table, then Torch-Pruning side by side."""
    from tabulate import tabulate

    names = names or sorted({m for _, m in rows})
    ours = [with_timing(rows.get(("fxprune", n), {"model": n, "status": "not run"}), rows.get((TIMING, n)))
            for n in names]
    for r in ours:
        if r["status"] == "crash" and "can't allocate memory" in r.get("error", ""):
            r["status"] = "out of memory"
    body = []
    for r in ours:
        body.append([
            r["model"], r["status"],
            f"{_m(r.get('params_before'))} → {_m(r.get('params_after'))}",
            f"{_g(r.get('flops_before'))} → {_g(r.get('flops_after'))}",
            _s(r.get("cold_s")), _s(r.get("warm_s")),
            "-" if r.get("mem_analysis_mb") is None else f"{r['mem_analysis_mb']:.0f}",
            _s(r.get("verify_s")),
            "-" if r.get("ort_abs") is None else f"{r['ort_abs']:.1e}",
            "-" if r.get("groups") is None else f"{r['pinned_groups']}/{r['groups']}",
            r.get("approximate_groups", "-") if r.get("groups") is not None else "-",
            "-" if r.get("mem_peak_mb") is None else f"{r['mem_peak_mb']:.0f}",
            _first_reason(r),
        ])
    headers = ["model", "status", "params before → after", "FLOPs before → after", "analysis+rewrite s (cold)",
               "(warm)", "analysis MB", "verify s", "max ORT diff", "pinned groups", "approx. groups", "peak MB",
               "first pin reason / error"]
    verified = sum(r["status"] == "verified" for r in ours)
    timed = [r for r in ours if r.get("cold_s") is not None]
    slow = sorted(timed, key=lambda r: -r["cold_s"])[:3]
    heavy = sorted((r for r in timed if r.get("mem_analysis_mb") is not None), key=lambda r: -r["mem_analysis_mb"])[:3]
    over_s = [r["model"] for r in timed if r["cold_s"] > ANALYSIS_GOAL_S]
    over_analysis = [r["model"] for r in timed if _analysis_only(r) > ANALYSIS_GOAL_S]
    over_mb = [r["model"] for r in timed if (r.get("mem_analysis_mb") or 0) > ANALYSIS_GOAL_MB]
    out = [f"# fxprune model-zoo sweep (torchvision, L2 magnitude, ratio {RATIO})", "",
           f"**{verified} of {len(ours)} verified** (mask-equivalence and ONNX Runtime agreement, "
           "at least one channel removed, finite output of the right shape).", ""]
    if timed:
        out += [f"Analysis (trace, coupling, L2 scores, plan), cold: {len(timed) - len(over_analysis)} of "
                f"{len(timed)} models under {ANALYSIS_GOAL_S:.0f} s"
                + (f" (over: {', '.join(over_analysis)})" if over_analysis else "") + "; with the rewrite (the new "
                f"model's tensors copied): {len(timed) - len(over_s)} of {len(timed)}"
                + (f" (over: {', '.join(over_s)})" if over_s else "")
                + "; slowest " + ", ".join(f"{r['model']} {r['cold_s']:.1f} s" for r in slow) + ". "
                f"Memory above the model's own: {len(timed) - len(over_mb)} of {len(timed)} under "
                f"{ANALYSIS_GOAL_MB / 1024:.0f} GB" + (f" (over: {', '.join(over_mb)})" if over_mb else "")
                + "; largest " + ", ".join(f"{r['model']} {r['mem_analysis_mb']:.0f} MB" for r in heavy) + ".", ""]
    out += ["Every model: `weights=None`, eval mode, batch 1 at its native input size, in its own subprocess "
            "(1 torch thread). *analysis+rewrite*: `analyze` + L2 scores + `make_plan` + `rewrite`, timed as the "
            "first thing the process does (*cold*, one-time library set-up included) and again (*warm*). "
            "*analysis MB*: the cold run's peak resident memory above the process's peak after building the model. "
            "*verify*: mask-equivalence + ONNX export and ONNX Runtime at batches 1 and 3 (the example batch alone "
            "where the exporter fixes it), from `fxprune.compile(model, x, method='l2', ratio=0.5)`. "
            "*pinned groups*: groups that cannot shrink at all / all groups. *approx. groups*: groups that pass "
            "through a LayerNorm over channels and lost channels: pruning them renormalises over the kept "
            "channels, so their mask-equivalence reference recomputes those LayerNorms over the kept channels "
            "(exact comparison, not skipped). *peak MB*: the worker's peak resident memory, ONNX export included. "
            "FLOPs are `torch.utils.flop_counter`'s formulas applied node by node on the meta device, for the "
            "original and the pruned model alike. Two workers ran at a time (one for the two largest models); limits: "
            "11-13 GB of address space and 30 min per fxprune worker, 12 GB and 400 s per Torch-Pruning worker.", ""]
    retimed = sorted({r["timed_commit"] for r in ours if r.get("timed_commit")})
    if retimed:
        out[-1:-1] = [f"Analysis times of {sum(1 for r in ours if r.get('timed_commit'))} models re-measured by "
                      f"`--timing-only` at commit {', '.join(retimed)}, which prunes each of them into exactly the "
                      "tensors and code that were verified (same fingerprint of the pruned model).", ""]
    out.append(tabulate(body, headers=headers, tablefmt="github"))
    side = side_by_side(rows, names)
    if side:
        out += ["", side]
    return "\n".join(out) + "\n"


def _analysis_only(r) -> float:
    """Cold analysis without the rewrite (trace + coupling + scores + plan)."""
    return r["cold_s"] - (r.get("cold_parts") or {}).get("rewrite", 0.0)


def _first_reason(r):
    text = r.get("first_pin") or r.get("error") or ""
    text = " ".join(str(text).split())
    return (text[:110] + "…") if len(text) > 110 else text


def with_timing(row: dict, timing: dict | None) -> dict:
    """``row`` (a verified run) with the times of a later ``--timing-only`` run, if that run
    pruned the model into the very same tensors and code (same ``model_sha``); otherwise the
    status says the model changed since it was verified."""
    if timing is None or timing.get("cold_s") is None or row.get("status") == "not run":
        return row
    row = dict(row)
    if row.get("model_sha") and timing.get("model_sha") != row["model_sha"]:
        row["status"] = "changed since verified"
        return row
    for key in ("cold_s", "warm_s", "cold_parts", "warm_parts", "mem_analysis_mb"):
        row[key] = timing.get(key)
    row["timed_commit"] = timing.get("commit")
    return row


def side_by_side(rows: dict, names) -> str:
    from tabulate import tabulate

    pairs = [(with_timing(rows["fxprune", n], rows.get((TIMING, n))) if ("fxprune", n) in rows else None,
              rows.get(("torch-pruning", n))) for n in names]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and a["status"] != "not run"]
    if not pairs:
        return ""
    body, cold, warm = [], {}, {}
    for ours, theirs in pairs:
        ok = theirs["status"] in ("ran", "runs: crash", "bad output")  # Torch-Pruning finished its pruning
        for kind, mine, tps, into in (("cold", ours.get("cold_s"), theirs.get("cold_s"), cold),
                                      ("warm", ours.get("warm_s"), theirs.get("total_s"), warm)):
            if ok and mine and tps:
                into[ours["model"]] = tps / mine
        body.append([ours["model"], ours["status"], theirs["status"], _s(ours.get("cold_s")),
                     _s(theirs.get("cold_s")), _x(cold.get(ours["model"])), _s(ours.get("warm_s")),
                     _s(theirs.get("total_s")), _x(warm.get(ours["model"])),
                     "-" if theirs.get("mem_analysis_mb") is None else f"{theirs['mem_analysis_mb']:.0f}"])
    ours_ok = sum(a["status"] == "verified" for a, _ in pairs)
    theirs_ok = sum(b["status"] == "ran" for _, b in pairs)
    version = next((b.get("version") for _, b in pairs if b.get("version")), "?")
    lines = [f"## Side by side with Torch-Pruning {version}", "",
             f"Coverage: fxprune **{ours_ok} / {len(pairs)} verified**; Torch-Pruning **{theirs_ok} / {len(pairs)} "
             "ran** (pruned, and the pruned model runs with a finite output of the right shape; Torch-Pruning "
             "does not check numerics).", ""]
    for kind, ratios in (("cold", cold), ("warm", warm)):
        gm = geomean(ratios.values())
        if gm:
            faster = sum(r > 1 for r in ratios.values())
            lines.append(f"Speed, {kind}: Torch-Pruning's time (dependency graph + pruning step) over fxprune's "
                         f"(analysis + rewrite), geometric mean over the {len(ratios)} models both pruned: "
                         f"**{gm:.2f}×** (fxprune faster on {faster})"
                         + (f"; resnet50: **{ratios['resnet50']:.2f}×**." if "resnet50" in ratios else "."))
            lines.append("")
    lines.append(tabulate(body, headers=["model", "fxprune", "Torch-Pruning", "fxprune cold s", "TP cold s",
                                         "speed-up cold", "fxprune warm s", "TP warm s", "speed-up warm",
                                         "TP analysis MB"], tablefmt="github"))
    return "\n".join(lines)


def _x(ratio):
    return "-" if ratio is None else f"{ratio:.1f}×"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated model names (default: every classification model)")
    p.add_argument("--skip", default="", help="comma-separated model names to leave out")
    p.add_argument("--no-tp", action="store_true", help="do not run Torch-Pruning")
    p.add_argument("--only-tp", action="store_true", help="run Torch-Pruning only")
    p.add_argument("--tp-once", action="store_true",
                   help="run Torch-Pruning once per process (cold), for models where two runs pass the memory cap")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime check (status is then 'mask ok')")
    p.add_argument("--timeout", type=int, default=600, help="seconds per model and tool (default 600)")
    p.add_argument("--tp-timeout", type=int, help="seconds per model for Torch-Pruning (default: --timeout)")
    p.add_argument("--mem-mb", type=int, default=12000, help="address-space limit per subprocess, MB (default 12000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at a time (default 1)")
    p.add_argument("--cache", default=CACHE, help="JSON-lines results cache")
    p.add_argument("--out", default=TABLE, help="Markdown table to write")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the cache")
    p.add_argument("--timing-only", action="store_true",
                   help="re-time analysis + rewrite (no verification), and Torch-Pruning unless --no-tp; the table "
                        "takes times from these rows and keeps a model verified only if the pruned model's fingerprint "
                        "is unchanged")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.threads, not a.no_onnx)
        return 0
    names = a.models.split(",") if a.models else model_names()
    names = [n for n in names if n not in set(a.skip.split(","))]
    tools = ["torch-pruning"] if a.only_tp else ["fxprune"] + ([] if a.no_tp else ["torch-pruning"])
    if a.timing_only:  # Torch-Pruning re-timed beside it (unless --no-tp): both in the same hour
        tools = [TIMING] + ([] if a.no_tp else ["torch-pruning"])
    if a.tp_once:
        os.environ["FXPRUNE_ZOO_TP_ONCE"] = "1"
    if a.table_only:
        rows = load_cache(a.cache)
    else:
        rows = sweep(names, tools, timeout=a.timeout, tp_timeout=a.tp_timeout, mem_mb=a.mem_mb, threads=a.threads,
                     onnx=not a.no_onnx, cache=a.cache, jobs=a.jobs)
    text = table(rows, model_names() if a.table_only and not a.models else sorted({n for _, n in rows}))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
