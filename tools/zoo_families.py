"""The families sweep: ultralytics YOLO, Hugging Face transformers, timm, smp and torchvision's segmentation,
video and optical-flow models through fxprune, ``torch.export`` and Torch-Pruning.

The catalogue is ``tools/families.py`` (every model built from its config, random weights, no
download, with ``(args, kwargs)`` example inputs). Each model runs three times, each in its own
subprocess under a wall-clock and a memory limit (``tools/zoo.py``'s worker machinery and cache):

* ``fxprune``: ``fxprune.compile(model, args, method="l2", ratio=0.5)`` with verification
  (mask-equivalence and ONNX Runtime); ``capture="auto"`` is passed where ``compile`` has a
  ``capture`` parameter, and the report's capture information is recorded. Status ``verified``
  (both checks passed, at least one channel removed, the pruned model's outputs finite and of the
  original's structure), ``all pinned`` (nothing could shrink), or the failure: ``TraceError``
  (the model could not be captured), another fxprune error, or ``crash`` (an exception that is not
  an fxprune error: a bug).
* ``export``: does ``torch.export.export(model, args, kwargs, strict=False)`` capture the model?
  Retried once on failure (a first call on YOLO sometimes fails); seconds, graph nodes, and
  whether ``ep.module()`` reproduces the eager outputs.
* ``torch-pruning``: Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` at
  ``pruning_ratio=0.5``, following its examples: the task head ignored (classifier, ``Detect`` /
  ``Classify``, ``lm_head``, pooler, segmentation head); attention projections declared through
  ``num_heads`` (timm: head dims pruned and ``head_dim`` updated after, as its timm example; HF:
  whole heads pruned, ``prune_num_heads=True, prune_head_dims=False``, and the attention modules'
  head counts updated after, as its BERT example); YOLO C2f blocks split into two convolutions
  instead of a ``chunk`` (``C2f_v2``, as its YOLOv8 example). Status ``pruned and runs``: the
  pruning step finished, something was removed, and the pruned model runs on the inputs with the
  original's output structure (same pytree, same number of dims per output) and finite values.

Usage::

    python tools/zoo_families.py                                # everything; writes tools/results/zoo_families.md
    python tools/zoo_families.py --families hf,smp --no-tp
    python tools/zoo_families.py --models hf:BertModel,timm:resnet10t
    python tools/zoo_families.py --table-only
    python tools/zoo_families.py --worker export hf:BertModel   # one model and tool: prints a JSON line
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fxprune first
import families  # noqa: E402
import zoo  # noqa: E402

RESULTS = zoo.RESULTS
CACHE = os.path.join(RESULTS, "zoo_families.jsonl")
TABLE = os.path.join(RESULTS, "zoo_families.md")
RATIO = zoo.RATIO
TOOLS = ("fxprune", "export", "torch-pruning")
TP_OK = "pruned and runs"


# ----------------------------------------------------------------------------- helpers

def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), "")
    return f"{type(exc).__name__}: {line}"[:limit]


def call(model, args, kwargs):
    import torch

    with torch.no_grad():
        return model(*args, **kwargs)


def structure(out) -> tuple:
    """What 'the right output structure' compares: the pytree spec (dict keys, tuple lengths)
    and the number of dims of every tensor leaf."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(out)
    return str(spec), tuple(t.dim() if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves)


def tensors(out) -> list:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def finite(out) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors(out) if t.is_floating_point())


def compare(ref, out) -> tuple[bool, bool, float | None]:
    """``(same structure, same shapes, max abs diff where shapes agree)``."""
    a, b = tensors(ref), tensors(out)
    same = structure(ref) == structure(out)
    shapes = same and all(x.shape == y.shape for x, y in zip(a, b))
    diff = None
    if shapes and a:
        diff = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
    return same, shapes, diff


