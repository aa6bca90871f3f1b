"""Run the analysed graph with chosen channels zeroed at *every* tensor that carries them.

Data-driven criteria (CURL, CATRO) ask "what does the network compute when these
channels are gone?". Zeroing a channel at every value whose channel label (see
:mod:`fxprune.labels`) holds it (the conv output, the BN output after its bias, the
ReLU, the residual add, the flattened features a linear reads, ...) is what removing
it does, so :class:`MaskedRunner` answers the question exactly, for any model the
analysis understands (residual streams, concatenations, splits, flatten into linear).

It is built for many masks:

* **batched masks**: ``masks_per_forward`` masks share one forward pass; the proxy
  batch is replicated that many times, and the value at each masked node is viewed as
  ``[masks, batch, ...]`` and multiplied by a per-mask channel multiplier;
* **cached prefix**: masks are run in the order of the first node they touch; the
  unmasked values before that node are computed once and kept (only the live ones),
  and each masked pass recomputes the graph from that node onward;
* **ranks**: under ``torch.distributed`` (e.g. ``torchrun``, gloo on CPU) the forward passes are
  dealt out to the ranks, pass ``i`` to rank ``i % world``, each pass made of the same masks as in
  one process, so every rank ends with the values one process computes, bit for bit
  (:meth:`MaskedRunner.run` gathers them; :meth:`MaskedRunner.each` with ``shard=True`` yields a
  rank its own passes, and :func:`sum_over_ranks` adds up per-rank results).

The runner never changes the model; it runs the analysed copy (``graph.module``) in
eval mode under ``torch.no_grad()``.

Example::

    >>> import torch, fxprune
    >>> from fxprune.verify.masked import MaskedRunner
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 36, 3))
    >>> x = torch.randn(5, 1, 8, 8)
    >>> graph = fxprune.analyze(net, (x[:1],))
    >>> runner = MaskedRunner(graph, (x,), masks_per_forward=2)
    >>> c = graph.offsets["0"]                      # global index of the conv's channel 0
    >>> outs = runner.run([[c], [c + 1, c + 2]])    # two masks, one forward pass
    >>> outs.shape                                  # [masks, batch, classes]
    torch.Size([2, 5, 3])
    >>> w = net[3].weight.detach().view(3, 4, 36).clone(); w[:, 0] = 0   # channel 0 removed by hand
    >>> manual = torch.relu(net[0](x)).flatten(1) @ w.view(3, -1).T + net[3].bias
    >>> torch.allclose(outs[0], manual, atol=1e-5)
    True
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import ConfigError, DataError, is_out_of_memory
from ..labels import varying
from ..utils import eval_mode, primary_output


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (the identity in one process): per-rank results with zeros where
    another rank computed, made whole on every rank."""
    if rank_and_world()[1] > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _labels(node: fx.Node):
    lab = node.meta.get("fxprune")
    if isinstance(lab, torch.Tensor):
        return lab
    if isinstance(lab, (tuple, list)):
        return tuple(x if isinstance(x, torch.Tensor) else None for x in lab)
    return None


def _channels_of(lab) -> torch.Tensor:
    if lab is None:
        return torch.empty(0, dtype=torch.long)
    if isinstance(lab, tuple):
        parts = [_channels_of(x) for x in lab]
        return torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.long)
    u = torch.unique(lab)
    return u[u >= 0]


