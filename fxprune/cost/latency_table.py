"""A measured latency model of ONNX Runtime (CPU), per operator signature.

Three layers:

* :class:`Sig` names one operator instance: a convolution (grouped and depthwise
  included), a Gemm (a linear layer), or a per-element op (SiLU, SE scale, pooling,
  concat). :func:`build_onnx` makes a one-node ONNX model of it with ``onnx.helper``.
* :class:`LatencyTable` times signatures in an ORT ``InferenceSession`` (``threads``
  intra-op threads, all graph optimisations) and caches the results on disk, one JSON file
  per ORT version, CPU and thread count (``$FXPRUNE_CACHE_DIR``, default
  ``~/.cache/fxprune``). A signature's time is the median *kernel* time of its operator
  from ORT's profiler: the layout reorders ORT adds around a blocked (NCHWc) conv are
  recorded apart (in a whole model they sit only where the blocked chain breaks).
* :class:`LatencyModel` is the analogue of :class:`fxprune.cost.CostModel`: it predicts
  the latency (ms) of a plan from a global keep-mask over a ChannelGraph's channels, as a
  sum of per-node curves over kept channel counts, so evaluating a mask is cheap. Grouped
  convs keep their groups and narrow them; the layout reorders ORT puts around ops it runs in
  NCHW (grouped convs off its NCHWc block, SE scales, global pools) are terms of their own, and a
  grouped conv on the block pays for two reorders once a plan's widths leave it.

How counts behave is measured, not assumed: :func:`probe` sweeps a 1x1 conv's input and
output channels and a depthwise conv's channels over ``1..64`` and finds the counts
where the curve steps (the right ends of its plateaus), their period, and how much slower
each residue off a step runs. ORT 1.32 on AVX-512 pads output channels to blocks of 16
and falls back to a plain (im2col) conv when the input channels are not a multiple of
4; on another machine the probe finds another period. Which counts keep a conv in ORT's blocked
layout is asked of ORT's optimiser (:func:`probe_layout`): a conv off it may time as fast alone, but in a
network it breaks the blocked chain. :meth:`LatencyModel.steps` gives a group's fast counts and
:meth:`LatencyModel.fast_count` rounds a count onto one.

Example (a fixed fake table: a conv costs its MACs, channels padded to blocks of 4)::

    >>> import torch, fxprune
    >>> from fxprune.cost.latency_table import LatencyModel, FunctionTable
    >>> def fake(sig):
    ...     pad = lambda c: -(-c // 4) * 4
    ...     if sig.kind == "conv":
    ...         return 1e-6 * pad(sig.cin) * pad(sig.cout) * sig.h * sig.w * sig.kh * sig.kw / sig.groups
    ...     if sig.kind == "chain":      # the probe: c channels between two 1x1 convs
    ...         return 2e-6 * sig.cin * pad(sig.cout) * sig.h * sig.w
    ...     return 0.0
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(16, 8, 1)).eval()
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    >>> lm = LatencyModel(graph, table=FunctionTable(fake))
    >>> round(lm.base, 4)            # (4*16*64*9 + 16*8*64) MACs, times 1e-6 ms
    0.0451
    >>> lm.steps("0")                # the group of conv 0's 16 outputs: blocks of 4
    [4, 8, 12, 16]
    >>> lm.fast_count("0", 9)
    12
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from ..couple.analysis import widths_on_block
from ..errors import ConfigError, FxPruneError
from ..ops import Conv2dSpec, conv2d_spec, is_linear, rule_of
from ..ops.attention import matmul_rule, mha_module, sdpa_rule, swin_attention_rule
from ..ops.norm import layer_norm_rule, rms_norm_rule
from ..ops.shape import STACKS, cat_rule

CACHE_ENV = "FXPRUNE_CACHE_DIR"
PROBE_MAX = 64          # the probe sweeps counts 1..PROBE_MAX
PAD_TOL = 0.1           # a count within 10 % of the next multiple's latency is padded to it
FAST_UNDER = "fast, under the first step"   # a plan's round_to when FastCounts.relaxed met its budget


class LatencyError(FxPruneError):
    """A signature could not be built or timed in ONNX Runtime, or a cache file is unreadable."""


@dataclass(frozen=True)
class Sig:
    """One operator instance. ``kind``: ``"conv"``, ``"gemm"`` (``h`` rows of ``cin`` -> ``cout``),
    ``"reorder"`` (one of ORT's layout reorders of a ``cin x h x w`` tensor, into or out of its
    blocked NCHWc layout), or a per-element op ``"silu"``, ``"sigmoid"``, ``"mul_se"`` (``x * s[N, C, 1, 1]``),
    ``"maxpool"``, ``"avgpool"``, ``"gap"`` (global average pool), ``"concat"`` (of ``groups`` inputs, at
    least two, about equally wide), ``"bn"``
    (a BatchNorm no conv precedes, and its ReLU: a 1x1 depthwise conv, as ORT runs it).
    Shapes are NCHW; ``h, w`` are the input's spatial size. A transformer's ops: ``"ln"``, ``"gelu"``,
    ``"add"`` and ``"transpose"`` over ``h`` tokens of ``cin`` channels (channels last), and ``"attn"``,
    self-attention of ``cin`` heads of ``cout`` dims over ``h`` tokens, ``n`` times (batches, or windows)."""

    kind: str
    n: int = 1
    cin: int = 1
    cout: int = 1
    h: int = 1
    w: int = 1
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    ph: int = 0
    pw: int = 0
    dh: int = 1
    dw: int = 1
    groups: int = 1

    @property
    def key(self) -> str:
        return "|".join(str(v) for v in asdict(self).values())

    @classmethod
    def from_key(cls, key: str) -> "Sig":
        kind, *rest = key.split("|")
        return cls(kind, *(int(v) for v in rest))

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind in ("conv", "maxpool", "avgpool"):
            return ((self.h + 2 * self.ph - self.dh * (self.kh - 1) - 1) // self.sh + 1,
                    (self.w + 2 * self.pw - self.dw * (self.kw - 1) - 1) // self.sw + 1)
        if self.kind == "gap":
            return (1, 1)
        return (self.h, self.w)


ELEMENTWISE = ("silu", "sigmoid", "mul_se", "maxpool", "avgpool", "gap", "concat", "bn")
TOKENWISE = ("ln", "gelu", "add", "transpose")   # over [n, h tokens, cin channels]


def build_onnx(sig: Sig, seed: int = 0) -> bytes:
    """A one-node ONNX model (serialized) of ``sig``, with random weights.

    >>> import onnx
    >>> m = onnx.load_from_string(build_onnx(Sig("conv", cin=8, cout=16, h=14, w=14, kh=3, kw=3, ph=1, pw=1)))
    >>> [n.op_type for n in m.graph.node], [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    (['Conv'], [1, 16, 14, 14])
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    inits, inputs, nodes = [], [], []

    def weight(name, shape):
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(shape)).astype(np.float32), name))

    ho, wo = sig.out_hw
    if sig.kind == "conv":
        if sig.cin % sig.groups or sig.cout % sig.groups:
            raise LatencyError(f"{sig}: channels are not divisible by groups")
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n, sig.cin, sig.h, sig.w]))
        weight("W", (sig.cout, sig.cin // sig.groups, sig.kh, sig.kw))
        weight("B", (sig.cout,))
        nodes.append(helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[sig.kh, sig.kw],
                                      strides=[sig.sh, sig.sw], pads=[sig.ph, sig.pw, sig.ph, sig.pw],
                                      dilations=[sig.dh, sig.dw], group=sig.groups))
        out = [sig.n, sig.cout, ho, wo]
    elif sig.kind == "gemm":
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n * sig.h, sig.cin]))
        weight("W", (sig.cout, sig.cin))
        weight("B", (sig.cout,))
        nodes.append(helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1))
        out = [sig.n * sig.h, sig.cout]
    elif sig.kind in ("chain", "dwchain"):
        # 1x1 conv cin -> cout [-> depthwise 3x3 on cout] -> 1x1 conv cout -> cin: a count in context
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n, sig.cin, sig.h, sig.w]))
        weight("W1", (sig.cout, sig.cin, 1, 1))
        weight("W3", (sig.cin, sig.cout, 1, 1))
        nodes.append(helper.make_node("Conv", ["X", "W1"], ["A"], kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Relu", ["A"], ["B"]))
        mid = "B"
        if sig.kind == "dwchain":
            weight("W2", (sig.cout, 1, 3, 3))
            nodes.append(helper.make_node("Conv", ["B", "W2"], ["C"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                          group=sig.cout))
            nodes.append(helper.make_node("Relu", ["C"], ["D"]))
            mid = "D"
        nodes.append(helper.make_node("Conv", [mid, "W3"], ["Y"], kernel_shape=[1, 1]))
        out = [sig.n, sig.cin, sig.h, sig.w]
    elif sig.kind == "reorder":
        # a blocked (NCHWc) 1x1 conv, an SE-style scale ORT runs in NCHW, a blocked 1x1 conv again: ORT
        # reorders the tensor out of and back into its blocked layout (the table keeps half of that)
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n, sig.cin, sig.h, sig.w]))
        weight("W1", (sig.cin, sig.cin, 1, 1))
        weight("S", (1, sig.cin, 1, 1))
        weight("W2", (sig.cin, sig.cin, 1, 1))
        nodes += [helper.make_node("Conv", ["X", "W1"], ["A"], kernel_shape=[1, 1]),
                  helper.make_node("Mul", ["A", "S"], ["B"]),
                  helper.make_node("Conv", ["B", "W2"], ["Y"], kernel_shape=[1, 1])]
        out = [sig.n, sig.cin, sig.h, sig.w]
    elif sig.kind in TOKENWISE:
        # h tokens of cin channels, channels last (a transformer's tensors): the op over the last axis
        shape = [sig.n, sig.h, sig.cin]
        inputs.append(helper.make_tensor_value_info("X", f32, shape))
        out = shape
        if sig.kind == "ln":
            weight("G", (sig.cin,))
            weight("B", (sig.cin,))
            nodes.append(helper.make_node("LayerNormalization", ["X", "G", "B"], ["Y"], axis=-1))
        elif sig.kind == "gelu":   # the exporter's erf form; ORT fuses it into one Gelu
            for name, value in (("R", 2 ** 0.5), ("One", 1.0), ("Half", 0.5)):
                inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
            nodes += [helper.make_node("Div", ["X", "R"], ["A"]), helper.make_node("Erf", ["A"], ["E"]),
                      helper.make_node("Add", ["E", "One"], ["P"]), helper.make_node("Mul", ["X", "P"], ["M"]),
                      helper.make_node("Mul", ["M", "Half"], ["Y"])]
        elif sig.kind == "transpose":   # a copy into another layout (a permute ORT cannot fold away)
            out = [sig.n, sig.cin, sig.h]
            nodes.append(helper.make_node("Transpose", ["X"], ["Y"], perm=[0, 2, 1]))
        else:   # "add": a residual add of two token tensors
            inputs.append(helper.make_tensor_value_info("X2", f32, shape))
            nodes.append(helper.make_node("Add", ["X", "X2"], ["Y"]))
    elif sig.kind == "attn":
        # self-attention, softmax(q k^T / sqrt(d)) v, over n batches of cin heads of cout dims and h
        # tokens; q, k and v split from one packed projection [n, h, 3 * cin * cout] and the heads
        # joined again after, as the exporter writes nn.MultiheadAttention
        hd, d = sig.cin, sig.cout
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n, sig.h, 3 * hd * d]))
        for name, value in (("S5", [sig.n, sig.h, 3, hd, d]), ("S3", [sig.n, sig.h, hd * d]), ("Ax0", [0])):
            inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
        inits.append(numpy_helper.from_array(np.array(d ** -0.5, dtype=np.float32), "Scale"))
        nodes += [helper.make_node("Reshape", ["X", "S5"], ["R"]),
                  helper.make_node("Transpose", ["R"], ["T"], perm=[2, 0, 3, 1, 4]),
                  helper.make_node("Split", ["T"], ["Q3", "K3", "V3"], axis=0)]
        nodes += [helper.make_node("Squeeze", [f"{a}3", "Ax0"], [a]) for a in "QKV"]
        nodes += [helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["Q", "Kt"], ["L"]), helper.make_node("Mul", ["L", "Scale"], ["Ls"]),
                  helper.make_node("Softmax", ["Ls"], ["P"], axis=-1), helper.make_node("MatMul", ["P", "V"], ["O"]),
                  helper.make_node("Transpose", ["O"], ["Ot"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["Ot", "S3"], ["Y"])]
        out = [sig.n, sig.h, hd * d]
    elif sig.kind in ELEMENTWISE:
        c = sig.cin
        inputs.append(helper.make_tensor_value_info("X", f32, [sig.n, c, sig.h, sig.w]))
        out = [sig.n, c, ho, wo]
        if sig.kind == "silu":
            nodes += [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])]
        elif sig.kind == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", ["X"], ["Y"]))
        elif sig.kind == "bn":
            # a BatchNorm with no conv before it to fold into (DenseNet's, pre-activation blocks'): inside a
            # model ORT runs it, and the ReLU after it, as a blocked 1x1 depthwise conv
            weight("W", (c, 1, 1, 1))
            weight("B", (c,))
            nodes += [helper.make_node("Conv", ["X", "W", "B"], ["N"], kernel_shape=[1, 1], group=c),
                      helper.make_node("Relu", ["N"], ["Y"])]
        elif sig.kind == "mul_se":
            inputs.append(helper.make_tensor_value_info("S", f32, [sig.n, c, 1, 1]))
            nodes.append(helper.make_node("Mul", ["X", "S"], ["Y"]))
        elif sig.kind in ("maxpool", "avgpool"):
            nodes.append(helper.make_node("MaxPool" if sig.kind == "maxpool" else "AveragePool", ["X"], ["Y"],
                                          kernel_shape=[sig.kh, sig.kw], strides=[sig.sh, sig.sw],
                                          pads=[sig.ph, sig.pw, sig.ph, sig.pw]))
        elif sig.kind == "gap":
            nodes.append(helper.make_node("ReduceMean", ["X"], ["Y"], axes=[2, 3], keepdims=1))
        elif sig.kind == "concat":   # c channels from max(2, groups) inputs of about equal width
            k = max(2, min(sig.groups, c))
            a = max(1, c // k)
            widths = [a] * (k - 1) + [max(1, c - a * (k - 1))]
            names = ["X"] + [f"X{i + 2}" for i in range(k - 1)]
            inputs[:] = [helper.make_tensor_value_info(nm, f32, [sig.n, wd, sig.h, sig.w])
                         for nm, wd in zip(names, widths)]
            nodes.append(helper.make_node("Concat", names, ["Y"], axis=1))
            out = [sig.n, sum(widths), sig.h, sig.w]
    else:
        raise LatencyError(f"no ONNX model for signature kind '{sig.kind}'")
    graph = helper.make_graph(nodes, "sig", inputs, [helper.make_tensor_value_info("Y", f32, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def cpu_fingerprint() -> str:
    """A short hash of the CPU model and its feature flags."""
    text = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        text = "\n".join(dict.fromkeys(lines)) or text
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cache_path(threads: int) -> str:
    """``$FXPRUNE_CACHE_DIR/ort-latency-<ort version>-<cpu hash>-<threads>t.json`` (default dir ``~/.cache/fxprune``)."""
    import onnxruntime as ort

    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fxprune")
    return os.path.join(root, f"ort-latency-{ort.__version__}-{cpu_fingerprint()}-{threads}t.json")


class FunctionTable:
    """A table from a function ``fn(sig) -> ms`` (kernel time; no reorders): for tests and doctests.
    ``layout(sig) -> bool`` says which probes ORT would run blocked (:meth:`LatencyTable.blocked_many`);
    without it, every count is."""

    def __init__(self, fn, ms_per_byte: float = 0.0, layout=None):
        self.fn = fn
        self.ms_per_byte = ms_per_byte
        self.layout = layout

    def get_many(self, sigs) -> list[float]:
        return [float(self.fn(s)) for s in sigs]

    def blocked_many(self, sigs) -> list[bool]:
        return [True if self.layout is None else bool(self.layout(s)) for s in sigs]


class LatencyTable:
    """Measured ORT kernel times per :class:`Sig`, cached on disk (see the module docstring).

    ``get_many(sigs)`` times the signatures not cached yet (a tqdm bar when ``progress``),
    saves, and returns their times in ms. ``warmup`` runs, then the median of ``repeats``.

    >>> import os, tempfile
    >>> os.environ["FXPRUNE_CACHE_DIR"] = tempfile.mkdtemp()
    >>> t = LatencyTable(progress=False)
    >>> t.entries["conv|1|8|8|4|4|1|1|1|1|0|0|1|1|1"] = {"ms": 0.01, "reorder_ms": 0.0}
    >>> t.save(); LatencyTable(progress=False).get_many([Sig("conv", cin=8, cout=8, h=4, w=4)])
    [0.01]
    >>> del os.environ["FXPRUNE_CACHE_DIR"]
    """

    def __init__(self, threads: int = 2, *, path: str | None = None, repeats: int = 10, warmup: int = 3,
                 passes: int = 3, progress: bool = True):
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads} must be a positive integer")
        if repeats < 1 or warmup < 0:
            raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
        if passes < 1:
            raise ConfigError(f"passes={passes} must be >= 1")
        self.threads, self.repeats, self.warmup, self.progress = threads, repeats, warmup, progress
        self.passes = passes
        self.path = path or cache_path(threads)
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("format") != "fxprune.ort-latency/1":
                raise ValueError(f"format {data.get('format')!r}")
            return dict(data["entries"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LatencyError(f"the latency cache {self.path} is unreadable ({exc}); delete it to re-measure") from exc

    def save(self) -> None:
        """Merge with what is on disk (another process may have measured too), write atomically."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            merged = {**self._read(), **self.entries}
        except LatencyError:
            merged = dict(self.entries)
        self.entries = merged
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": "fxprune.ort-latency/1", "threads": self.threads, "entries": merged}, f)
        os.replace(tmp, self.path)

    def get_many(self, sigs) -> list[float]:
        sigs = list(sigs)
        missing = list(dict.fromkeys(s for s in sigs if s.key not in self.entries))
        if missing:
            self.measure(missing)
        return [self.entries[s.key]["ms"] for s in sigs]

    def blocked_many(self, sigs) -> list[bool]:
        """For each ``"chain"`` or ``"dwchain"`` signature, whether ORT's optimiser puts the op that reads
        its middle count (the second 1x1 conv of a chain, the depthwise conv of a dwchain) in its blocked
        NCHWc layout: asked of ORT's graph optimiser, not timed, and cached beside the times."""
        sigs = list(sigs)
        keys = [f"layout|{s.key}" for s in sigs]
        missing = [s for s, k in zip(sigs, keys) if k not in self.entries]
        for sig in missing:
            self.entries[f"layout|{sig.key}"] = {"nchwc": optimized_layouts(build_onnx(sig))[1]}
        if missing:
            self.save()
        return [bool(self.entries[k]["nchwc"]) for k in keys]

    def measure(self, sigs) -> None:
        """Time every signature (no cache lookup) in ``passes`` passes over the whole list, keeping each
        one's fastest pass (contention on a shared machine comes in bursts longer than one pass of
        one signature), then save."""
        from tqdm import tqdm

        sigs = list(sigs)
        best: dict[str, dict] = {}
        bar = tqdm(total=len(sigs) * self.passes, desc="ORT latency table", unit="op", disable=not self.progress,
                   leave=False)
        try:
            for _ in range(self.passes):
                for s in sigs:
                    e = self._time(s)
                    old = best.get(s.key)
                    if old is None or e["ms"] + e["reorder_ms"] < old["ms"] + old["reorder_ms"]:
                        best[s.key] = e
                    bar.update()
            self.entries.update(best)
        finally:
            bar.close()
            self.save()

    def _time(self, sig: Sig) -> dict:
        try:
            per_node = profile_session(build_onnx(sig), self.threads, self.repeats, self.warmup)
        except LatencyError as exc:
            raise LatencyError(f"{sig}: {exc}") from exc
        ms = sum(v for (op, _), v in per_node.items() if not op.startswith("Reorder"))
        reorder = sum(v for (op, _), v in per_node.items() if op.startswith("Reorder"))
        if sig.kind == "reorder":   # one reorder: half of the pair around the scale (0 when ORT blocks nothing)
            return {"ms": reorder / 2, "reorder_ms": 0.0}
        return {"ms": ms, "reorder_ms": reorder}


def optimized_layouts(model) -> list[bool]:
    """Whether ONNX Runtime's optimiser (all graph optimisations, CPU) runs each conv of ``model`` (a path or
    serialized ONNX bytes), in graph order, in its blocked NCHWc layout. Asks the optimiser; runs nothing.

        >>> from fxprune.cost.latency_table import Sig, build_onnx, optimized_layouts
        >>> len(optimized_layouts(build_onnx(Sig("chain", cin=64, cout=32, h=8, w=8))))
        2
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise LatencyError(f"ONNX Runtime cannot load the model: {exc}") from exc
        nodes = onnx.load(opts.optimized_model_filepath).graph.node
    return [n.domain.endswith("nchwc") for n in nodes if n.op_type in ("Conv", "FusedConv")]


def profile_session(model, threads: int = 2, repeats: int = 20, warmup: int = 5) -> dict:
    """Run ``model`` (a path or serialized ONNX bytes) in ORT with its profiler on and return
    ``{(op type, node name): ms}``: each node's fastest kernel time over ``repeats`` runs after
    ``warmup`` (other processes on shared cores only ever add time). Summed, it estimates the
    model's latency on a quiet machine."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        try:
            sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise LatencyError(f"ONNX Runtime cannot load the model: {exc}") from exc
        rng = np.random.default_rng(0)
        feed = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
                for i in sess.get_inputs()}
        for _ in range(warmup + repeats):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_node: dict[tuple, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            key = (e.get("args", {}).get("op_name", ""), e["name"][:-len("_kernel_time")])
            per_node.setdefault(key, []).append(e["dur"] / 1e3)
    out = {}
    for key, durs in per_node.items():
        timed = durs[len(durs) * warmup // (warmup + repeats):] or durs
        out[key] = min(timed)
    return out


# ----------------------------------------------------------------------------------------------
# probes: where latency steps along channel counts


@dataclass
class Steps:
    """How one op family's latency behaves along a channel count: ``period`` between fast steps,
    the step residues mod ``period`` and ``slow[r]``: a count ``c`` with ``c % period == r`` costs
    ``slow[r]`` times the next step above it."""

    period: int
    residues: tuple
    slow: tuple

    def up(self, c: int) -> int:
        """The smallest step >= c."""
        p = self.period
        base = (c // p) * p
        for r in sorted(self.residues):
            if base + r >= c and base + r > 0:
                return base + r
        return base + p + min(self.residues)

    def is_step(self, c: int) -> bool:
        return c % self.period in self.residues

    def factor(self, c: int) -> float:
        return self.slow[c % self.period]


FLAT = Steps(1, (0,), (1.0,))

PROBES = {  # family -> signature of count c: c channels between two convs; a depthwise conv of c channels
    "conv": lambda c: Sig("chain", cin=128, cout=c, h=56, w=56),
    "dw": lambda c: Sig("conv", cin=c, cout=c, h=56, w=56, kh=3, kw=3, ph=1, pw=1, groups=c),
}


def edges(curve, tol: float = 0.03) -> list[int]:
    """Counts ``c`` (1-based) after which a latency curve jumps: ``curve[c] - curve[c - 1]`` is more than
    three times the typical (median) step and more than ``tol`` of the typical latency (noise).

    >>> edges([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    [4, 8]
    """
    f = np.asarray(curve, dtype=float)
    d = np.diff(f)
    if d.size == 0:
        return []
    thr = max(3 * float(np.median(np.abs(d))), tol * float(np.median(f)), 1e-12)
    return [c + 1 for c in range(len(d)) if d[c] > thr]


def find_steps(curve, tol: float = 0.03, period: int | None = None) -> Steps:
    """The period of a latency curve over counts ``1..len(curve)`` and how much slower, or faster,
    each residue runs than the next multiple of it (``slow``). The period is the finest power of two
    whose multiples are (75 %) counts after which the curve jumps (:func:`edges`), doubled while the
    multiples in between cost as much as the next multiple of the double (the kernel pads to it):
    ORT's depthwise conv falls back to a slow kernel off multiples of 4 and pads to blocks of 16.
    ``period`` given: the slow-downs of that period (:func:`find_period` of another curve, say).

    >>> find_steps([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]).period   # plateaus of 4
    4
    >>> find_steps([2, 2, 2, 1, 3, 3, 3, 2, 4, 4, 4, 3])           # off multiples of 4: 3/2, 4/3 slower
    Steps(period=4, residues=(0,), slow=(1.0, 1.417, 1.417, 1.417))
    """
    f = np.asarray(curve, dtype=float)
    n = len(f)
    period = find_period(f, tol) if period is None else period
    slow = []
    for r in range(period):
        ups = [(c, -(-c // period) * period) for c in range(period + 1, n + 1) if c % period == r]
        ratios = [f[c - 1] / f[u - 1] for c, u in ups if u <= n]
        slow.append(1.0 if r == 0 or not ratios else float(statistics.median(ratios)))
    return Steps(period, (0,), tuple(round(v, 3) for v in slow))


def find_period(curve, tol: float = 0.03) -> int:
    """:func:`find_steps`'s period of ``curve``.

    >>> find_period([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]), find_period([1, 2, 3, 4, 5, 6, 7, 8])
    (4, 1)
    """
    f = np.asarray(curve, dtype=float)
    n = len(f)
    jumps = set(edges(f, tol))
    period = 1
    for p in (2 ** k for k in range(1, int(math.log2(n)))):   # the finest block whose multiples jump
        mult = list(range(p, n, p))
        if len(mult) >= 2 and sum(m in jumps for m in mult) >= 0.75 * len(mult):
            period = p
            break
    while period > 1 and 2 * period < n:   # coarser while the counts in between cost the next multiple (padding)
        mids = list(range(period, n - period + 1, 2 * period))
        if not all(f[m - 1] >= (1 - PAD_TOL) * f[m + period - 1] for m in mids):
            break
        period *= 2
    return period


def probe(table) -> dict[str, Steps]:
    """Sweep :data:`PROBES` over counts ``1..PROBE_MAX`` in ``table`` and find each family's :class:`Steps`.
    A :class:`FunctionTable` gets them from its function the same way."""
    cached = getattr(table, "_steps", None)
    if cached is not None:
        return cached
    owner = table
    if isinstance(table, LatencyTable) and table.threads != 1:
        # the kernels' block structure does not depend on the thread count, and one thread times it
        # cleanly on a shared machine (two threads need both cores free at once)
        table = LatencyTable(threads=1, progress=table.progress, repeats=table.repeats, warmup=table.warmup,
                             passes=table.passes)
    sigs = {fam: [make(c) for c in range(1, PROBE_MAX + 1)] for fam, make in PROBES.items()}
    times = table.get_many([s for ss in sigs.values() for s in ss])
    entries = getattr(table, "entries", None)
    out, i = {}, 0
    for fam, ss in sigs.items():
        if entries is not None:   # kernels and reorders: a count off a block pays for the reorders around it
            kernels = [entries[s.key]["ms"] for s in ss]
            curve = [k + entries[s.key].get("reorder_ms", 0.0) for k, s in zip(kernels, ss)]
            # the block shows in the kernels' plateaus, and in the reorders a count off it pays; reorders
            # can also step on a pattern of their own (one thread, on some CPUs: multiples of 4 pay more)
            # and hide the block from the sum: where the sum shows no period, the kernels' is the block
            period = find_period(curve)
            out[fam] = find_steps(curve, period=period if period > 1 else find_period(kernels))
        else:
            out[fam] = find_steps(times[i:i + len(ss)])
        i += len(ss)
    owner._steps = out
    return out


@dataclass(frozen=True)
class Layout:
    """Which counts ``c`` of one op family's input ORT runs in its blocked NCHWc layout: ``blocked[c - 1]``
    for ``c = 1..len(blocked)``, and past the probe the pattern of its upper half repeated. A count off the
    layout breaks ORT's blocked chain there (reorders around the op, residual adds no longer fused into the
    conv before them), which an op timed alone does not show.

        >>> lay = Layout(tuple(c <= 4 or c % 4 == 0 for c in range(1, 33)))
        >>> [c for c in range(1, 13) if not lay(c)], lay(100), lay(101)
        ([5, 6, 7, 9, 10, 11], True, False)
    """

    blocked: tuple

    def __call__(self, c: int) -> bool:
        n = len(self.blocked)
        if c <= n:
            return bool(self.blocked[c - 1])
        half = self.blocked[n // 2:]
        period = next(p for p in range(1, len(half) + 1)
                      if all(half[i] == half[i - p] for i in range(p, len(half))))
        return bool(self.blocked[n - 1 - ((n - c) % period)])


@lru_cache(maxsize=None)
def nchwc_block() -> int | None:
    """ORT's NCHWc block on this machine (16 channels on AVX-512, 8 on AVX2; None where its optimiser blocks
    no conv): the narrowest width per group at which it runs a grouped conv in its blocked layout, asked of
    the optimiser (:func:`optimized_layouts`), once per process. The 1x1 chain's timing can show a coarser
    period than the layout's block (on AVX2 its kernels step every 16 while groups of 8 run blocked).

        >>> nchwc_block() in (None, 4, 8, 16, 32, 64)
        True
    """
    for width in (4, 8, 16, 32, 64):
        sig = Sig("conv", cin=4 * width, cout=4 * width, h=8, w=8, kh=3, kw=3, ph=1, pw=1, groups=4)
        if optimized_layouts(build_onnx(sig))[0]:
            return width
    return None


LAYOUT_PROBES = {  # family -> signature whose op reading count c is the one asked about
    "conv": PROBES["conv"],
    "dw": lambda c: Sig("dwchain", cin=128, cout=c, h=56, w=56),
}


def probe_layout(table) -> dict[str, Layout]:
    """The :class:`Layout` of each of :data:`LAYOUT_PROBES`' families over counts ``1..PROBE_MAX``: the input
    count of a dense conv, and a depthwise conv's count. A :class:`FunctionTable` knows none (all blocked).
    ORT 1.32 on AVX-512 runs a 1x1 or 3x3 conv blocked when its input has at most 16 channels or a multiple
    of 4, and a depthwise conv when its count is a multiple of 4."""
    cached = getattr(table, "_layouts", None)
    if cached is None:
        cached = {fam: Layout(tuple(table.blocked_many([make(c) for c in range(1, PROBE_MAX + 1)])))
                  for fam, make in LAYOUT_PROBES.items()}
        table._layouts = cached
    return cached


# ----------------------------------------------------------------------------------------------
# the model


def _channels_along(node, dim, shape) -> np.ndarray:
    """Global channel ids of ``node``'s value along ``dim`` (-1 = fixed); along several dims (a tuple:
    a grid of heads x dims per head), flattened."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    lab = node.meta.get("fxprune") if hasattr(node, "meta") else None
    size = math.prod(shape[d] for d in dims)
    if not isinstance(lab, torch.Tensor) or lab.dim() == 0:
        return np.full(size, -1, dtype=np.int64)
    lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape)).expand(tuple(shape))
    idx = [0] * len(shape)
    for d in dims:
        idx[d] = slice(None)
    return lab[tuple(idx)].reshape(-1).numpy().astype(np.int64)


class _Count:
    """Kept positions of a channel-id vector under a keep mask."""

    __slots__ = ("fixed", "ids", "size")

    def __init__(self, ids: np.ndarray):
        self.size = len(ids)
        self.fixed = int((ids < 0).sum())
        self.ids = ids[ids >= 0]

    def __call__(self, keep) -> int:
        return self.fixed + (int(np.count_nonzero(keep[self.ids])) if self.ids.size else 0)

    @property
    def free(self) -> bool:
        return self.ids.size > 0


def _grid(size: int, steps: Steps, k: int) -> list[int]:
    """``k`` counts from the first step to the step at or above ``size``, all on steps (or ``[size]``)."""
    top = steps.up(size)
    lo = steps.up(1)
    pts = {int(v) for v in np.linspace(lo, top, k)}
    return sorted({steps.up(p) if p < top else top for p in pts})


def _interp(x: float, xs: list[int]) -> tuple[int, int, float]:
    if len(xs) == 1:
        return 0, 0, 0.0
    j = int(np.clip(np.searchsorted(xs, x), 1, len(xs) - 1))
    return j - 1, j, (x - xs[j - 1]) / (xs[j] - xs[j - 1])


class _Term:
    """One node's latency as a function of its kept input/output counts."""

    def __init__(self, name, kind, cin: _Count, cout: _Count, make, steps_in: Steps, steps_out: Steps,
                 grid: int, weights_per_pair: float = 0.0):
        self.name, self.kind, self.cin, self.cout, self.make = name, kind, cin, cout, make
        self.sin = steps_in if cin.free else FLAT
        self.sout = steps_out if cout.free else FLAT
        self.xs = _grid(cin.size, self.sin, grid) if cin.free else [cin.size]
        self.ys = _grid(cout.size, self.sout, grid) if cout.free else [cout.size]
        self.weights_per_pair = weights_per_pair   # weight bytes per (input, output) count pair
        self.ms_per_byte = 0.0
        self.values = None

    def sigs(self):
        return [self.make(x, y) for x in self.xs for y in self.ys]

    def fill(self, times, ms_per_byte: float = 0.0):
        v = np.asarray(times, dtype=float).reshape(len(self.xs), len(self.ys))
        # latency does not fall as counts grow along a grid of steps, and contention only adds time:
        # each point is the fastest of itself and every point with more channels
        v = np.minimum.accumulate(np.minimum.accumulate(v[::-1, ::-1], axis=0), axis=1)[::-1, ::-1]
        self.values = v
        self.ms_per_byte = ms_per_byte

    def at(self, ci: int, co: int) -> float:
        x = self.sin.up(ci) if self.cin.free else ci
        y = self.sout.up(co) if self.cout.free else co
        i0, i1, a = _interp(x, self.xs)
        j0, j1, b = _interp(y, self.ys)
        v = self.values
        base = ((1 - a) * ((1 - b) * v[i0, j0] + b * v[i0, j1]) + a * ((1 - b) * v[i1, j0] + b * v[i1, j1]))
        # linear extrapolation below the first grid point (fewer channels than the smallest step)
        slow = max(self.sin.factor(ci) if self.cin.free else 1.0, self.sout.factor(co) if self.cout.free else 1.0)
        # the table times an op with its weights hot in cache; in a model they stream from memory
        stream = self.ms_per_byte * self.weights_per_pair * max(ci, 1) * max(co, 1)
        return max(base, 0.0) * slow + stream

    def __call__(self, keep) -> float:
        return self.at(self.cin(keep), self.cout(keep))


def _per_count(name: str, kind: str, count: _Count, make, grid: int) -> _Term:
    """A term whose time follows one count (a per-element op's channels): ``make(count) -> Sig`` measured at the
    full and half count, interpolated between."""
    term = _Term(name, kind, count, _Fixed(0), lambda x, y: make(x), FLAT, FLAT, grid)
    term.xs = sorted({max(1, count.size // 2), count.size}) if count.free else [count.size]
    return term


class _OffBlock:
    """A reorder that ORT adds around a grouped conv blocked at full width (:func:`_conv_layout`) only
    when its kept widths per group leave the block: then the conv runs in NCHW and the value is
    reordered out of (its input) or back into (its output) the blocked layout. Costs ``reorder``'s time
    then, nothing otherwise."""

    def __init__(self, reorder: _Term, conv: _Term):
        self.inner, self.conv = reorder, conv
        self.name, self.kind, self.cin, self.cout = reorder.name, reorder.kind, reorder.cin, reorder.cout
        self.sin, self.sout, self.xs, self.ys = reorder.sin, reorder.sout, reorder.xs, reorder.ys

    def sigs(self):
        return self.inner.sigs()

    def fill(self, times, ms_per_byte: float = 0.0):
        self.inner.fill(times, ms_per_byte)

    def __call__(self, keep) -> float:
        groups, block = self.conv.on_block
        return 0.0 if _on_block(self.conv.cin(keep), self.conv.cout(keep), groups, block) else self.inner(keep)


STREAM_SIG = Sig("gemm", cin=4096, cout=4096)   # 64 MiB of weights: read from memory on every run


def ms_per_weight_byte(table) -> float:
    """Time to stream one byte of weights from memory: a matrix-vector product over 64 MiB of
    weights, larger than the caches (a :class:`FunctionTable` sets ``ms_per_byte``, default 0)."""
    if not isinstance(table, LatencyTable):
        return float(getattr(table, "ms_per_byte", 0.0))
    (ms,) = table.get_many([STREAM_SIG])
    return ms / (4 * STREAM_SIG.cin * STREAM_SIG.cout)


def _folded(src, mods) -> bool:
    """Whether ORT folds a BatchNorm reading ``src`` into the conv that makes ``src`` (its only reader)."""
    return getattr(src, "op", None) in ("call_module", "call_function") and conv2d_spec(src, mods) is not None \
        and len(src.users) == 1


class LatencyModel:
    """Predict the ORT CPU latency (ms) of a pruned model from a global keep-mask.

    The analogue of :class:`fxprune.cost.CostModel`. For each conv / linear node it reads the
    channel ids of its input and output (``node.meta["fxprune"]``), measures the node's
    signature on a grid of kept counts on the table's fast steps (``grid`` points per free
    dimension, all in one batch up front), and interpolates; a count off a step costs the
    probe's slow-down (or speed-up) for its residue. Weights stream from memory in a model but
    sit in cache when one op is timed alone: each conv / linear adds its kept weight bytes times
    :func:`ms_per_weight_byte`. SiLU, SE scales, pooling and concat cost a per-element term
    measured at the full and half channel count. ORT folds BN and fuses ReLU / hard-swish and
    residual adds into the convs: they cost nothing here; a BatchNorm with no conv before it to fold
    into (DenseNet's, pre-activation blocks') costs a per-element ``"bn"`` term. In a transformer, layer
    norms, GELUs and residual adds over tokens cost a per-element term each, and an attention node
    (``nn.MultiheadAttention``, torchvision's ``shifted_window_attention``, ``scaled_dot_product_attention``)
    costs its attention (``"attn"``: heads kept, their dims narrowed) and the projections inside it; a
    permute that ORT copies costs its elements. A grouped conv keeps its groups and narrows them (the
    coupling balances its channels over them): its signature has the kept input and output widths per
    group. ORT runs grouped convs off its NCHWc block (:attr:`block`, asked of its optimiser, :func:`nchwc_block`;
    :func:`_conv_layout`), SE scales and global pools in NCHW between its blocked
    convs: every value it reorders (:func:`reordered`) costs a measured ``"reorder"`` term. A grouped
    conv on the block is blocked until a plan's widths per group leave it: then its input and output
    cost a reorder each (:class:`_OffBlock`), and its groups' fast counts keep it on the block.
    ``latency(keep)`` sums the node curves.
    """

    def __init__(self, graph, *, batch: int = 1, threads: int = 2, table=None, grid: int = 5,
                 progress: bool = True):
        if grid < 2:
            raise ConfigError(f"grid={grid} must be at least 2")
        self.table = table if table is not None else LatencyTable(threads=threads, progress=progress)
        self.graph = graph
        self.batch = batch
        steps = probe(self.table)
        self.family_steps = steps
        self.layouts = probe_layout(self.table)
        # ORT's NCHWc block, asked of its optimiser (a table of fake times: its 1x1 chain's period)
        self.block = nchwc_block() if isinstance(self.table, LatencyTable) else steps["conv"].period
        mods = dict(graph.module.named_modules())
        self._dw_ids = self._depthwise_channels(graph, mods)
        terms = []
        for node in graph.module.graph.nodes:
            term = self._term(node, mods, steps, grid)
            if isinstance(term, list):   # an attention node: its projections and attention
                terms += term
            elif term is not None:
                terms.append(term)
                if getattr(term, "on_block", None):   # reordered only once its widths leave the block
                    terms += [_OffBlock(self._per_element(v, "reorder", grid, name=f"{v.name}.off_block"), term)
                              for v in (node.args[0], node)]
        terms += [self._per_element(v, "reorder", grid, name=f"{v.name}.reorder")
                  for v in reordered(graph, mods, self.block)]
        sigs = [s for t in terms for s in t.sigs()]
        times = self.table.get_many(sigs)
        self.ms_per_byte = ms_per_weight_byte(self.table)
        i = 0
        for t in terms:
            n = len(t.xs) * len(t.ys)
            t.fill(times[i:i + n], self.ms_per_byte)
            i += n
        self.terms = terms
        # depthwise convs over a slice of a group (a mixed-kernel conv's chunks): their channel sets; and
        # the whole inputs of dense convs (Res2Net's chunks, each read by a 3x3 conv of its own)
        self._dw_sets = {np.sort(t.cout.ids).tobytes(): t.cout.ids.size for t in terms
                         if t.kind == "dw" and t.cout.free}
        self._conv_inputs = {np.sort(t.cin.ids).tobytes(): t.cin.ids.size for t in terms
                             if t.kind == "conv" and t.cin.free and not t.cin.fixed}
        self.base = self.latency(np.ones(graph.num_channels, dtype=bool))

    # -- building ------------------------------------------------------------------------------
    def _term(self, node, mods, steps, grid):
        meta = node.meta.get("tensor_meta")
        shape = tuple(getattr(meta, "shape", ()) or ())
        n = self.batch
        inp = node.args[0] if node.args else None
        in_shape = tuple(getattr(getattr(inp, "meta", {}).get("tensor_meta"), "shape", ()) or ())
        spec = conv2d_spec(node, mods)   # a module, F.conv2d (timm's "same" padding) or ATen's (torch.export)
        if spec is not None:
            return self._conv(node, spec, inp, in_shape, shape, steps, grid) \
                if len(in_shape) == 4 and len(shape) == 4 else None
        if is_linear(node, mods) and len(in_shape) >= 2 and len(shape) >= 2:
            rows = int(np.prod(in_shape[:-1])) // max(1, in_shape[0])
            cin = _Count(_channels_along(inp, len(in_shape) - 1, in_shape))
            cout = _Count(_channels_along(node, len(shape) - 1, shape))
            return _Term(node.name, "gemm", cin, cout, lambda x, y: Sig("gemm", n=n, cin=x, cout=y, h=rows),
                         FLAT, FLAT, grid, 4.0)
        couple = _couple(node, mods)   # the op, by its row in the rules tables
        attention = self._attention(node, couple, mods, grid)
        if attention is not None:
            return attention
        token = self._token_kind(node, couple, mods, shape)
        if token is not None:
            return self._per_token(node, token, grid)
        if _is_permute(node) and len(shape) >= 3:
            return self._permute(node, mods, shape, grid)
        if node.op == "call_module":
            mod = mods.get(node.target)
            if isinstance(mod, torch.nn.BatchNorm2d) and len(shape) == 4 and not _folded(inp, mods):
                return self._per_element(node, "bn", grid, name=node.name)
            kind = self._elementwise_module(mod, shape)
        elif node.op == "call_function":
            kind = self._elementwise_function(node, shape)
        else:
            kind = None
        if kind is None or len(shape) != 4:
            return None
        src = node.args[0] if kind in ("maxpool", "avgpool", "gap") else node
        extra = {}
        if kind in ("maxpool", "avgpool"):
            mod = mods.get(node.target)
            k, s, p = (_pair(getattr(mod, a)) for a in ("kernel_size", "stride", "padding"))
            extra = dict(kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0], pw=p[1])
        if kind == "concat":   # each input costs a copy of its own: DenseNet joins up to 49
            parts = node.args[0] if node.args else ()
            if isinstance(parts, (list, tuple)) and len(parts) > 2:
                extra = dict(groups=len(parts))
        return self._per_element(src, kind, grid, name=node.name, **extra)

    def _per_element(self, src, kind: str, grid: int, *, name: str, **extra):
        """A per-element term over ``src``'s channels: measured at the full and half kept count."""
        n = self.batch
        src_shape = tuple(src.meta["tensor_meta"].shape)
        h, w = src_shape[2], src_shape[3]
        return _per_count(name, kind, _Count(_channels_along(src, 1, src_shape)),
                          lambda x: Sig(kind, n=n, cin=x, h=h, w=w, **extra), grid)

    def _per_token(self, node, kind: str, grid: int):
        """A per-element term over a token tensor ``[..., channels]`` (``kind`` in :data:`TOKENWISE`):
        its rows of kept channels, measured at the full and half count."""
        shape = tuple(node.meta["tensor_meta"].shape)
        rows = math.prod(shape[:-1]) // max(1, shape[0])
        return _per_count(node.name, kind, _Count(_channels_along(node, len(shape) - 1, shape)),
                          lambda x: Sig(kind, n=self.batch, cin=x, h=rows), grid)

    def _permute(self, node, mods, shape, grid):
        """A permute or transpose that ORT runs as a copy (one whose readers are all matrix products it folds
        into them is free): every element moved once, the kept ones of its channels."""
        if node.users and all(_couple(u, mods) in (matmul_rule, sdpa_rule) for u in node.users):
            return None
        lab = node.meta.get("fxprune")
        lead = len(shape) - lab.dim() if isinstance(lab, torch.Tensor) else len(shape)   # labels align right
        dims = tuple(d for d in range(max(0, lead), len(shape)) if lab.shape[d - lead] > 1) if lead >= 0 else ()
        c = _Count(_channels_along(node, dims, shape)) if dims else _Fixed(1)
        rows = math.prod(shape) // max(1, shape[0] * c.size)
        return _per_count(node.name, "transpose", c, lambda x: Sig("transpose", n=self.batch, cin=x, h=rows), grid)

    @staticmethod
    def _token_kind(node, couple, mods, shape):
        """``"ln"``, ``"gelu"`` or ``"add"`` for a layer norm (or RMSNorm), or a GELU or add of two same-shaped values over
        tokens: channels on the last dim (a 3-D value, or the channel ids say so). ORT fuses a conv net's
        adds into its convs; these it runs alone."""
        if len(shape) < 3:
            return None
        if couple in (layer_norm_rule, rms_norm_rule):  # ORT runs RMSNorm as a layer norm without the mean
            kind = "ln"
        elif node.op == "call_module":
            kind = "gelu" if isinstance(mods.get(node.target), torch.nn.GELU) else None
        else:
            kind = _TOKEN_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if kind is None or kind != "ln" and len(shape) != 3 and \
                not (_channels_along(node, len(shape) - 1, shape) >= 0).any():
            return None
        if kind == "add":
            values = [a for a in node.args[:2] if hasattr(a, "meta") and "tensor_meta" in a.meta]
            if len(values) != 2 or any(tuple(v.meta["tensor_meta"].shape) != shape for v in values):
                return None
        return kind

    def _attention(self, node, couple, mods, grid):
        """The terms of a self-attention node, or None: ``nn.MultiheadAttention`` (its packed input
        projection, attention and output projection), torchvision's ``shifted_window_attention`` (the
        same per window) or ``scaled_dot_product_attention`` (the attention alone: its projections are
        linears of their own). Heads stay; the kept dims per head are the kept channels over the heads."""
        n = self.batch
        inp = node.args[0] if node.args else None
        shape = tuple(getattr(getattr(inp, "meta", {}).get("tensor_meta"), "shape", ()) or ())
        if not shape:
            return None
        if couple is mha_module:
            mha = mods[node.target]
            if len(shape) != 3 or any(a is not inp for a in node.args[1:3]):
                return None
            heads, tokens = mha.num_heads, shape[1] if mha.batch_first else shape[0]
            windows = 1
        elif couple is swin_attention_rule:
            if len(shape) != 4:
                return None
            window = node.args[4] if len(node.args) > 4 else node.kwargs.get("window_size")
            heads = node.args[5] if len(node.args) > 5 else node.kwargs.get("num_heads")
            if not isinstance(heads, int) or not isinstance(window, (list, tuple)) or len(window) != 2 or \
                    not all(isinstance(w, int) for w in window):
                return None
            tokens = window[0] * window[1]
            windows = math.ceil(shape[1] / window[0]) * math.ceil(shape[2] / window[1])
        elif couple is sdpa_rule and len(shape) >= 4:
            heads, tokens = shape[-3], shape[-2]
            kept = _Count(_channels_along(inp, tuple(range(1, len(shape) - 2)) + (len(shape) - 1,), shape))
            batches = math.prod(shape[1:-3])
            return _Term(node.name, "attn", _Fixed(0), kept, lambda x, y: Sig(
                "attn", n=n * batches, cin=heads, cout=max(1, math.ceil(y / (heads * batches))), h=tokens),
                FLAT, FLAT, grid)
        else:
            return None
        c = _Count(_channels_along(inp, len(shape) - 1, shape))
        rows = windows * tokens
        return [_Term(f"{node.name}.in_proj", "gemm", c, c, lambda x, y: Sig("gemm", n=n, cin=x, cout=3 * y, h=rows),
                      FLAT, FLAT, grid, 12.0),
                _Term(f"{node.name}.attn", "attn", _Fixed(0), c, lambda x, y: Sig(
                    "attn", n=n * windows, cin=heads, cout=max(1, math.ceil(y / heads)), h=tokens), FLAT, FLAT, grid),
                _Term(f"{node.name}.out_proj", "gemm", c, c, lambda x, y: Sig("gemm", n=n, cin=x, cout=y, h=rows),
                      FLAT, FLAT, grid, 4.0)]

    def _conv(self, node, spec, inp, in_shape, shape, steps, grid):
        n = self.batch
        cin = _Count(_channels_along(inp, 1, in_shape))
        cout = _Count(_channels_along(node, 1, shape))
        g = spec.groups
        kh, kw = spec.kernel_size
        sh, sw = spec.stride
        ph, pw = spec.padding
        dh, dw = spec.dilation
        h, w = in_shape[2], in_shape[3]
        geo = dict(n=n, h=h, w=w, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw)
        if g == 1:
            # a depthwise conv's channels off its block make ORT's convs around it fall back too
            # (measured in whole models): they take the depthwise probe's slow-downs
            s_in = steps["dw"] if np.isin(cin.ids, self._dw_ids).any() else steps["conv"]
            s_out = steps["dw"] if np.isin(cout.ids, self._dw_ids).any() else steps["conv"]
            return _Term(node.name, "conv", cin, cout, lambda x, y: Sig("conv", cin=x, cout=y, **geo),
                         s_in, s_out, grid, 4.0 * kh * kw)
        if g == cin.size == cout.size:   # depthwise: one count
            return _Term(node.name, "dw", _Fixed(0), cout, lambda x, y: Sig("conv", cin=y, cout=y, groups=y, **geo),
                         FLAT, steps["dw"], grid, 4.0 * kh * kw)
        # grouped: the coupling balances a grouped conv's channels over its groups (every group keeps
        # the same width, fxprune.labels), so the groups stay and their widths shrink: kept counts are
        # multiples of g, on both sides (ORT runs it as one im2col + GEMM per group: its time follows
        # the input width far more than the FLOPs)
        if cin.size == g:   # one input channel per group (a channel multiplier): groups go whole
            mult = cout.size // g
            return _Term(node.name, "grouped", cin, _Fixed(0),
                         lambda x, y: Sig("conv", cin=x, cout=x * mult, groups=x, **geo), FLAT, FLAT, grid,
                         4.0 * kh * kw * mult)
        if "fxprune_group_width" in node.meta and cin.free:   # whole groups: fewer groups, each as wide
            k_in, k_out = node.meta["fxprune_group_width"]
            return _Term(node.name, "grouped", cin, _Fixed(0),
                         lambda x, y: Sig("conv", cin=_up(x, k_in), cout=_up(x, k_in) // k_in * k_out,
                                          groups=_up(x, k_in) // k_in, **geo),
                         Steps(k_in, (0,), (1.0,) * k_in), FLAT, grid, 4.0 * kh * kw * k_out)
        per_group = Steps(g, (0,), (1.0,) * g)
        term = _Term(node.name, "grouped", cin, cout,
                     lambda x, y: Sig("conv", cin=_up(x, g), cout=_up(y, g), groups=g, **geo),
                     per_group, per_group, grid, 4.0 * kh * kw / g)
        # ORT runs it blocked (NCHWc) while its widths per group are multiples of the block, and in NCHW
        # between reorders once they are not (regnet_x_400mf's 16 per group cut to 8: 45 reorders, not 1)
        term.on_block = (g, self.block) if _conv_layout(spec, self.block) == "blocked" else None
        return term

    @staticmethod
    def _depthwise_channels(graph, mods) -> np.ndarray:
        ids = []
        for node in graph.module.graph.nodes:
            spec = conv2d_spec(node, mods)
            meta = node.meta.get("tensor_meta")
            if spec is not None and meta is not None and spec.groups > 1 and \
                    spec.groups == spec.in_channels == spec.out_channels:
                ch = _channels_along(node, 1, tuple(meta.shape))
                ids.append(ch[ch >= 0])
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _elementwise_module(mod, shape):
        if isinstance(mod, torch.nn.SiLU):
            return "silu"
        if isinstance(mod, torch.nn.Sigmoid) and len(shape) == 4 and shape[2] * shape[3] > 1:
            return "sigmoid"
        if isinstance(mod, torch.nn.MaxPool2d):
            return "maxpool"
        if isinstance(mod, torch.nn.AvgPool2d):
            return "avgpool"
        if isinstance(mod, torch.nn.AdaptiveAvgPool2d) and len(shape) == 4 and shape[2] == shape[3] == 1:
            return "gap"
        return None

    @staticmethod
    def _elementwise_function(node, shape):
        if _couple(node, {}) is cat_rule and node.target not in STACKS:   # every spelling of cat, by its row
            return "concat"
        kind = _ELEMENTWISE_FUNCTIONS.get(node.target)
        if kind == "silu":
            return kind
        if kind == "sigmoid" and len(shape) == 4 and shape[2] * shape[3] > 1:
            return "sigmoid"
        if kind == "gap" and len(shape) == 4 and shape[2] == shape[3] == 1:
            return "gap"
        if kind == "mul" and len(shape) == 4:
            others = [a for a in node.args if hasattr(a, "meta") and "tensor_meta" in a.meta]
            if any(tuple(a.meta["tensor_meta"].shape)[2:] == (1, 1) for a in others) and shape[2] * shape[3] > 1:
                return "mul_se"
        return None

    # -- evaluating ----------------------------------------------------------------------------
    def latency(self, keep) -> float:
        """Predicted latency (ms) of the model that keeps the channels set in ``keep``."""
        keep = np.asarray(keep, dtype=bool)
        return float(sum(t(keep) for t in self.terms))

    def node_latency(self, keep) -> dict[str, float]:
        keep = np.asarray(keep, dtype=bool)
        return {t.name: t(keep) for t in self.terms}

    def group_curve(self, group: str, keep=None) -> np.ndarray:
        """Latency (ms) with ``n = 1..size`` channels of ``group`` kept (its first n), the rest as ``keep``.

        A group of balanced blocks (``g.blocks``, ``[B, k]``: a grouped conv's channels) keeps the same
        count in every block: its curve is over per-block counts ``j = 1..k`` (``B * j`` kept, each
        block its first ``j``)."""
        g = self.graph.groups.get(group)
        if g is None:
            raise ConfigError(f"no group '{group}' in this model")
        keep = np.ones(self.graph.num_channels, dtype=bool) if keep is None else np.array(keep, dtype=bool)
        off = self.graph.offsets[group]
        touching = self._touching(group)
        blocks = getattr(g, "blocks", None)
        rows = off + (blocks.numpy() if blocks is not None else np.arange(g.size)[None, :])
        out = np.zeros(rows.shape[1])
        for n in range(1, rows.shape[1] + 1):
            keep[rows] = False
            keep[rows[:, :n]] = True
            out[n - 1] = sum(t(keep) for t in touching)
        return out

    def _touching(self, group: str) -> list:
        g = self.graph.groups.get(group)
        if g is None:
            raise ConfigError(f"no group '{group}' in this model")
        off = self.graph.offsets[group]
        ids = np.arange(off, off + g.size)
        return [t for t in self.terms if any(c.free and np.isin(c.ids, ids).any() for c in (t.cin, t.cout))]

    def steps(self, group: str, keep=None) -> list[int]:
        """Fast counts of ``group``: those after which its latency curve jumps (:func:`edges`), and its size;
        every count when the curve has no jumps. A group of ``B`` balanced blocks (a grouped conv's
        channels) keeps whole rows: its steps are ``B * j`` for the per-block counts ``j`` at which every
        conv around runs its blocked kernel (:meth:`_blocked_at`; regnet_y_400mf's 13 groups of 8: 4 or 8
        per group), and its size."""
        cached = self.__dict__.setdefault("_steps", {})
        if keep is None and group in cached:
            return cached[group]
        f = self.group_curve(group, keep)
        blocks = getattr(self.graph.groups[group], "blocks", None)
        if blocks is not None:
            # per-block counts whose totals every conv around runs on its blocked kernel (a residue
            # of the probe that costs what the next multiple does: padded, not a fallback that breaks
            # ORT's NCHWc chain and un-fuses the residual adds after it); every count if none is
            b = blocks.shape[0]
            per = [j for j in range(1, len(f)) if self._blocked_at(group, j)] + [len(f)]
            # a grouped conv blocked at full width: only its blocked widths, even when that is the full one
            strict = any(getattr(t, "on_block", None) for t in self._touching(group))
            out = [b * j for j in (per if len(per) > 1 or strict else range(1, len(f) + 1))]
        else:
            period = max([t.sin.period for t in self._touching(group) if t.cin.free] +
                         [t.sout.period for t in self._touching(group) if t.cout.free] + [1])
            # the block counts positions; a channel tied over several (a GroupNorm's group, a whole head)
            # fills that many: its counts on the block are multiples of period / gcd(period, width)
            period //= math.gcd(period, self._width(group))
            # jumps of the curve on the measured block (a jump inside a block is a fallback kernel
            # winning in the probe's isolated chain, not something to aim for in a deep network)
            out = [c for c in edges(f, tol=0.0) if c < len(f) and c % period == 0] + [len(f)]
            if len(out) == 1:   # a smooth curve: every multiple of the block runs as well as any other
                out = sorted({c for c in range(period, len(f) + 1, period)} | {len(f)})
        if keep is None:
            cached[group] = out
        return out

    def _width(self, group: str) -> int:
        """Positions per channel of ``group`` in the values its terms read (1 unless channels were tied
        over several positions; the smallest where terms differ)."""
        g = self.graph.groups[group]
        ids = np.arange(self.graph.offsets[group], self.graph.offsets[group] + g.size)
        widths = [int(np.isin(c.ids, ids).sum()) // g.size for t in self._touching(group) for c in (t.cin, t.cout)
                  if c.free and np.isin(c.ids, ids).any()]
        return max(1, min(widths, default=1))

    def _blocked_at(self, group: str, per: int, timed: bool = True) -> bool:
        """Whether every conv touching ``group`` (balanced blocks, ``per`` kept in each, the rest whole; a
        group without blocks is one block) sees a channel count ORT runs on its blocked (NCHWc) kernel.
        Two measurements tell: the depthwise probe's times (off its steps, a fallback several times slower)
        and ORT's optimiser (:func:`probe_layout`: the counts it keeps in the blocked layout). A conv off the
        layout can be as fast in isolation, but in a network it breaks the NCHWc chain: reorders around
        it, and the residual add after it no longer fused into the conv (regnet_y_400mf with 13 groups of
        5: 13 of its 16 adds and their ReLUs run as ops of their own). ``timed=False`` asks the optimiser only."""
        cached = self.__dict__.setdefault("_blocked", {})
        if (group, per, timed) not in cached:
            cached[group, per, timed] = self._check_blocked(group, per, timed)
        return cached[group, per, timed]

    def _check_blocked(self, group: str, per: int, timed: bool) -> bool:
        g = self.graph.groups[group]
        off = self.graph.offsets[group]
        ids = np.arange(off, off + g.size)
        keep = np.ones(self.graph.num_channels, dtype=bool)
        rows = g.blocks.numpy() if getattr(g, "blocks", None) is not None else np.arange(g.size)[None, :]
        keep[(off + rows)[:, per:]] = False
        dw = self.family_steps["dw"]
        full = np.ones(self.graph.num_channels, dtype=bool)
        for t in self._touching(group):
            if getattr(t, "on_block", None) and not _on_block(t.cin(keep), t.cout(keep), *t.on_block):
                return False
            if t.kind not in ("conv", "dw"):
                continue
            layout = self.layouts["dw" if t.kind == "dw" else "conv"]
            for count in (t.cin, t.cout):
                if not (count.free and np.isin(count.ids, ids).any()):
                    continue
                if timed and abs(dw.factor(count(keep)) - 1.0) > PAD_TOL:
                    return False
                # ORT's layout follows a conv's input count (a dense conv pads its output to the block)
                if (count is t.cin or t.kind == "dw") and layout(count(full)) and not layout(count(keep)):
                    return False
        return True

    def slice_count(self, channels: np.ndarray, n: int) -> int:
        """The count to keep of a slice of a group (``channels``, sorted global ids, one held at several positions
        as often; ``n`` and the count returned are positions, what a conv reading the slice sees) that keeps ``n``: when a
        depthwise conv runs over exactly that slice (MixNet's chunks, one kernel size each), the smallest
        count ``>= n`` ORT's depthwise kernel runs without its fallback (the probe's) and in its blocked
        layout (:func:`probe_layout`; also where the whole slice runs in NCHW, as MixNet's chunks of 90 do:
        the reorders around it go), or the whole slice; when a dense conv reads
        exactly that slice (Res2Net's chunks), the smallest count ``>= n`` that keeps the conv blocked;
        else ``n``. Rounding a group's total leaves its slices anywhere: a chunk of 13 runs the depthwise
        fallback, several times slower, and a chunk of 18 runs its conv in NCHW between two reorders (the
        adds after it unfused)."""
        key = np.asarray(channels, dtype=np.int64).tobytes()
        size = self._dw_sets.get(key)
        if size is None:
            size = self._conv_inputs.get(key)
            if size is None or n >= size:
                return n
            layout = self.layouts["conv"]
            return n if not layout(size) else next((c for c in range(max(n, 1), size) if layout(c)), size)
        if n >= size:
            return n
        dw, layout = self.family_steps["dw"], self.layouts["dw"]
        return next((c for c in range(max(n, 1), size) if abs(dw.factor(c) - 1.0) <= PAD_TOL
                     and layout(c)), size)

    def fast_count(self, group: str, n: int, *, down: float = 0.0, under: bool = False) -> int:
        """The smallest fast step of ``group`` >= ``n``; or the largest step <= ``n`` when it keeps at
        least ``(1 - down) * n`` channels. With ``under``, a count below the group's first step stays as
        it is: ORT pads it to that step's block, so it runs about as fast, with fewer FLOPs (what a
        budget the steps cannot reach needs, :class:`FastCounts`); or, where a conv reading that count
        would leave ORT's blocked layout, the next count that keeps it."""
        st = self.steps(group)
        if under and n < st[0]:
            # unless a conv reading it leaves ORT's blocked layout there (a depthwise conv of 13 channels)
            blocks = getattr(self.graph.groups[group], "blocks", None)
            if blocks is not None:
                return n
            return next((c for c in range(n, st[0]) if self._blocked_at(group, c, timed=False)), st[0])
        below = [s for s in st if s <= n]
        if below and below[-1] >= (1 - down) * n:
            return below[-1]
        above = [s for s in st if s >= n]
        return above[0] if above else st[-1]


class FastCounts:
    """The ``round_to`` of fast counts (``round_to="fast"``): ``(group, n) -> count``, each group's count
    rounded up to one of ``model``'s fast steps (:meth:`LatencyModel.fast_count`).

    :meth:`relaxed` is the rounding a plan retries with when the steps cannot reach its budget (a small
    model whose groups are one block wide cannot shrink at all on them): counts below a group's first step
    stay as they are, the others still land on steps. Unrounded counts would meet the budget too, but
    they put every group off its steps (``l2`` on a ResNet-20 for 28x28 images at 25 % of the FLOPs:
    0.77x of the original's ORT latency unrounded, 0.45x relaxed, batch 1).

        >>> import torch, fxprune
        >>> from fxprune.cost.latency_table import LatencyModel, FunctionTable
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1)).eval()
        >>> pad = lambda c: -(-c // 8) * 8
        >>> lm = LatencyModel(fxprune.analyze(net, (torch.randn(1, 3, 8, 8),)),
        ...                   table=FunctionTable(lambda s: 1e-6 * pad(s.cin) * pad(s.cout) * s.h * s.w))
        >>> fast = FastCounts(lm)
        >>> lm.steps("0"), fast("0", 5), fast.relaxed()("0", 5), fast.relaxed()("0", 9)
        ([8, 16], 8, 5, 16)
    """

    def __init__(self, model: "LatencyModel", under: bool = False):
        self.model, self.under = model, under
        self.__name__ = FAST_UNDER if under else "fast"

    def __call__(self, group: str, n: int) -> int:
        return self.model.fast_count(group, n, under=self.under)

    def relaxed(self) -> "FastCounts | None":
        """The rounding to retry with when this one cannot meet a budget (None: already relaxed)."""
        return None if self.under else FastCounts(self.model, under=True)


_aten = torch.ops.aten
# the functional and ATen (torch.export) spellings of the per-element ops the model costs
_ELEMENTWISE_FUNCTIONS = {torch.nn.functional.silu: "silu", _aten.silu.default: "silu", _aten.silu_.default: "silu",
                          torch.sigmoid: "sigmoid", _aten.sigmoid.default: "sigmoid",
                          torch.nn.functional.adaptive_avg_pool2d: "gap", _aten.adaptive_avg_pool2d.default: "gap",
                          operator.mul: "mul", torch.mul: "mul", _aten.mul.Tensor: "mul"}
# ops whose rule row they share with others that cost differently (GELU's with every activation, add's with
# every per-element op, permute's with every shape op): told apart by spelling
_TOKEN_FUNCTIONS = {torch.nn.functional.gelu: "gelu", _aten.gelu.default: "gelu",
                    operator.add: "add", torch.add: "add", _aten.add.Tensor: "add"}
_PERMUTES = {"permute", "transpose", torch.permute, torch.transpose, _aten.permute.default, _aten.transpose.int}


def _is_permute(node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _PERMUTES


def _couple(node, mods):
    """The ``couple`` function of ``node``'s row in the rules tables (it names the op), or None."""
    rule = rule_of(node, mods)
    return rule.couple if rule is not None else None


class _Fixed(_Count):
    """A count that no plan changes."""

    def __init__(self, size: int):
        self.size, self.fixed, self.ids = size, size, np.zeros(0, dtype=np.int64)

    def __call__(self, keep) -> int:
        return self.size


def _conv_layout(mod, block: int | None = None) -> str | None:
    """``"blocked"`` for a conv ORT runs in its blocked NCHWc layout, ``"plain"`` for one it runs in NCHW,
    None for anything else. Plain and depthwise convs are blocked; a grouped conv is blocked when its
    input and output widths per group are multiples of ``block`` (ORT's NCHWc block, e.g. 16 of 16 on
    AVX-512; None: grouped convs run in NCHW), else plain.

        >>> import torch
        >>> [_conv_layout(torch.nn.Conv2d(64, 64, 3, groups=g), 16) for g in (1, 4, 8, 64)]
        ['blocked', 'blocked', 'plain', 'blocked']
    """
    if not isinstance(mod, (torch.nn.Conv2d, Conv2dSpec)):
        return None
    if mod.groups == 1 or mod.groups == mod.in_channels == mod.out_channels:
        return "blocked"
    return "blocked" if block and _on_block(mod.in_channels, mod.out_channels, mod.groups, block) else "plain"


def _on_block(cin: int, cout: int, groups: int, block: int) -> bool:
    """Whether a grouped conv of ``cin -> cout`` channels over ``groups`` has per-group widths on ``block``."""
    return cin % groups == 0 and cout % groups == 0 and widths_on_block(cin // groups, cout // groups, block)


def _is_plain(node, mods, block: int | None = None) -> bool:
    """Ops ORT runs in NCHW between blocked convs: grouped convs off the block, SE scales
    (``x * s[N, C, 1, 1]``) and global average pools (exported as ReduceMean)."""
    spec = conv2d_spec(node, mods)
    if spec is not None:
        return _conv_layout(spec, block) == "plain"
    if node.op == "call_module":
        return LatencyModel._elementwise_module(mods.get(node.target), _shape(node)) == "gap"
    if node.op == "call_function":
        return LatencyModel._elementwise_function(node, _shape(node)) in ("mul_se", "gap") or \
            node.target in (torch.mean,)
    return False


def _shape(node) -> tuple:
    return tuple(getattr(node.meta.get("tensor_meta"), "shape", ()) or ()) if hasattr(node, "meta") else ()


def _is_blocked(node, mods, block: int | None = None) -> bool:
    return _conv_layout(conv2d_spec(node, mods), block) == "blocked"


def reordered(graph, mods=None, block: int | None = None) -> list:
    """The 4-d values ORT reorders between its blocked (NCHWc) layout and NCHW: a blocked conv's output
    (through per-element ops, BN, activations, adds) read by an op that runs in NCHW (:func:`_is_plain`),
    and a plain op's output read by a blocked conv. Each value once (its first node after the conv).
    ``block`` is ORT's NCHWc block (:func:`_conv_layout`)."""
    mods = dict(graph.module.named_modules()) if mods is None else mods
    tensor_args = lambda n: [a for a in n.all_input_nodes if len(_shape(a)) == 4]  # noqa: E731
    plain = lambda n: _is_plain(n, mods, block)  # noqa: E731
    blocked = lambda n: _is_blocked(n, mods, block)  # noqa: E731

    def passes_through(n) -> bool:   # same-shape per-element ops: ORT keeps their layout
        return len(_shape(n)) == 4 and not plain(n) and not blocked(n) and \
            n.op in ("call_module", "call_function", "call_method") and \
            all(_shape(a)[1:] == _shape(n)[1:] or _shape(a)[2:] == (1, 1) for a in tensor_args(n))

    def reaches(start, forward: bool, target) -> bool:
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            for m in (list(n.users) if forward else tensor_args(n)):
                if m in seen:
                    continue
                seen.add(m)
                if target(m):
                    return True
                if passes_through(m):
                    todo.append(m)
        return False

    out = {}
    for node in graph.module.graph.nodes:
        if not plain(node):
            continue
        for a in tensor_args(node):   # read from a blocked conv: reordered out of NCHWc
            if blocked(a) or (passes_through(a) and reaches(a, False, blocked)):
                out.setdefault(a.name, a)
        if len(_shape(node)) == 4 and reaches(node, True, blocked):
            out.setdefault(node.name, node)   # read by a blocked conv: reordered into NCHWc
    return [v for v in out.values() if "tensor_meta" in v.meta]


def _up(c: int, m: int) -> int:
    """``c`` rounded up to a multiple of ``m`` (at least ``m``)."""
    return max(m, -(-c // m) * m)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
