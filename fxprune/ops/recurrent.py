"""Rules of recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (modules) and ATen's ``lstm``,
``gru``, ``rnn_tanh``, ``rnn_relu`` (``torch.export``).

The first layer reads its input's features (the last dim) through its input weights
``weight_ih_l0`` (and ``weight_ih_l0_reverse``), as a linear layer does: those columns are
consumers, and a removed input feature is a zero column. Everything the layer makes stays
whole: each step mixes every hidden unit into the next, so its hidden state and its outputs
are fixed features (Sequencer's LSTMs over the rows and columns of a feature map).

Part of the fx rule table (:mod:`fxprune.ops.fx_table`) and of the ATen one.

Example::

    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.rnn = torch.nn.Linear(4, 8), torch.nn.LSTM(8, 5, batch_first=True)
    ...     def forward(self, x):
    ...         return self.rnn(self.a(x))[0]
    >>> small = fxprune.compile(Net().eval(), (torch.randn(2, 7, 4),), ratio=0.5, round_to=None, onnx=False)
    >>> small.rnn.weight_ih_l0.shape, small.rnn.input_size
    (torch.Size([20, 4]), 4)
"""
from __future__ import annotations

from ..labels import along, varying
from .schema import T, describe, pin_all


def _recurrent(ctx, x, others, input_weights: list, input_size: int, hidden_size: int):
    """The channels of a recurrent layer reading ``x`` (features last) with the parameters ``input_weights``
    (the first layer's ``weight_ih``, one per direction; None where one is not a parameter)."""
    if any(isinstance(t, T) and t.label is not None for t in others):   # an initial state that carries channels
        pin_all(ctx, [t for t in others if isinstance(t, T)], {},
                f"{describe(ctx.node, ctx.gm)} starts from a state whose features stay")
    if not isinstance(x, T) or x.label is None:
        return None
    nd = len(x.shape)
    if varying(x.label) != [nd - 1] or None in input_weights:
        ctx.pin(x.label, f"{describe(ctx.node, ctx.gm)} reads channels along a dim other than its features")
        return None
    ins = along(x.label, nd - 1, x.shape[-1])
    for weight in input_weights:
        ctx.member(weight, 1, ins, "consumer", "weight")
    ctx.cost(ins, share=input_size / (input_size + hidden_size))   # the input projection's share of a step
    return None


def recurrent_module(ctx, args, kwargs):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` called on a tensor (not a packed sequence)."""
    m, name = ctx.module(), ctx.node.target
    directions = ("", "_reverse") if m.bidirectional else ("",)
    x = args[0] if args else kwargs.get("input")
    others = list(args[1:]) + [v for k, v in kwargs.items() if k != "input"]
    return _recurrent(ctx, x, others, [f"{name}.weight_ih_l0{d}" for d in directions], m.input_size, m.hidden_size)


def resize_recurrent(m, node, rw):
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()   # the layer runs on its list of weights, made from its parameters


def aten_recurrent(ctx, args, kwargs):
    """ATen's ``lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)``, and ``gru.input``, ``rnn_tanh.input``, ``rnn_relu.input`` (``hx`` one tensor): ``params``
    holds each layer's ``w_ih, w_hh[, b_ih, b_hh]``, direction after direction."""
    x, hx, params, has_biases, bidirectional = args[0], args[1], args[2], args[3], args[7]
    per = 4 if has_biases else 2
    firsts = [params[0]] + ([params[per]] if bidirectional else [])
    names = [p.param if isinstance(p, T) else None for p in firsts]
    hidden = params[1].shape[1]   # w_hh: [gates * hidden, hidden]
    others = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    return _recurrent(ctx, x, others, names, firsts[0].shape[1], hidden)