def positional(model, n_args: int, names):
    """``model(*args, **kwargs)`` as a module of positional inputs only (``fxprune.compile`` takes a
    tuple): a generated ``forward(self, arg0, ..., <kwarg names>)`` that ``symbolic_trace`` can read."""
    import torch

    params = [f"arg{i}" for i in range(n_args)] + list(names)
    call_args = [f"arg{i}" for i in range(n_args)] + [f"{k}={k}" for k in names]
    scope = {}
    exec(f"def forward(self, {', '.join(params)}):\n    return self.model({', '.join(call_args)})\n", scope)

    class Bound(torch.nn.Module):
        forward = scope["forward"]

        def __init__(self):
            super().__init__()
            self.model = model

    return Bound().eval()


# ----------------------------------------------------------------------------- workers

def run_fxprune(name: str) -> dict:
    import fxprune
    from fxprune.errors import FxPruneError

    row = {"model": name, "tool": "fxprune"}
    model, args, kwargs = families.build(name)
    row.update(_describe(model, args, kwargs))
    ref = call(model, args, kwargs)
    if kwargs:
        model, args = positional(model, len(args), list(kwargs)), args + tuple(kwargs.values())
    options = {"method": "l2", "ratio": RATIO, "onnx": True, "round_to": None}   # as Torch-Pruning: no rounding
    if "capture" in inspect.signature(fxprune.compile).parameters:
        options["capture"] = "auto"
    row["capture_param"] = "capture" in options
    t0 = time.perf_counter()
    try:
        pruned = fxprune.compile(model, args, **options)
    except FxPruneError as exc:
        row.update(status=zoo._failure_status(exc), error=first_line(exc), error_full=str(exc)[:600],
                   wall_s=time.perf_counter() - t0, mem_peak_mb=zoo._peak_mb())
        return row
    except Exception as exc:  # not an fxprune error: a bug, recorded with its trace
        row.update(status="out of memory" if zoo._is_oom(exc) else "crash", error=first_line(exc),
                   trace=traceback.format_exc()[-1500:], wall_s=time.perf_counter() - t0, mem_peak_mb=zoo._peak_mb())
        return row
    rep = fxprune.report(pruned)
    capture = getattr(rep, "capture", None)
    if capture is not None:
        row["capture"] = capture if isinstance(capture, (str, int, float, bool, dict, list)) else str(capture)
    try:
        out = call(pruned, args, {})
        row["same_structure"], _, _ = compare(ref, out)
        ok = finite(out)
    except Exception as exc:
        ok = False
        row["run_error"] = first_line(exc)
    if getattr(rep, "output", None) == "parts":  # pruned part by part (fxprune.partial): the parts' figures
        row.update(_parts_figures(rep), finite=ok, wall_s=time.perf_counter() - t0, mem_peak_mb=zoo._peak_mb())
        row["status"] = zoo.status_of(row, onnx=True)
        return row
    row.update(
        params_after=rep.params_after, flops_before=rep.flops_before, flops_after=rep.flops_after,
        mask_ok=bool(rep.mask and rep.mask["ok"]), ort_ok=bool(rep.onnx and rep.onnx["ok"]),
        onnx_unpruned_fails=bool(rep.onnx and rep.onnx.get("unpruned_fails")),
        onnx_error=(rep.onnx or {}).get("error"),
        ort_abs=rep.onnx.get("max_abs_diff") if rep.onnx else None, groups=rep.groups, pinned_groups=rep.pinned_groups,
        prunable_groups=rep.prunable_groups, first_pin=rep.first_pin, removed=rep.plan.removed, finite=ok,
        approximate_groups=rep.mask.get("approximate_groups", 0) if rep.mask else 0,
        timings={k: round(v, 3) for k, v in rep.timings.items()}, wall_s=time.perf_counter() - t0,
        mem_peak_mb=zoo._peak_mb())
    row["status"] = zoo.status_of(row, onnx=True)
    if row["onnx_unpruned_fails"]:
        row["error"] = f"ONNX not checkable, the unpruned model's file fails too: {row['onnx_error'].splitlines()[0]}"
    return row


