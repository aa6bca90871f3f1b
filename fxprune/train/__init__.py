"""Training helpers for pruned models: limited-data fine-tuning (:mod:`.finetune`) and BN statistics
re-estimated after a cut (:func:`recalibrate_bn`, :mod:`.bn`)."""
from .bn import bn_layers, recalibrate_bn

__all__ = ["bn_layers", "recalibrate_bn"]
