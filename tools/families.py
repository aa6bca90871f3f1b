"""A catalogue of models outside torchvision, each built from its config with random weights (no download).

Four frameworks, each a *family* of the sweep (``tools/zoo_families.py``):

* ``ultralytics``: every YOLO yaml shipped with the installed package whose task is detect,
  segment, pose, classify or obb, at its smallest scale (``n`` for a yaml with scales; for
  unscaled yamls, the smallest of a version and task by parameter count), input 1×3×320×320
  (224×224 for classifiers). YOLOE, YOLO-World (text encoders that download weights),
  RT-DETR, depth and semantic-segmentation heads are left out.
* ``hf``: Hugging Face ``transformers`` models from small configs (2 layers, hidden size
  64, ``use_cache=False``), with token ids (``torch.randint``, seed 0), pixels or audio.
* ``timm``: one model per module of ``timm.models`` (a family), the one with the fewest
  parameters (counted on the meta device, preferring a default input size of at most
  224; timm's ``test_*`` models left out), at its default input size capped at 224. The choice is cached in
  ``tools/results/timm_families.json``.
* ``smp``: ``segmentation_models_pytorch`` architectures with a small encoder, input 1×3×128×128.
* ``torchvision``: torchvision's models of the tasks other than classification that take one tensor (or two):
  semantic segmentation (1×3×128×128), video classification (1×3×16×112×112; 224×224 for S3D, MViT and
  Video Swin, which need it) and optical flow (RAFT, two 1×3×128×128 frames). Its detectors take lists of
  images and are pruned part by part (``tools/parts.py``).

Every entry is a name ``"<family>:<model>"``; :func:`build` returns ``(model, args, kwargs)``,
the model in eval mode, ``args`` a tuple of example tensors and ``kwargs`` a dict of more.

Example::

    >>> import sys; sys.path.insert(0, "tools")
    >>> import families
    >>> model, args, kwargs = families.build("smp:Unet-resnet18")
    >>> tuple(model(*args, **kwargs).shape)
    (1, 1, 128, 128)
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no online checks, no downloads
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # as Torch-Pruning's timm examples do; fx and export see plain ops

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TIMM_CHOICE = os.path.join(RESULTS, "timm_families.json")
FAMILIES = ("ultralytics", "hf", "timm", "smp", "torchvision")
SEED = 0
SEQ = 16  # tokens per example sequence
VOCAB = 1000
MAX_TIMM_SIZE = 224


def model_names(family: str) -> list[str]:
    """Every catalogue entry of one family, as ``"<family>:<model>"``."""
    names = {"ultralytics": _yolo_names, "hf": lambda: sorted(HF), "timm": lambda: sorted(timm_choice().values()),
             "smp": lambda: list(SMP), "torchvision": lambda: list(TV)}[family]()
    return [f"{family}:{n}" for n in names]


def all_names(families=FAMILIES) -> list[str]:
    return [n for f in families for n in model_names(f)]


def build(name: str):
    """``(model, args, kwargs)`` for a catalogue entry: random weights, eval mode, seeded inputs."""
    import torch

    family, _, model = name.partition(":")
    torch.manual_seed(SEED)
    out = {"ultralytics": _build_yolo, "hf": _build_hf, "timm": _build_timm, "smp": _build_smp,
           "torchvision": _build_tv}[family](model)
    model, args, kwargs = out
    return model.eval(), tuple(args), dict(kwargs)


def head_modules(name: str, model) -> list:
    """The modules that write the task's output (classifier, detection head, lm_head): Torch-Pruning's
    examples leave them alone (``ignored_layers``), and so does the sweep."""
    import torch.nn as nn

    family = name.partition(":")[0]
    out = []
    if family == "ultralytics":
        from ultralytics.nn.modules import Classify, Detect

        out = [m for m in model.modules() if isinstance(m, (Detect, Classify))]
    elif family == "hf":
        for attr in ("lm_head", "classifier", "pooler", "decode_head", "qa_outputs", "score", "proj_out", "pred_layer",
                     "class_labels_classifier", "bbox_predictor", "auxiliary_head"):
            m = getattr(model, attr, None)
            if isinstance(m, nn.Module):
                out.append(m)
        # detection transformers' per-layer heads (RT-DETR's class_embed / bbox_embed lists, its encoder heads)
        out += [m for n, m in model.named_modules() if n.rpartition(".")[2] in
                ("class_embed", "bbox_embed", "enc_score_head", "enc_bbox_head") and m not in out]
        # vision models: a classifier may be deeper (LeViT's distillation heads); Whisper/wav2vec encoders have none
        n_labels = getattr(getattr(model, "config", None), "num_labels", None)
        for m in model.modules():
            if isinstance(m, nn.Linear) and n_labels and m.out_features == n_labels and m not in out and \
                    "ForImageClassification" in type(model).__name__:
                out.append(m)
    elif family == "timm":
        n = getattr(model, "num_classes", 1000)
        out = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and
               (getattr(m, "out_features", None) == n or getattr(m, "out_channels", None) == n)]
    elif family == "smp":
        out = [model.segmentation_head] + ([model.classification_head] if model.classification_head else [])
    elif family == "torchvision":  # the layers that write classes (21 for segmentation, 400 for video) or a flow
        n = {"segmentation": 21, "video": 400, "optical_flow": 2}[TV[name.partition(":")[2]]]
        out = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) and
               n in (getattr(m, "out_features", None), getattr(m, "out_channels", None))]
    return out


def attention_heads(name: str, model) -> dict:
    """``{projection linear: number of heads}`` for Torch-Pruning's ``num_heads`` (head-aware pruning of
    q/k/v, as its ViT, BERT and LLM examples do); key/value projections of GQA get the KV head count."""
    import torch.nn as nn

    heads = {}
    family = name.partition(":")[0]
    for m in model.modules():
        if family != "hf" and hasattr(m, "num_heads"):  # timm blocks (also smp's timm encoders)
            for attr in ("qkv", "qkv_proj"):
                if isinstance(getattr(m, attr, None), nn.Linear):
                    heads[getattr(m, attr)] = m.num_heads
        if family != "hf":
            continue
        cfg = getattr(model, "config", None)
        n = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or \
            getattr(cfg, "num_attention_heads", None)
        kv = getattr(m, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or n
        if not isinstance(n, int):
            continue
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin")):
            if all(isinstance(getattr(m, a, None), nn.Linear) for a in (q, k, v)):
                heads[getattr(m, q)] = n
                heads[getattr(m, k)] = kv
                heads[getattr(m, v)] = kv
    return heads


# ----------------------------------------------------------------------------- ultralytics

YOLO_TASKS = {"detect", "segment", "pose", "classify", "obb"}
YOLO_SKIP = ("yoloe", "world", "rtdetr")  # text encoders with downloaded weights; a different model class


def _yolo_dir() -> str:
    import ultralytics

    return os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models")


def _yolo_names() -> list[str]:
    """The smallest build of every eligible yaml: ``<stem with n>`` for yamls with scales, else the
    smallest unscaled yaml of each (version directory, task). Cached with the timm choice."""
    return _cached("ultralytics", _list_yolo)


def _list_yolo() -> list[str]:
    import re

    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import YAML

    root = _yolo_dir()
    scaled, unscaled = [], {}
    for sub in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, sub)):
            continue
        for f in sorted(os.listdir(os.path.join(root, sub))):
            if not f.endswith(".yaml") or any(s in f for s in YOLO_SKIP):
                continue
            cfg = YAML.load(os.path.join(root, sub, f))
            task = guess_model_task(cfg)
            if task not in YOLO_TASKS:
                continue
            stem = f[:-5]
            if cfg.get("scales") and not re.search(r"yolo(e-)?v?\d+[nslmxb]", stem):  # yolov10n.yaml: a scale already
                scale = "n" if "n" in cfg["scales"] else sorted(cfg["scales"])[0]
                scaled.append(re.sub(r"^(yolo(?:v)?\d+)", rf"\g<1>{scale}", stem))
            else:
                unscaled.setdefault((sub, task), []).append(stem)
    for (sub, task), stems in sorted(unscaled.items()):
        sizes = {}
        for stem in stems:
            try:
                sizes[stem] = sum(p.numel() for p in _yolo_model(stem).parameters())
            except Exception:
                continue
        if sizes:
            scaled.append(min(sizes, key=sizes.get))
    return sorted(set(scaled))


def _yolo_model(stem: str):
    import contextlib
    import io

    from ultralytics.nn.tasks import (ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel,
                                      guess_model_task, yaml_model_load)

    cfg = yaml_model_load(stem + ".yaml")
    cls = {"detect": DetectionModel, "segment": SegmentationModel, "pose": PoseModel, "classify": ClassificationModel,
           "obb": OBBModel}[guess_model_task(cfg)]
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(cfg, verbose=False)


def _build_yolo(stem: str):
    import torch

    model = _yolo_model(stem)
    size = 224 if "-cls" in stem else 320
    return model, (torch.randn(1, 3, size, size),), {}


# ----------------------------------------------------------------------------- Hugging Face

_TXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)
_LM = dict(_TXT, use_cache=False)
_IMG = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=10)

# name -> (model class, config class, config kwargs, input kind)
HF = {
    "BertModel": ("BertModel", "BertConfig", _TXT, "tokens"),
    "BertModel+mask": ("BertModel", "BertConfig", _TXT, "tokens+mask"),  # kwargs: attention_mask
    "BertForSequenceClassification": ("BertForSequenceClassification", "BertConfig", dict(_TXT, num_labels=3), "tokens"),
    "DistilBertModel": ("DistilBertModel", "DistilBertConfig",
                        dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                             max_position_embeddings=64), "tokens"),
    "XLMRobertaModel": ("XLMRobertaModel", "XLMRobertaConfig", dict(_TXT, max_position_embeddings=66), "tokens"),
    "RobertaModel": ("RobertaModel", "RobertaConfig", dict(_TXT, max_position_embeddings=66), "tokens"),
    "AlbertModel": ("AlbertModel", "AlbertConfig", dict(_TXT, embedding_size=32), "tokens"),
    "ElectraModel": ("ElectraModel", "ElectraConfig", dict(_TXT, embedding_size=32), "tokens"),
    "DebertaV2Model": ("DebertaV2Model", "DebertaV2Config", _TXT, "tokens"),
    "MPNetModel": ("MPNetModel", "MPNetConfig", dict(_TXT, max_position_embeddings=66), "tokens"),
    "ConvBertModel": ("ConvBertModel", "ConvBertConfig", dict(_TXT, embedding_size=64), "tokens"),
    "MobileBertModel": ("MobileBertModel", "MobileBertConfig",
                        dict(_TXT, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                             num_feedforward_networks=2), "tokens"),
    "GPT2LMHeadModel": ("GPT2LMHeadModel", "GPT2Config",
                        dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False), "tokens"),
    "GPTNeoForCausalLM": ("GPTNeoForCausalLM", "GPTNeoConfig",
                          dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                               attention_types=[[["global", "local"], 1]], window_size=8, use_cache=False), "tokens"),
    "GPTNeoXForCausalLM": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _LM, "tokens"),
    "OPTForCausalLM": ("OPTForCausalLM", "OPTConfig",
                       dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            word_embed_proj_dim=64, max_position_embeddings=64, use_cache=False), "tokens"),
    "BloomForCausalLM": ("BloomForCausalLM", "BloomConfig",
                         dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, use_cache=False), "tokens"),
    "FalconForCausalLM": ("FalconForCausalLM", "FalconConfig",
                          dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               use_cache=False), "tokens"),
    "LlamaForCausalLM": ("LlamaForCausalLM", "LlamaConfig", dict(_LM, num_key_value_heads=2), "tokens"),
    "MistralForCausalLM": ("MistralForCausalLM", "MistralConfig", dict(_LM, num_key_value_heads=2, sliding_window=8),
                           "tokens"),
    "Qwen2ForCausalLM": ("Qwen2ForCausalLM", "Qwen2Config", dict(_LM, num_key_value_heads=2), "tokens"),
    "Qwen3ForCausalLM": ("Qwen3ForCausalLM", "Qwen3Config", dict(_LM, num_key_value_heads=2, head_dim=16), "tokens"),
    "PhiForCausalLM": ("PhiForCausalLM", "PhiConfig", _LM, "tokens"),
    "Phi3ForCausalLM": ("Phi3ForCausalLM", "Phi3Config", dict(_LM, num_key_value_heads=2, pad_token_id=0), "tokens"),
    "GemmaForCausalLM": ("GemmaForCausalLM", "GemmaConfig", dict(_LM, num_key_value_heads=2, head_dim=16), "tokens"),
    "Gemma2ForCausalLM": ("Gemma2ForCausalLM", "Gemma2Config",
                          dict(_LM, num_key_value_heads=2, head_dim=16, sliding_window=8), "tokens"),
    "Olmo2ForCausalLM": ("Olmo2ForCausalLM", "Olmo2Config", dict(_LM, num_key_value_heads=2), "tokens"),
    "StableLmForCausalLM": ("StableLmForCausalLM", "StableLmConfig", dict(_LM, num_key_value_heads=2), "tokens"),
    "GraniteForCausalLM": ("GraniteForCausalLM", "GraniteConfig", dict(_LM, num_key_value_heads=2), "tokens"),
    "CohereForCausalLM": ("CohereForCausalLM", "CohereConfig", dict(_LM, num_key_value_heads=2), "tokens"),
    "Gemma3ForCausalLM": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(_LM, num_key_value_heads=2, head_dim=16),
                          "tokens"),
    "Starcoder2ForCausalLM": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(_LM, num_key_value_heads=2), "tokens"),
    "GPTJForCausalLM": ("GPTJForCausalLM", "GPTJConfig",
                        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                             use_cache=False), "tokens"),
    "CodeGenForCausalLM": ("CodeGenForCausalLM", "CodeGenConfig",
                           dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64,
                                use_cache=False), "tokens"),
    "LlamaForSequenceClassification": ("LlamaForSequenceClassification", "LlamaConfig",
                                       dict(_LM, num_key_value_heads=2, num_labels=3, pad_token_id=0), "tokens"),
    "MixtralForCausalLM": ("MixtralForCausalLM", "MixtralConfig",
                           dict(_LM, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "tokens"),
    "Qwen2MoeForCausalLM": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                            dict(_LM, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=64, shared_expert_intermediate_size=64), "tokens"),
    "T5EncoderModel": ("T5EncoderModel", "T5Config",
                       dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            use_cache=False), "tokens"),
    "BartModel": ("BartModel", "BartConfig",
                  dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                       use_cache=False), "tokens"),
    "MBartForConditionalGeneration": ("MBartForConditionalGeneration", "MBartConfig",
                                      dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                           decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=0,
                                           use_cache=False), "tokens"),
    "XLMWithLMHeadModel": ("XLMWithLMHeadModel", "XLMConfig",
                           dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, pad_token_id=0), "tokens"),
    "WhisperEncoder": ("models.whisper.modeling_whisper.WhisperEncoder", "WhisperConfig",
                       dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                            num_mel_bins=80, max_source_positions=32, use_cache=False), "mel"),
    "Wav2Vec2Model": ("Wav2Vec2Model", "Wav2Vec2Config",
                      dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), "audio"),
    "Wav2Vec2ConformerForSequenceClassification": (
        "Wav2Vec2ConformerForSequenceClassification", "Wav2Vec2ConformerConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32, 32),
             conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
             conv_depthwise_kernel_size=7, num_labels=5), "audio"),
    "HubertModel": ("HubertModel", "HubertConfig",
                    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), "audio"),
    "ViTForImageClassification": ("ViTForImageClassification", "ViTConfig", _IMG, "pixels32"),
    "DeiTForImageClassification": ("DeiTForImageClassification", "DeiTConfig", _IMG, "pixels32"),
    "BeitForImageClassification": ("BeitForImageClassification", "BeitConfig",
                                   dict(_IMG, use_relative_position_bias=True), "pixels32"),
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", _IMG, "pixels32"),
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", _IMG, "pixels32"),
    "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig", _IMG, "pixels32"),
    "YolosForObjectDetection": ("YolosForObjectDetection", "YolosConfig",
                                dict(_IMG, image_size=[32, 32], num_detection_tokens=4), "pixels32"),
    "SwinForImageClassification": ("SwinForImageClassification", "SwinConfig",
                                   dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                        window_size=2, num_labels=10), "pixels32"),
    "Swinv2ForImageClassification": ("Swinv2ForImageClassification", "Swinv2Config",
                                     dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                          window_size=2, num_labels=10), "pixels32"),
    "ConvNextForImageClassification": ("ConvNextForImageClassification", "ConvNextConfig",
                                       dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10), "pixels64"),
    "ConvNextV2ForImageClassification": ("ConvNextV2ForImageClassification", "ConvNextV2Config",
                                         dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10),
                                         "pixels64"),
    "ResNetForImageClassification": ("ResNetForImageClassification", "ResNetConfig",
                                     dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10),
                                     "pixels64"),
    "RegNetForImageClassification": ("RegNetForImageClassification", "RegNetConfig",
                                     dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                                          num_labels=10), "pixels64"),
    "MobileNetV2ForImageClassification": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                                          dict(depth_multiplier=0.35, image_size=64, num_labels=10), "pixels64"),
    "EfficientNetForImageClassification": ("EfficientNetForImageClassification", "EfficientNetConfig",
                                           dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25,
                                                hidden_dim=320, num_labels=10), "pixels64"),
    "MobileViTForImageClassification": ("MobileViTForImageClassification", "MobileViTConfig",
                                        dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16,
                                             24, 24, 64], num_labels=10), "pixels64"),
    "MobileViTV2ForImageClassification": ("MobileViTV2ForImageClassification", "MobileViTV2Config",
                                          dict(image_size=64, width_multiplier=0.5, num_labels=10), "pixels64"),
    "PoolFormerForImageClassification": ("PoolFormerForImageClassification", "PoolFormerConfig",
                                         dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10),
                                         "pixels64"),
    "LevitForImageClassification": ("LevitForImageClassification", "LevitConfig",
                                    dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                                         depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10), "pixels64"),
    "PvtForImageClassification": ("PvtForImageClassification", "PvtConfig",
                                  dict(image_size=64, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 2, 4, 4], num_labels=10), "pixels64"),
    "UperNetForSemanticSegmentation": ("UperNetForSemanticSegmentation", "UperNetConfig",
                                       dict(hidden_size=64, num_labels=10), "pixels64"),
    "DetrForObjectDetection": ("DetrForObjectDetection", "DetrConfig",
                               dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                    decoder_attention_heads=4, num_labels=10), "pixels64"),
    "RTDetrForObjectDetection": ("RTDetrForObjectDetection", "RTDetrConfig",
                                 dict(d_model=64, num_attention_heads=4, num_labels=10), "pixels224"),
    "SegformerForSemanticSegmentation": ("SegformerForSemanticSegmentation", "SegformerConfig",
                                         dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], decoder_hidden_size=64,
                                              num_labels=5), "pixels64"),
}


def _resolve(path: str):
    import importlib

    import transformers

    if "." not in path:
        return getattr(transformers, path)
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module("transformers." + module), attr)


def _build_hf(name: str):
    import torch

    cls, cfg_cls, cfg, kind = HF[name]
    config = _resolve(cfg_cls)(**cfg)
    if hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"  # plain ops: the same graph on every machine
    model = _resolve(cls)(config)
    g = torch.Generator().manual_seed(SEED)
    if kind.startswith("tokens"):
        args = (torch.randint(3, VOCAB, (1, SEQ), generator=g),)
        if kind == "tokens+mask":  # the last quarter is padding
            mask = torch.ones(1, SEQ, dtype=torch.long)
            mask[:, -SEQ // 4:] = 0
            return model, args, {"attention_mask": mask}
    elif kind == "mel":
        args = (torch.randn(1, cfg["num_mel_bins"], 2 * cfg["max_source_positions"], generator=g),)
    elif kind == "audio":
        args = (torch.randn(1, 1600, generator=g),)
    else:
        size = int(kind[len("pixels"):])
        args = (torch.randn(1, 3, size, size, generator=g),)
    return model, args, {}


# ----------------------------------------------------------------------------- timm

def timm_choice() -> dict:
    """``{module: model name}``: the smallest model of every timm family (cached on disk)."""
    return _cached("timm", _choose_timm)


def _choose_timm() -> dict:
    import collections

    import timm
    import torch
    from timm.models import _registry

    fams = collections.defaultdict(list)
    for n in timm.list_models():
        if n.startswith("test_"):  # timm's own unit-test models: not a real variant of their family
            continue
        fams[_registry._model_to_module.get(n, "?").rpartition(".")[2]].append(n)
    choice = {}
    for fam, names in sorted(fams.items()):
        best = None
        for n in names:
            try:
                size = timm.get_pretrained_cfg(n).input_size if timm.get_pretrained_cfg(n) else (3, 224, 224)
            except Exception:
                size = (3, 224, 224)
            try:
                with torch.device("meta"):
                    params = sum(p.numel() for p in timm.create_model(n, pretrained=False).parameters())
            except Exception:
                continue
            key = (max(size[1:]) > MAX_TIMM_SIZE, params, n)
            best = min(best, key) if best else key
        if best:
            choice[fam] = best[2]
    return choice


def _build_timm(name: str):
    import timm
    import torch

    model = timm.create_model(name, pretrained=False)
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    c, h, w = size[0], min(size[1], MAX_TIMM_SIZE), min(size[2], MAX_TIMM_SIZE)
    return model, (torch.randn(1, c, h, w),), {}


# ----------------------------------------------------------------------------- segmentation_models_pytorch

SMP = {
    "Unet-resnet18": ("Unet", "resnet18"), "UnetPlusPlus-resnet18": ("UnetPlusPlus", "resnet18"),
    "FPN-resnet18": ("FPN", "resnet18"), "DeepLabV3-resnet18": ("DeepLabV3", "resnet18"),
    "DeepLabV3Plus-resnet18": ("DeepLabV3Plus", "resnet18"), "PSPNet-resnet18": ("PSPNet", "resnet18"),
    "Linknet-resnet18": ("Linknet", "resnet18"), "PAN-resnet18": ("PAN", "resnet18"),
    "MAnet-resnet18": ("MAnet", "resnet18"), "UPerNet-resnet18": ("UPerNet", "resnet18"),
    "Segformer-resnet18": ("Segformer", "resnet18"), "DPT-tu-vit_tiny_patch16_224": ("DPT", "tu-vit_tiny_patch16_224"),
    "Unet-mobilenet_v2": ("Unet", "mobilenet_v2"), "FPN-mobilenet_v2": ("FPN", "mobilenet_v2"),
    "DeepLabV3Plus-mobilenet_v2": ("DeepLabV3Plus", "mobilenet_v2"), "Unet-efficientnet-b0": ("Unet", "efficientnet-b0"),
    "Unet-mit_b0": ("Unet", "mit_b0"), "Segformer-mit_b0": ("Segformer", "mit_b0"),
}


def _build_smp(name: str):
    import segmentation_models_pytorch as smp
    import torch

    arch, encoder = SMP[name]
    extra = {"dynamic_img_size": True} if arch == "DPT" else {}
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=1, **extra)
    size = 224 if arch == "DPT" else 128
    return model, (torch.randn(1, 3, size, size),), {}


# ----------------------------------------------------------------------------- torchvision, other tasks

TV = {"fcn_resnet50": "segmentation", "deeplabv3_mobilenet_v3_large": "segmentation",
      "lraspp_mobilenet_v3_large": "segmentation", "r3d_18": "video", "mc3_18": "video", "r2plus1d_18": "video",
      "s3d": "video", "mvit_v2_s": "video", "swin3d_t": "video", "raft_small": "optical_flow"}


def _build_tv(name: str):
    import torch
    import torchvision

    task = TV[name]
    options = {"weights_backbone": None} if task == "segmentation" else {}
    model = torchvision.models.get_model(name, weights=None, **options)
    g = torch.Generator().manual_seed(SEED)
    if task == "segmentation":
        return model, (torch.randn(1, 3, 128, 128, generator=g),), {}
    if task == "optical_flow":
        return model, (torch.randn(1, 3, 128, 128, generator=g), torch.randn(1, 3, 128, 128, generator=g)), {}
    size = 224 if name in ("s3d", "mvit_v2_s", "swin3d_t") else 112
    return model, (torch.randn(1, 3, 16, size, size, generator=g),), {}


# ----------------------------------------------------------------------------- cache of listings

def _cached(key: str, fn):
    """A listing that takes a while to compute (building models), kept in ``TIMM_CHOICE`` by key."""
    data = {}
    if os.path.exists(TIMM_CHOICE):
        with open(TIMM_CHOICE) as f:
            data = json.load(f)
    if key not in data:
        data[key] = fn()
        os.makedirs(RESULTS, exist_ok=True)
        with open(TIMM_CHOICE, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
    return data[key]


if __name__ == "__main__":  # list the catalogue (computes and caches the timm and YOLO choices)
    import sys

    fams = sys.argv[1].split(",") if len(sys.argv) > 1 else FAMILIES
    for n in all_names(fams):
        print(n)
