"""The InDomain maths, in plain torch (no ComfyUI import).

- combine:    eps = u + sum_i w_i (e_i - u) and its CFG-equivalent form, term intervals
- nulltext:   turn a UNet into the text-free domain UNet (constant cross-attention), calibrate it
- checkpoint: the domain UNet file format (read / write / validate)
"""
from .combine import CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START, cfg_equivalent, combine, term_active
from .checkpoint import DomainCheckpointError, DomainMeta, read_domain_checkpoint, write_domain_checkpoint
from .nulltext import NullTextConstant, calibrate_constants, convert_to_null_text

__all__ = [
    "CONTROL_WEIGHT_START", "DOMAIN_WEIGHT_START", "cfg_equivalent", "combine", "term_active",
    "DomainCheckpointError", "DomainMeta", "read_domain_checkpoint", "write_domain_checkpoint",
    "NullTextConstant", "calibrate_constants", "convert_to_null_text",
]