def _parts_figures(rep) -> dict:
    """A row's figures for a model pruned part by part: every part checked, the ONNX check n/a where a part's
    unpruned export fails too (``fxprune.partial`` skips it then)."""
    onnx = [p.get("onnx") or {} for p in rep.parts]
    skipped = [o["skipped"] for o in onnx if o.get("ok") is None and o.get("skipped")]
    return dict(params_after=rep.params_after, flops_before=rep.flops_before, flops_after=rep.flops_after,
                capture={"tracer": "parts", "parts": [p["name"] for p in rep.parts], "why": rep.why[:300]},
                mask_ok=bool(rep.parts) and all(p["mask"] and p["mask"]["ok"] for p in rep.parts),
                ort_ok=all(o.get("ok") is True for o in onnx), onnx_unpruned_fails=bool(skipped),
                onnx_error=skipped[0] if skipped else None, removed=sum(p["removed"] for p in rep.parts),
                groups=sum(p["groups"] for p in rep.parts), prunable_groups=sum(p["prunable_groups"] for p in rep.parts),
                pinned_groups=sum(p["groups"] - p["prunable_groups"] for p in rep.parts),
                first_pin=f"pruned part by part: {len(rep.parts)} parts, {len(rep.whole)} modules left whole "
                          f"(first: {rep.whole[0]['name']}: {rep.whole[0]['reason'][:80]})" if rep.whole else
                          f"pruned part by part: {len(rep.parts)} parts")


def run_export(name: str) -> dict:
    import torch

    row = {"model": name, "tool": "export"}
    model, args, kwargs = families.build(name)
    row.update(_describe(model, args, kwargs))
    ref = call(model, args, kwargs)
    errors = []
    for attempt in (1, 2):
        t0 = time.perf_counter()
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:
            errors.append(first_line(exc))
            row[f"attempt{attempt}_s"] = time.perf_counter() - t0
            continue
        row.update(status="captured" if attempt == 1 else "captured on retry", export_s=time.perf_counter() - t0,
                   nodes=len(ep.graph.nodes))
        try:
            same, shapes, diff = compare(ref, call(ep.module(), args, kwargs))
            row.update(same_structure=same, same_shapes=shapes, max_abs_diff=diff)
        except Exception as exc:
            row["run_error"] = first_line(exc)
        break
    else:
        row["status"] = "failed"
    if errors:
        row["error"] = errors[0]
        row["errors"] = errors
    row["mem_peak_mb"] = zoo._peak_mb()
    return row


def run_torch_pruning(name: str) -> dict:
    row = {"model": name, "tool": "torch-pruning"}
    try:
        import torch_pruning as tp
    except ImportError:
        row["status"] = "not installed"
        return row
    row["version"] = tp.__version__
    model, args, kwargs = families.build(name)
    row.update(_describe(model, args, kwargs))
    ref = call(model, args, kwargs)
    family = name.partition(":")[0]
    t0 = time.perf_counter()
    try:
        if family == "ultralytics":
            row["c2f_split"] = split_c2f(model)
        heads = families.attention_heads(name, model)
        options = {}
        if heads and family == "hf":  # as its BERT and LLM examples: whole heads, head_dim kept (RoPE)
            options = dict(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO)
            fused = {m.gate_up_proj: 2 for m in model.modules() if hasattr(m, "gate_up_proj")}
            if fused:
                options["out_channel_groups"] = fused
        if kwargs:
            example = {**dict(zip(_arg_names(model, len(args)), args)), **kwargs}
        else:
            example = args[0] if len(args) == 1 else list(args)
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=RATIO, ignored_layers=families.head_modules(name, model),
                                      num_heads=heads, **options)
        pruner.step()
        fix_heads(model, pruner, heads)
    except Exception as exc:
        row.update(status="crash", error=first_line(exc), trace=traceback.format_exc()[-1200:],
                   wall_s=time.perf_counter() - t0, mem_peak_mb=zoo._peak_mb())
        return row
    row.update(prune_s=time.perf_counter() - t0, params_after=sum(p.numel() for p in model.parameters()))
    try:
        out = call(model, args, kwargs)
    except Exception as exc:
        row.update(status="runs: crash", error=first_line(exc))
        return row
    same, shapes, _ = compare(ref, out)
    row["same_shapes"] = shapes
    if row["params_after"] >= row["params"]:
        row["status"] = "nothing pruned"
    elif not same:
        row["status"] = "runs: wrong structure"
    elif not finite(out):
        row["status"] = "runs: non-finite"
    else:
        row["status"] = TP_OK
    row["mem_peak_mb"] = zoo._peak_mb()
    return row