class MaskedRunner:
    """Run ``graph.module`` on fixed ``inputs`` with sets of global channels zeroed.

    ``inputs`` is the tuple of model inputs (one batch of ``N`` samples, batch first).
    ``masks_per_forward`` masks run in one pass on a batch of ``masks_per_forward * N``.
    ``base_drop`` (a bool tensor over ``graph.num_channels``, or None) is zeroed in every
    run, the reference included: the network "with those channels already pruned".
    Each pass runs from the first node its masks touch; the unmasked prefix before it is run once
    and kept, so a later :meth:`run` whose passes start no earlier resumes it (CATRO's backward
    elimination runs one group's rounds from the same node: half its time on a ResNet-20).
    """

    def __init__(self, graph, inputs: tuple, masks_per_forward: int = 1, base_drop: torch.Tensor | None = None):
        if not isinstance(inputs, tuple) or not inputs or not isinstance(inputs[0], torch.Tensor):
            raise DataError("MaskedRunner needs a tuple of input tensors (batch first)")
        if masks_per_forward < 1:
            raise ConfigError(f"masks_per_forward={masks_per_forward} must be at least 1")
        self.graph = graph
        self.gm = graph.module
        self.inputs = inputs
        self.batch = int(inputs[0].shape[0])
        self.m = int(masks_per_forward)
        self.device = inputs[0].device
        self.num_channels = graph.num_channels
        self.base_drop = (torch.zeros(self.num_channels, dtype=torch.bool) if base_drop is None
                          else base_drop.to(torch.bool).clone())
        self.nodes = list(self.gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.labels = [_labels(n) for n in self.nodes]
        # first node position carrying each global channel
        channels = [_channels_of(lab) for lab in self.labels]
        first = torch.full((self.num_channels,), len(self.nodes), dtype=torch.long)
        for i in reversed(range(len(self.nodes))):
            if channels[i].numel():
                first[channels[i]] = i
        self.first = first
        self.node_channels = [ch.numpy() for ch in channels]
        last_use = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self.last_use = last_use
        flops = [float(graph.node_flops.get(n.name, 0)) for n in self.nodes]
        total = sum(flops) or 1.0
        self._cum = [0.0]
        for f in flops:
            self._cum.append(self._cum[-1] + f / total)
        #: forward-equivalents spent, FLOPs-weighted: one pass of the whole graph over the N samples counts 1
        self.forwards = 0.0
        self._interp = fx.Interpreter(self.gm)
        # the unmasked prefix as last advanced: (masks per forward, env, position); every pass starts from a
        # clone of it, so the next call that starts at or after the position resumes it instead of re-running
        self._prefix = None
        #: why masks run one per pass (a value that does not carry the batch); "" once checked they need not; None
        self.unbatched = None

    # -- public -------------------------------------------------------------------------------
    def first_node(self, channels) -> int:
        """Position (in graph order) of the first node carrying any of ``channels``."""
        ch = torch.as_tensor(channels, dtype=torch.long).flatten()
        return int(self.first[ch].min()) if ch.numel() else len(self.nodes)

    def reference(self):
        """The model's (first) output tensor with only ``base_drop`` zeroed, at batch ``N``."""
        return self.run_one([])

    def run_one(self, drop):
        """The model's (first) output tensor with the channels ``drop`` (global indices) zeroed, at batch ``N``."""
        out = self.run([drop], masks_per_forward=1, capture=())
        return out[0]

    def run(self, drops: Sequence, masks_per_forward: int | None = None, capture=()):
        """Outputs for each mask in ``drops`` (each a list of global channel indices to zero).

        Returns the model's first floating-point output tensor stacked as ``[len(drops), N, ...]``, in the order of
        ``drops``; with ``capture`` (node names), returns ``{name: [len(drops), N, ...]}`` of those
        nodes' values instead, and stops after the last of them. Under ``torch.distributed`` each
        rank runs its share of the passes and every rank returns all of them.
        """
        found = [(idx, vals) for idx, vals in self.each(drops, masks_per_forward=masks_per_forward, capture=capture,
                                                        shard=True)]
        if rank_and_world()[1] > 1:
            gathered = [None] * rank_and_world()[1]
            torch.distributed.all_gather_object(gathered, found)
            found = [item for part in gathered for item in part]
        if not found:
            return {k: torch.empty(0) for k in capture} if capture else torch.empty(0)
        where = torch.tensor([i for idx, _ in found for i in idx])
        back = torch.argsort(where)  # passes run in the order of their first node: back to the order of drops
        if capture:
            return {k: torch.cat([vals[k] for _, vals in found])[back] for k in capture}
        return torch.cat([vals for _, vals in found])[back]

    def each(self, drops: Sequence, masks_per_forward: int | None = None, capture=(), progress=None,
             shard: bool = False):
        """Yield ``(indices, values)`` per forward pass, masks sorted by their first node.

        ``indices`` are positions in ``drops``; ``values`` are as in :meth:`run` for them.
        ``progress`` is a ``tqdm`` bar (or None) advanced by the number of masks done. With
        ``shard=True`` under ``torch.distributed``, only this rank's passes (pass ``i`` goes to
        rank ``i % world``).
        """
        m = masks_per_forward or self.m
        drops = [torch.as_tensor(d, dtype=torch.long).flatten() for d in drops]
        for d in drops:
            if d.numel() and (int(d.min()) < 0 or int(d.max()) >= self.num_channels):
                raise ConfigError(f"a mask names channels outside 0..{self.num_channels - 1}")
        if m > 1 and not self._batchable():
            m = 1
        todo = list(range(len(drops)))
        while todo:
            done = set()
            try:
                for chunk, values in self._passes([drops[i] for i in todo], m, capture, shard):
                    chunk = [todo[j] for j in chunk]
                    done.update(chunk)
                    yield chunk, values
                    if progress is not None:
                        progress.update(len(chunk))
                return
            except (RuntimeError, MemoryError) as exc:
                # ranks must deal out the same passes: under torchrun the batch of masks cannot change on one
                if not is_out_of_memory(exc) or m == 1 or rank_and_world()[1] > 1:
                    raise
                warnings.warn(f"out of memory with {m} masks per forward pass (a batch of {m * self.batch}): "
                              f"trying {m // 2}", stacklevel=2)
                m = self.m = m // 2
                self._prefix = None
                todo = [i for i in todo if i not in done]

    def _batchable(self) -> bool:
        """Whether masks can share a forward pass: every value a mask touches carries the batch. One pass of two
        masks over the first sample finds a value that does not (a position embedding computed from a buffer,
        ``[1, tokens, width]``); masks then run one per pass (``self.unbatched`` says why)."""
        if self.unbatched is None:
            forwards = self.forwards
            try:
                with eval_mode(self.gm), torch.no_grad():
                    self._masked_pass(self._start_env(2, samples=1), 0, len(self.nodes) - 1,
                                      [torch.arange(self.num_channels)], 2, ())
                self.unbatched = ""
            except _Unbatched as exc:
                warnings.warn(f"{exc}: masks run one per forward pass", stacklevel=3)
                self.unbatched, self.m = str(exc), 1
            self.forwards = forwards
        return not self.unbatched

    def _passes(self, drops, m, capture, shard):
        """:meth:`each`'s passes, ``m`` masks each."""
        if not drops:
            return
        rank, world = rank_and_world() if shard else (0, 1)
        starts = [self.first_node(d) for d in drops]
        order = sorted(range(len(drops)), key=lambda i: (starts[i], i))
        capture_pos = [self.pos[self._node(c)] for c in capture]
        end = max(capture_pos) if capture_pos else len(self.nodes) - 1
        latest = min(capture_pos) if capture_pos else end  # every pass runs at least from here
        with eval_mode(self.gm), torch.no_grad():
            env, done = None, 0
            for n_pass, k in enumerate(range(0, len(order), m)):
                if n_pass % world != rank:
                    continue
                chunk = order[k:k + m]
                start = min(min(starts[i] for i in chunk), latest)
                if env is None:
                    env, done = self._resume(m, start)
                done = self._advance(env, done, start)
                self._prefix = (m, env, done)
                values = self._masked_pass(env, start, end, [drops[i] for i in chunk], m, capture)
                yield chunk, values

    # -- internals ------------------------------------------------------------------------------
    def _node(self, name):
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node named '{name}' in the analysed graph")

    def _resume(self, m, start):
        """The prefix env and its position: the cached one when it is for ``m`` and not past ``start``
        (backward elimination starts every round at the same node), else a fresh one."""
        if self._prefix is not None and self._prefix[0] == m and self._prefix[2] <= start:
            return self._prefix[1], self._prefix[2]
        return self._start_env(m), 0

    def _start_env(self, m, samples=None):
        """The inputs (their first ``samples``, default all) repeated for ``m`` masks."""
        reps = tuple(x[:samples].repeat((m,) + (1,) * (x.dim() - 1)) if isinstance(x, torch.Tensor) and x.dim()
                     else x for x in self.inputs)
        return {"__inputs": reps, "__m": m}

    def _advance(self, env, done, start):
        """Run the unmasked (base-masked) prefix up to ``start`` (exclusive), keeping live values only."""
        interp = self._interp
        interp.args_iter = iter(env["__inputs"])
        keep, touched = self._keep_rows([], env["__m"])
        for i in range(done, start):
            n = self.nodes[i]
            interp.env = env
            val = interp.run_node(n)
            if touched[self.node_channels[i]].any():
                val = self._apply(val, self.labels[i], keep, env["__m"], n.name)
            env[n] = val
            self._free(env, i)
        if start > done:
            self.forwards += env["__m"] * (self._cum[start] - self._cum[done])
        return max(done, start)

    def _free(self, env, i):
        for a in self.nodes[i].all_input_nodes:
            if self.last_use.get(a, -1) <= i and a in env:
                del env[a]

    def _keep_rows(self, drops, m):
        """Float multipliers [m, num_channels] (0 where a mask or base_drop drops a channel), and the
        bool array of every channel dropped by any of them."""
        keep = torch.ones(m, self.num_channels)
        keep[:, self.base_drop] = 0.0
        for r, d in enumerate(drops):
            keep[r, d] = 0.0
        touched = (keep == 0).any(0).numpy()
        return keep.to(self.device), touched

    def _apply(self, val, lab, keep, m, name):
        if lab is None:
            return val
        if isinstance(lab, tuple):
            if not isinstance(val, (tuple, list)):
                return val
            out = [self._apply(v, lb, keep, m, name) for v, lb in zip(val, lab)]
            out += list(val[len(out):])
            return type(val)(out) if isinstance(val, tuple) else out
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            return val
        lab = lab.to(keep.device)
        rows = keep[:, lab.clamp(min=0).flatten()].view((m,) + tuple(lab.shape))
        rows = torch.where((lab < 0).unsqueeze(0), torch.ones((), device=keep.device), rows)
        if lab.dim() != val.dim() or lab.shape[0] != 1 or val.shape[0] % m:
            if m == 1 and lab.dim() == val.dim():
                return val * rows[0].to(val.dtype)
            raise _Unbatched(f"batched masking needs values whose first dimension is the batch; node '{name}' "
                             f"has shape {tuple(val.shape)}")
        v = val.reshape((m, val.shape[0] // m) + tuple(val.shape[1:]))
        return (v * rows.to(val.dtype)).reshape(val.shape)

    def _masked_pass(self, env, start, end, drops, m, capture):
        interp = self._interp
        keep, touched = self._keep_rows(drops, m)
        local = {}
        for a, v in env.items():  # a fresh copy of the live prefix: in-place ops must not touch the cache
            local[a] = v.clone() if isinstance(v, torch.Tensor) else v
        interp.args_iter = iter(env["__inputs"])
        captured = {}
        out = None
        for i in range(start, end + 1):
            n = self.nodes[i]
            interp.env = local
            if n.op == "output":
                out = interp.run_node(n)
                break
            val = interp.run_node(n)
            if touched[self.node_channels[i]].any():
                val = self._apply(val, self.labels[i], keep, m, n.name)
            local[n] = val
            if n.name in capture:
                captured[n.name] = val
            self._free(local, i)
        self.forwards += m * (self._cum[end + 1] - self._cum[start])
        used = len(drops)
        if capture:
            return {k: _split(captured[k], m)[:used] for k in capture}
        return _split(primary_output(out), m)[:used]


class _Unbatched(ConfigError):
    """A masked value that does not carry the batch: masks cannot share a forward pass."""


def _split(val, m):
    return val.reshape((m, val.shape[0] // m) + tuple(val.shape[1:]))


FEATURE_POINTS = ("consumed", "normalized", "produced")


def feature_nodes(graph, group, point: str = "consumed") -> list[str]:
    """Names of the values that carry a group's channels at one point of each layer (in graph order).

    ``point="consumed"`` (default): the values the group's consumers read, deduplicated. For a
    residual stream this is every block output of the stage (each feeds the next block and, at
    the stage's end, the downsample); for a bottleneck's inner group, the activation its next
    conv reads (after BN and ReLU). A group without consumers gives the values its producers
    write. ``"produced"``: the outputs of the producers that create the channels (convs, linears:
    before BN); ``"normalized"``: the outputs of the producers that transform channels they read
    (BN, affine: after BN, before the activation or the residual add).
    """
    if point not in FEATURE_POINTS:
        raise ConfigError(f"point='{point}' must be one of {FEATURE_POINTS}")
    nodes = {n.name: n for n in graph.module.graph.nodes}
    off, size = graph.offsets[group.name], group.size

    def carries(node):
        lab = _labels(node)
        return isinstance(lab, torch.Tensor) and bool(((lab >= off) & (lab < off + size)).any())

    out = []
    if point != "consumed":
        for name in dict.fromkeys(m.node for m in group.members if m.kind == "producer"):
            node = nodes.get(name)
            if node is not None and carries(node) and \
                    any(carries(a) for a in node.all_input_nodes) == (point == "normalized"):
                out.append(name)
    else:
        wanted = [m.node for m in group.members if m.kind == "consumer"] or \
                 [m.node for m in group.members if m.kind == "producer"]
        for name in dict.fromkeys(wanted):
            node = nodes.get(name)
            if node is None:
                continue
            cands = node.all_input_nodes if any(m.kind == "consumer" for m in group.members) else [node]
            out += [a.name for a in cands if carries(a)]
    order = {n.name: i for i, n in enumerate(graph.module.graph.nodes)}
    return sorted(dict.fromkeys(out), key=order.get)


def pooled_features(graph, group, name: str, value: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Per-channel features ``[N, group.size, p]`` of node ``name``'s ``value``.

    With ``pool=1`` a channel's feature is the mean of every position that carries it
    (global average pooling for a conv map; the mean over its block of a flattened
    vector). With ``pool=s > 1`` a 4-D value whose channels run along dim 1 is pooled to
    ``s x s`` by ``adaptive_avg_pool2d`` (``p = s*s``); other values fall back to ``p = 1``.
    Channels the value does not carry get zeros.
    """
    lab = _labels(next(n for n in graph.module.graph.nodes if n.name == name))
    off, size, n = graph.offsets[group.name], group.size, value.shape[0]
    if pool > 1 and value.dim() == 4 and varying(lab) == [1]:
        ids = lab.flatten() - off
        pooled = F.adaptive_avg_pool2d(value, pool).flatten(2)  # [N, C, p]
        out = value.new_zeros(n, size, pool * pool)
        sel = (ids >= 0) & (ids < size)
        out[:, ids[sel]] = pooled[:, sel]
        return out
    ids = lab.expand(value.shape[1:] if lab.dim() == value.dim() - 1 else (1,) + tuple(value.shape[1:]))
    ids = ids.reshape(-1) - off
    flat = value.reshape(n, -1)
    sel = (ids >= 0) & (ids < size)
    ids, flat = ids[sel], flat[:, sel]
    sums = flat.new_zeros(n, size).index_add_(1, ids, flat)
    counts = torch.zeros(size, dtype=flat.dtype).index_add_(0, ids, torch.ones_like(ids, dtype=flat.dtype))
    return (sums / counts.clamp(min=1)).unsqueeze(2)
