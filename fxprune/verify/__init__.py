"""The verify stage: the pruned model against the original with the removed channels masked
(:mod:`.mask`, node by node), and masked forwards of the original for data-driven methods
(:mod:`.masked`)."""
from .mask import ORT_ATOL, ORT_RTOL, check_mask, mask_equivalence, random_inputs
from .masked import MaskedRunner

__all__ = ["ORT_ATOL", "ORT_RTOL", "MaskedRunner", "check_mask", "mask_equivalence", "random_inputs"]