def _arg_names(model, n):
    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def split_c2f(model) -> int:
    """Torch-Pruning's YOLOv8 recipe: every C2f-style block (``cv1(x).chunk(2, 1)``) becomes two
    convolutions, one per half, so its dependency graph has no ``chunk`` to follow. Same outputs."""
    import copy
    import types

    import torch
    from ultralytics.nn.modules.block import C2f

    def forward(self, x):
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    n = 0
    for m in list(model.modules()):
        if not isinstance(m, C2f) or type(m).forward is not C2f.forward:
            continue
        c, whole = m.c, m.cv1
        halves = []
        for part in (slice(0, c), slice(c, 2 * c)):
            h = copy.deepcopy(whole)
            h.conv.weight = torch.nn.Parameter(whole.conv.weight.data[part].clone())
            h.conv.out_channels = c
            if getattr(h.conv, "bias", None) is not None:
                h.conv.bias = torch.nn.Parameter(whole.conv.bias.data[part].clone())
            bn = getattr(h, "bn", None)
            if bn is not None:
                bn.weight = torch.nn.Parameter(whole.bn.weight.data[part].clone())
                bn.bias = torch.nn.Parameter(whole.bn.bias.data[part].clone())
                bn.running_mean = whole.bn.running_mean[part].clone()
                bn.running_var = whole.bn.running_var[part].clone()
                bn.num_features = c
            halves.append(h)
        m.cv0, m.cv1 = halves
        m.forward = types.MethodType(forward, m)
        n += 1
    return n


def fix_heads(model, pruner, heads) -> None:
    """After pruning: the attention modules' head counts and sizes follow the pruned projections
    (Torch-Pruning's timm and BERT examples do this by hand)."""
    if not heads:
        return
    lm_head, config = getattr(model, "lm_head", None), getattr(model, "config", None)
    if lm_head is not None and config is not None and hasattr(lm_head, "in_features"):
        config.hidden_size = lm_head.in_features  # as Torch-Pruning's LLM example
    for m in model.modules():
        for q, k in (("qkv", None), ("qkv_proj", None), ("q_proj", "k_proj"), ("query", "key"), ("q_lin", "k_lin")):
            lin = getattr(m, q, None)
            if lin is None or lin not in heads:
                continue
            nh = pruner.num_heads.get(lin, heads[lin])
            if k is None:  # timm: fused qkv, heads kept, head_dim pruned
                m.num_heads = nh
                if hasattr(m, "head_dim"):
                    m.head_dim = lin.out_features // (3 * nh)
                continue
            nkv = pruner.num_heads.get(getattr(m, k), heads.get(getattr(m, k), nh))
            head_dim = lin.out_features // nh
            for attr, value in (("num_heads", nh), ("num_attention_heads", nh), ("n_heads", nh),
                                ("num_key_value_heads", nkv), ("num_key_value_groups", max(nh // max(nkv, 1), 1)),
                                ("attention_head_size", head_dim), ("head_dim", head_dim),
                                ("all_head_size", lin.out_features)):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, value)


def _describe(model, args, kwargs) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "input": [list(a.shape) for a in args] + [f"{k}={list(v.shape)}" for k, v in kwargs.items()],
            "class": type(model).__name__}


