"""MEFT reversible adapters as a PEFT tuner. Importing this module registers peft type ``"MEFT"``.

peft's ``register_peft_method`` only accepts members of its fixed ``PeftType`` enum, so an outside
package cannot call it. ``PeftType`` is a ``str`` enum and every lookup peft does (config class, tuner
class, parameter prefix) is a dict lookup by ``config.peft_type``, so hf-ext fills those three mappings
under the plain string ``"MEFT"``; nothing in peft is patched, and ``PeftModel.from_pretrained`` finds
the tuner from the saved ``adapter_config.json`` (tested in tests/meft).
"""
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from . import ops
from .config import PEFT_TYPE, MeftConfig, MeftError, default_scales
from .model import MeftLayer, MeftModel

PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_TYPE, MeftConfig)
PEFT_TYPE_TO_TUNER_MAPPING.setdefault(PEFT_TYPE, MeftModel)
PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(PEFT_TYPE, MeftModel.prefix)

__all__ = ["default_scales", "MeftConfig", "MeftError", "MeftLayer", "MeftModel", "ops"]
