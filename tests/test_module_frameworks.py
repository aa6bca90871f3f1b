"""output="module" on models torch.export captures (ultralytics YOLO, Hugging Face, nn.MultiheadAttention), and the
pruned copies used through their frameworks' own APIs: a YOLO checkpoint loaded by ``YOLO(path)``, predicting and
training; Llama's ``generate()``; BERT with a padding ``attention_mask``."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import same_state, saved_and_loaded, state_copy
from fxprune.passes import magnitude
from test_module_output import Attention

os.environ.setdefault("YOLO_OFFLINE", "1")          # ultralytics: no online checks, no downloads
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pins(graph):
    return [(g.name, p.reason) for g in graph.groups.values() for p in g.pins]


def _module(model, inputs, ratio=0.5, **options):
    """``compile(model, inputs, ratio=ratio, output="module", **options)`` and the graph it planned on
    (with module output's pins), from one capture."""
    pipe = fxprune.Pipeline(model, inputs, output="module", **options)
    return pipe.build(pipe.planner(magnitude.l2, "l2")(ratio=ratio), method="l2"), pipe.graph


class Mixed(nn.Module):
    """BatchNorm, a depthwise conv, LayerNorm (whose attributes export bakes into literals), and a literal view."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.b = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.l = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.o = nn.Linear(16, 4)

    def forward(self, x):
        y = self.dw(F.relu(self.b(self.c(x)))).mean((2, 3))
        y = y.view(-1, 8)   # EXPORT LITERAL
        return self.o(F.relu(self.ln(self.l(y))))


def test_export_capture_module_output_resizes_by_the_rule_table(tmp_path):
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    before = state_copy(model)
    p, graph = _module(model, (x,), capture="export")   # ONNX Runtime checked too
    rep = fxprune.report(p)
    assert type(p) is Mixed and same_state(model, before) and rep.capture["tracer"] == "export"
    assert rep.mask["ok"] and rep.onnx["ok"] and rep.mask["module"]["ok"] and rep.mask["module"]["modules_compared"] >= 6
    # the view writes 8: c, b and dw keep their channels; the linear/LayerNorm width is pruned, attributes follow
    assert (p.c.out_channels, p.b.num_features, p.dw.groups) == (8, 8, 8)
    assert p.l.out_features == 8 == p.o.in_features and p.ln.normalized_shape == (8,) and p.ln.weight.shape == (8,)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if text.endswith("# EXPORT LITERAL"))
    reasons = [r for name, r in _pins(graph) if name == "c"]
    assert len(reasons) == 1 and f"test_module_frameworks.py:{line}" in reasons[0] and "the literal [-1, 8]" in reasons[0]
    g = fxprune.apply(model, (x,), rep.plan, onnx=False, capture="export")
    xb = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (p(xb) - g(xb)).abs().max() <= 1e-5
    again = saved_and_loaded(p)
    fxprune.save(p, str(tmp_path / "p.pt"))              # plan + weights; load captures with the saved tracer
    loaded = fxprune.load(str(tmp_path / "p.pt"), Mixed, (x,))
    with torch.no_grad():
        assert type(again) is Mixed and torch.equal(again(xb), p(xb))
        assert type(loaded) is Mixed and loaded.ln.normalized_shape == (8,) and torch.equal(loaded(xb), p(xb))


def test_cli_prune_export_capture_output_module(capsys, tmp_path):
    from fxprune.cli import main

    saved = str(tmp_path / "m.pt")
    code = main(["prune", "test_module_frameworks:Mixed", "--input-shape", "2,3,8,8", "--ratio", "0.5",
                 "--capture", "export", "--output", "module", "--save", saved])
    out = capsys.readouterr().out
    assert code == 0 and "a pruned copy of the model" in out and "module copy vs pruned graph" in out
    loaded = fxprune.load(saved, Mixed, (torch.randn(2, 3, 8, 8),))
    assert type(loaded) is Mixed and fxprune.report(loaded).capture["tracer"] == "export" and loaded.l.out_features == 8


def test_multihead_attention_module_output_from_export():
    """nn.MultiheadAttention's row resizes embed_dim and head_dim (query scale folded) when export captured it:
    the literals export baked inside the module are the resize's, not the user's."""
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 6, 12)
    p = fxprune.compile(model, (x,), ratio=0.5, capture="export", output="module", onnx=False)
    assert p.attn.embed_dim == 16 and p.attn.head_dim == 4 and p.attn.out_proj.in_features == 16
    rep = fxprune.report(p)
    assert rep.mask["module"]["ok"] and "module 'attn'" in rep.mask["module"]["worst_module"]
    g = fxprune.apply(model, (x,), rep.plan, onnx=False, capture="export")
    with torch.no_grad():
        assert (p(x) - g(x)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- ultralytics

@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """A pruned YOLOv8n (one class, 64 px) saved as an ultralytics checkpoint: the model, the copy, its graph, the path."""
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=1, verbose=False).eval()
    before, x = state_copy(model), torch.randn(1, 3, 64, 64)
    p, graph = _module(model, (x,), ratio=0.3, onnx=False)
    assert same_state(model, before)
    path = tmp_path_factory.mktemp("yolo") / "pruned.pt"
    torch.save({"model": p, "train_args": {"imgsz": 64}}, path)   # what ultralytics' trainer saves, less the optimizer
    return model, p, graph, str(path)


def test_yolo_module_output_checkpoint_predicts(yolo):
    ultralytics = pytest.importorskip("ultralytics")
    model, p, graph, path = yolo
    rep = fxprune.report(p)
    assert type(p) is type(model) and rep.capture["tracer"] == "export"
    assert rep.mask["ok"] and rep.mask["module"]["ok"] and rep.mask["module"]["modules_compared"] > 150
    assert rep.params_after < 0.7 * rep.params_before
    assert p.model[0].conv.out_channels < 16 and p.model[0].bn.num_features == p.model[0].conv.out_channels
    # C2f splits its hidden conv with chunk(2, 1) in ultralytics' code: those channels are kept, with the line
    chunks = [r for _, r in _pins(graph) if "chunk" in r]
    assert len(chunks) == 8 and all("block.py" in r and ".chunk(2, 1)" in r for r in chunks)
    assert p.model[2].cv1.conv.out_channels == 32
    loaded = ultralytics.YOLO(path)
    assert loaded.model.model[0].conv.weight.shape == p.model[0].conv.weight.shape
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    results = loaded.predict(image, imgsz=64, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].boxes.data.shape[1] == 6
    with torch.no_grad():   # the loaded model computes what the copy does
        x = torch.randn(2, 3, 96, 96)
        assert (loaded.model.float().eval()(x)[0] - p(x)[0]).abs().max() <= 1e-4


def _yolo_dataset(root):
    """Four 64×64 noise images with one box each, in YOLO's layout, and its data yaml."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"images/train/{i}.jpg")
        (root / f"labels/train/{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames:\n  0: thing\n")
    return str(root / "data.yaml")


def test_yolo_pruned_checkpoint_trains(yolo, tmp_path):
    ultralytics = pytest.importorskip("ultralytics")
    from ultralytics.models.yolo.detect import DetectionTrainer

    class PrunedTrainer(DetectionTrainer):
        """ultralytics' trainer, training the checkpoint's own (pruned) model instead of one rebuilt from its yaml."""

        def get_model(self, cfg=None, weights=None, verbose=True):
            return weights if isinstance(weights, nn.Module) else super().get_model(cfg, weights, verbose)

    _, p, _, path = yolo
    model = ultralytics.YOLO(path)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.train(trainer=PrunedTrainer, data=_yolo_dataset(tmp_path / "data"), epochs=1, imgsz=64, batch=2, workers=0,
               device="cpu", plots=False, val=False, amp=False, project=str(tmp_path / "runs"), name="t", verbose=False)
    trained = model.model.state_dict()
    assert trained["model.2.cv1.conv.weight"].shape == p.model[2].cv1.conv.weight.shape   # still the pruned one
    assert trained["model.0.conv.weight"].shape[0] == p.model[0].conv.out_channels
    results = model.predict((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy(), imgsz=64, device="cpu", verbose=False)
    assert len(results) == 1
    assert any(k in start and v.shape == start[k].shape and not torch.equal(v.float(), start[k].float())
               for k, v in trained.items() if v.is_floating_point())   # the weights moved


# ----------------------------------------------------------------------------- Hugging Face

def test_llama_module_output_generates():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before, ids = state_copy(model), torch.randint(0, 100, (1, 12))
    p, graph = _module(model, (ids,), onnx=False)
    rep = fxprune.report(p)
    assert type(p) is transformers.LlamaForCausalLM and same_state(model, before)
    assert rep.mask["ok"] and rep.mask["module"]["ok"] and rep.params_after < 0.75 * rep.params_before
    mlp = p.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 64
    # head_dim is written by a literal (view(hidden_shape) with self.head_dim): kept, with the line
    assert any("modeling_llama.py" in r and "the literal 16" in r for _, r in _pins(graph))
    assert p.model.layers[0].self_attn.v_proj.out_features == 32
    g = fxprune.apply(model, (ids,), rep.plan, onnx=False)
    with torch.no_grad():
        assert (p(ids).logits - g(ids).logits).abs().max() <= 1e-5
        first = int(p(ids).logits[0, -1].argmax())
    cached = p.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = p.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 18) and torch.equal(cached, plain) and int(cached[0, 12]) == first


def _masked_original(model, graph, plan):
    """The original with the input slices of every removed channel zeroed (what the pruned model must compute)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for name, group in graph.groups.items():
        kept = torch.zeros(group.size, dtype=torch.bool)
        kept[torch.as_tensor(plan.keep.get(name, range(group.size)), dtype=torch.long)] = True
        for member in group.members:
            if member.kind != "consumer":
                continue
            index = torch.as_tensor(member.index)
            gone = torch.nonzero((index >= 0) & ~kept[index.clamp(min=0)]).flatten()
            if gone.numel():
                params[member.param].data.index_fill_(member.dim, gone, 0.0)
    return ref


def test_bert_module_output_with_padding_mask():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids, mask = torch.randint(1, 100, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    p, graph = _module(model, (ids, mask), onnx=False)
    rep = fxprune.report(p)
    assert type(p) is transformers.BertModel and rep.mask["ok"] and rep.mask["module"]["ok"]
    assert p.encoder.layer[0].intermediate.dense.out_features == 64 == p.encoder.layer[0].output.dense.in_features
    assert rep.plan.removed > 0
    ref = _masked_original(model, graph, rep.plan)
    # other tokens, another padding pattern: equal to the masked original on every unpadded token
    ids2, mask2 = torch.randint(1, 100, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask2[0, 3:], mask2[2, 8:] = 0, 0
    with torch.no_grad():
        got = p(ids2, attention_mask=mask2).last_hidden_state
        want = ref(ids2, attention_mask=mask2).last_hidden_state
    real = mask2.bool()
    err = (got[real] - want[real]).abs().max()
    assert err <= 1e-4 * want[real].abs().max() + 1e-5


def test_gpt2_conv1d_is_resized_by_its_row():
    """GPT-2's ``Conv1D`` reads ``nf`` and run-time sizes: its row resizes it, so the literals export baked inside it
    pin nothing and the MLP is pruned; the copy generates."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 8))
    p, graph = _module(model, (ids,), onnx=False)
    rep = fxprune.report(p)
    mlp = p.transformer.h[0].mlp
    assert rep.mask["module"]["ok"] and mlp.c_fc.nf == mlp.c_fc.weight.shape[1] == mlp.c_proj.nx == 64
    assert not any("pytorch_utils.py" in r for _, r in _pins(graph))
    g = fxprune.apply(model, (ids,), rep.plan, onnx=False)
    with torch.no_grad():
        assert (p(ids).logits - g(ids).logits).abs().max() <= 1e-5
    assert p.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0).shape == (1, 12)


def test_timm_vit_from_export_sets_its_attributes():
    """timm's ViT (width 192, MLP 768) captured by export: its LayerNorm subclass reads ``self.normalized_shape``
    (a tuple, written as a list in the graph) and its attention ``self.head_dim``: the copy's attributes are set,
    not pinned."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    p, graph = _module(model, (x,), capture="export", onnx=False)
    rep = fxprune.report(p)
    assert type(p) is type(model) and rep.mask["module"]["ok"] and rep.params_after < 0.7 * rep.params_before
    block = p.blocks[0]
    assert block.norm1.normalized_shape == (96,) and type(block.norm1.normalized_shape) is tuple
    assert p.patch_embed.proj.out_channels == 96 == block.mlp.fc1.in_features and block.mlp.fc1.out_features == 384
    attn = block.attn
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim and attn.proj.in_features == 3 * attn.head_dim
    assert not any("norm.py" in r for _, r in _pins(graph))
    g = fxprune.apply(model, (x,), rep.plan, onnx=False, capture="export")
    with torch.no_grad():
        xb = torch.randn(2, 3, 32, 32)
        assert (p(xb) - g(xb)).abs().max() <= 1e-5