def worker(tool: str, name: str, threads: int) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    run = {"fxprune": run_fxprune, "export": run_export, "torch-pruning": run_torch_pruning}[tool]
    try:
        row = run(name)
    except Exception as exc:  # building the model or its reference run failed
        row = {"model": name, "tool": tool, "status": "build failed", "error": first_line(exc),
               "trace": traceback.format_exc()[-1200:]}
    row["commit"] = zoo._commit()
    print("ZOO-ROW " + json.dumps(row, default=str), flush=True)


# ----------------------------------------------------------------------------- forked sweep

class Overrun(BaseException):
    """A tool ran past its time in a forked child (a BaseException: no ``except Exception`` swallows it)."""


def preload(names) -> None:
    """Import every framework the models need, once, in the parent of the forked children: on a
    shared machine, importing torch + transformers takes longer than most models take to prune."""
    import warnings

    warnings.simplefilter("ignore")
    import torch  # noqa: F401
    import torch.export  # noqa: F401
    import torch.onnx  # noqa: F401

    import fxprune  # noqa: F401
    import fxprune.verify  # noqa: F401
    fams = {family_of(n) for n in names}
    for mod in ("onnx", "onnxruntime", "onnxscript", "torch_pruning", "tabulate"):
        try:
            __import__(mod)
        except ImportError:
            pass
    if "hf" in fams:
        for n in names:
            if family_of(n) == "hf":
                cls, cfg, _, _ = families.HF[n.partition(":")[2]]
                families._resolve(cls), families._resolve(cfg)
    if "timm" in fams:
        import timm  # noqa: F401
    if "smp" in fams:
        import segmentation_models_pytorch  # noqa: F401
    if "torchvision" in fams:
        import torchvision  # noqa: F401
    if "ultralytics" in fams:
        import ultralytics.nn.tasks  # noqa: F401


def _child(name, tools, timeout, mem_mb, threads, conn) -> None:
    import resource
    import signal
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if mem_mb:
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb * 1024 * 1024, mem_mb * 1024 * 1024))
    torch.set_num_threads(threads)

    def overrun(signum, frame):
        raise Overrun()

    signal.signal(signal.SIGALRM, overrun)
    run = {"fxprune": run_fxprune, "export": run_export, "torch-pruning": run_torch_pruning}
    for tool in tools:
        t0 = time.perf_counter()
        signal.alarm(timeout)
        try:
            row = run[tool](name)
        except Overrun:
            row = {"model": name, "tool": tool, "status": f"timeout ({timeout} s)", "wall_s": timeout}
        except Exception as exc:  # building the model or its reference run failed
            row = {"model": name, "tool": tool, "status": "out of memory" if zoo._is_oom(exc) else "build failed",
                   "error": first_line(exc), "trace": traceback.format_exc()[-1200:]}
        finally:
            signal.alarm(0)
        row.setdefault("wall_s", time.perf_counter() - t0)
        row["commit"] = zoo._commit()
        row["worker"] = "forked"
        conn.send(json.loads(json.dumps(row, default=str)))
        if row["status"] == "out of memory" and tool != tools[-1]:
            conn.close()
            os._exit(FRESH)  # the next tool gets a fresh child, not this one's fragmented heap
    conn.close()


FRESH = 3  # a child's exit code: "run the remaining tools in a new child"


