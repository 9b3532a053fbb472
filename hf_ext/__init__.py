"""hf-ext: recent efficiency papers as real Hugging Face classes.

Importing ``hf_ext`` registers every hf-ext config and model with the transformers Auto classes
(``exist_ok=True``), so ``AutoModelForCausalLM.from_pretrained`` loads our checkpoints.
"""
from . import mla, moe
from .errors import HfExtError

__version__ = "0.1.0"
__all__ = ["HfExtError", "mla", "moe", "__version__"]