def _run_child(ctx, name, tools, got, *, timeout, mem_mb, threads) -> None:
    """One forked child running ``tools`` on ``name``; its rows go into ``got``, and the tool it was
    running when it died or ran past its time gets a status row."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, tools, timeout, mem_mb, threads, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    started = t0
    while any(t not in got for t in tools):
        if recv.poll(1.0):
            try:
                row = recv.recv()
            except EOFError:
                break
            got[row["tool"]] = row
            started = time.perf_counter()
        elif time.perf_counter() - started > timeout + 30 or not proc.is_alive():
            if not recv.poll(0.1):
                break
    overran = time.perf_counter() - started > timeout + 30
    if proc.is_alive():
        proc.kill()
    proc.join(10)
    code = proc.exitcode
    tool = next((t for t in tools if t not in got), None)
    if tool is not None and not (code == FRESH and not overran):
        if overran:
            status = f"timeout ({timeout} s)"
        elif code in (-9, 137):
            status = "out of memory (killed)"
        else:
            status = f"died (rc {code})"
        got[tool] = {"model": name, "tool": tool, "status": status, "wall_s": time.perf_counter() - started,
                     "worker": "forked"}


def sweep_forked(names, tools, *, timeout, mem_mb, threads=1, cache=CACHE, missing=False) -> dict:
    """Every model in its own forked child (one at a time) that runs ``tools`` in turn, each under
    ``timeout`` seconds (``SIGALRM``) and the whole child under ``mem_mb`` of address space; the
    parent imported the frameworks once. A child that dies or hangs gives its missing rows a status.
    The cache is saved after every model."""
    import multiprocessing as mp

    from tqdm import tqdm

    rows = zoo.load_cache(cache)
    preload(names)
    ctx = mp.get_context("fork")
    work = [(n, [t for t in tools if not (missing and (t, n) in rows)]) for n in names]
    work = [(n, ts) for n, ts in work if ts]
    with tqdm(total=len(work), unit="model") as bar:
        for name, ts in work:
            got, left = {}, list(ts)
            while left:  # a child that dies or hangs loses the tool it was running; the rest run in a new child
                _run_child(ctx, name, left, got, timeout=timeout, mem_mb=mem_mb, threads=threads)
                left = [t for t in left if t not in got]
            for tool in ts:
                got[tool]["when"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
                rows[(tool, name)] = got[tool]
            zoo.save_cache(rows, cache)
            bar.set_description(f"{name}: " + " / ".join(str(got[t]["status"]) for t in ts))
            bar.update()
    return rows


# ----------------------------------------------------------------------------- the table

def family_of(name: str) -> str:
    return name.partition(":")[0]


FAILED = ("verified", "all pinned")


def counts(rows: dict, names) -> dict:
    """Per family: models, fxprune verified / all pinned / failed, export captured, Torch-Pruning ran."""
    out = collections.OrderedDict()
    for fam in families.FAMILIES + ("total",):
        ns = [n for n in names if fam == "total" or family_of(n) == fam]
        if not ns:
            continue
        fx = [rows.get(("fxprune", n), {}).get("status") for n in ns]
        ex = [rows.get(("export", n), {}).get("status") for n in ns]
        tp = [rows.get(("torch-pruning", n), {}).get("status") for n in ns]
        out[fam] = {
            "models": len(ns),
            "fxprune run": sum(s is not None for s in fx),
            "verified": sum(s == "verified" for s in fx),
            "all pinned": sum(s == "all pinned" for s in fx),
            "failed": sum(s is not None and s not in FAILED for s in fx),
            "TraceError": sum(s == "TraceError" for s in fx),
            "export run": sum(s is not None for s in ex),
            "export captured": sum(s in ("captured", "captured on retry") for s in ex),
            "TP run": sum(s is not None for s in tp),
            "TP pruned and runs": sum(s == TP_OK for s in tp),
        }
    return out


def reason(row: dict) -> tuple[str, str | None]:
    """``(message, where)`` of a failed row: the underlying message (fxprune's wrapping and advice cut)
    and the Python line a TraceError names (``file.py:N `code```), if any."""
    import re

    text = row.get("error_full") or row.get("error") or row.get("run_error") or row["status"]
    text = " ".join(str(text).split())
    where = None
    m = re.search(r"at (\S+?):(\d+) \((.*?)\): (.*)", text)
    if m:
        where = f"{os.path.basename(m.group(1))}:{m.group(2)} `{_short(m.group(3), 60)}`"
        text = m.group(4)
    elif text.startswith("could not trace module"):
        text = text.split(": ", 1)[-1]
    text = text.split(" Fix: ")[0]
    if text != row["status"] and ":" not in text[:40]:
        text = f"{row['status']}: {text}"
    return text, where


def cause_of(row: dict) -> tuple[str, str | None]:
    """:func:`reason` with quoted names and numbers cut, so that one cause groups many models."""
    import re

    text, where = reason(row)
    key = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "…", text)
    key = re.sub(r"\d+", "N", key)
    return _short(key, 150), where


def failure_causes(rows: dict, names, tool="fxprune", top=12) -> list[tuple[str, int, dict]]:
    """The most common failures of one tool: ``(cause, count, {where: [model, ...]})``, ``where`` the
    Python line a TraceError names ("" when none)."""
    causes = collections.defaultdict(lambda: collections.defaultdict(list))
    for n in names:
        r = rows.get((tool, n))
        if not r or r["status"] in FAILED + ("captured", "captured on retry", TP_OK):
            continue
        key, where = cause_of(r)
        causes[key][where or ""].append(n.partition(":")[2])
    ranked = sorted(causes.items(), key=lambda kv: -sum(map(len, kv[1].values())))[:top]
    return [(k, sum(map(len, v.values())), dict(v)) for k, v in ranked]


def _names(models, n=14):
    return ", ".join(models[:n]) + (f" … ({len(models) - n} more)" if len(models) > n else "")


def _short(text, n=90):
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n] + "…"


def _where_what(row: dict) -> str:
    if not row or row.get("status") is None:
        return ""
    text, where = reason(row)
    return f"{where}: {text}" if where else text


def table(rows: dict, names) -> str:
    from tabulate import tabulate

    c = counts(rows, names)
    version = next((r.get("version") for r in rows.values() if r.get("tool") == "torch-pruning" and r.get("version")),
                   "?")
    commits = sorted({r.get("commit") for (t, n), r in rows.items() if n in names and r.get("commit")})
    out = [f"# fxprune families sweep (ultralytics, Hugging Face, timm, smp, torchvision tasks; L2 magnitude, "
           f"ratio {RATIO})", "",
           "Every model built from its config with random weights (`tools/families.py`), eval mode, batch 1; "
           "each model in its own forked subprocess (`--fork`: the frameworks imported once by the parent), one at a "
           "time, running the three tools in turn, each under a wall-clock limit (`--timeout`: 120 s, 300 s in later "
           "re-runs) and the child "
           "under an address-space limit (8 GB); a child that dies or hangs loses only the tool it was running. "
           "**fxprune**: `fxprune.compile(model, args, method='l2', ratio=0.5)` with mask-equivalence and ONNX "
           "Runtime verification; *verified* = both checks passed, channels removed, outputs finite and of the "
           "original's structure. **export**: `torch.export.export(model, args, kwargs, strict=False)`, retried "
           "once. **Torch-Pruning** " + version + ": `MetaPruner`, `GroupMagnitudeImportance(p=2)`, "
           "`pruning_ratio=0.5`, heads ignored and attention declared as in its examples; *pruned and runs* = "
           "something removed, and the pruned model runs with the original's output structure (no numerical "
           "check). Commits: " + ", ".join(commits) + ".", "", "## Summary", ""]
    head = ["family", "models", "fxprune verified", "all pinned", "fxprune failed (TraceError)", "export captured",
            "Torch-Pruning pruned and runs"]
    body = []
    for fam, k in c.items():
        body.append([fam, k["models"], f"{k['verified']} / {k['fxprune run']}", k["all pinned"],
                     f"{k['failed']} ({k['TraceError']})", f"{k['export captured']} / {k['export run']}",
                     f"{k['TP pruned and runs']} / {k['TP run']}"])
    out += [tabulate(body, headers=head, tablefmt="github"), ""]
    for tool, title in (("fxprune", "fxprune failures"), ("export", "torch.export failures"),
                        ("torch-pruning", "Torch-Pruning failures")):
        causes = failure_causes(rows, names, tool)
        if causes:
            out += [f"### Most common {title} (first line, names and numbers normalised)", ""]
            for k, n, by_where in causes:
                if list(by_where) == [""]:
                    out.append(f"- **{k}** — {n}: {_names(by_where[''])}")
                    continue
                out.append(f"- **{k}** — {n}:")
                out += [f"  - {w or '(no line)'}: {_names(ms)}"
                        for w, ms in sorted(by_where.items(), key=lambda kv: -len(kv[1]))]
            out.append("")
    for fam in families.FAMILIES:
        ns = [n for n in names if family_of(n) == fam]
        if not ns:
            continue
        body = []
        for n in ns:
            f, e, t = (rows.get((tool, n), {}) for tool in TOOLS)
            params = f.get("params") or e.get("params") or t.get("params")
            body.append([
                n.partition(":")[2], " ".join(str(x) for x in (f.get("input") or e.get("input") or [])),
                zoo._m(params), f.get("status", "-"),
                "-" if f.get("groups") is None else f"{f['pinned_groups']}/{f['groups']}",
                "-" if f.get("params_after") is None else zoo._m(f["params_after"]),
                _short(f.get("first_pin") if f.get("status") in FAILED else _where_what(f), 110),
                e.get("status", "-"), zoo._s(e.get("export_s")), _short(e.get("error") and reason(e)[0], 80),
                t.get("status", "-"), "-" if t.get("params_after") is None else zoo._m(t["params_after"]),
                _short(t.get("error") and reason(t)[0], 80)])
        out += [f"## {fam}", "", tabulate(body, headers=[
            "model", "input", "params", "fxprune", "pinned groups", "params after", "fxprune error / first pin",
            "export", "export s", "export error", "Torch-Pruning", "TP params after", "TP error"],
            tablefmt="github"), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(families.FAMILIES),
                   help="comma-separated families: " + ",".join(families.FAMILIES))
    p.add_argument("--models", help="comma-separated catalogue names (family:model); default every model of --families")
    p.add_argument("--skip", default="", help="comma-separated catalogue names to leave out")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools: " + ",".join(TOOLS))
    p.add_argument("--no-tp", action="store_true", help="do not run Torch-Pruning")
    p.add_argument("--missing", action="store_true", help="only (model, tool) pairs not in the cache")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model and tool (default 120)")
    p.add_argument("--mem-mb", type=int, default=8000, help="address-space limit per subprocess, MB (default 8000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at a time (default 1)")
    p.add_argument("--cache", default=CACHE, help="JSON-lines results cache")
    p.add_argument("--out", default=TABLE, help="Markdown table to write")
    p.add_argument("--fork", action="store_true",
                   help="one forked child per model running every tool in turn, from a parent that imported the "
                        "frameworks once (much faster on a loaded machine); default: one fresh process per model and tool")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the cache")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.threads)
        return 0
    fams = [f for f in a.families.split(",") if f]
    names = a.models.split(",") if a.models else families.all_names(fams)
    names = [n for n in names if n not in set(a.skip.split(","))]
    tools = [t for t in a.tools.split(",") if t and not (a.no_tp and t == "torch-pruning")]
    rows = zoo.load_cache(a.cache)
    if not a.table_only and a.fork:
        rows = sweep_forked(names, tools, timeout=a.timeout, mem_mb=a.mem_mb, threads=a.threads, cache=a.cache,
                            missing=a.missing)
    elif not a.table_only:
        for tool in tools:  # one tool over every model, then the next: the first results come early
            todo = [n for n in names if not (a.missing and (tool, n) in rows)]
            if todo:
                rows = zoo.sweep(todo, [tool], timeout=a.timeout, mem_mb=a.mem_mb, threads=a.threads, onnx=True,
                                 cache=a.cache, jobs=a.jobs, script=os.path.abspath(__file__))
    shown = names if a.models else sorted({n for _, n in rows if family_of(n) in fams},
                                          key=lambda n: (families.FAMILIES.index(family_of(n)), n.lower()))
    text = table(rows, shown)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
