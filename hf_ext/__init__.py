"""hf-ext: recent efficiency papers as real Hugging Face classes.

``import hf_ext`` is light: it imports neither torch nor transformers, so ``hf-ext --help`` and ``hf-ext zoo
list`` answer at once. Each technique is imported where it is used (``hf_ext.mla``, ``hf_ext.sr``, ...;
``hf_ext.mla`` and ``hf_ext.moe`` also work as attributes of ``hf_ext``).

The transformers Auto classes still learn every hf-ext config and model (MLA, the Read-ME MoE; ``exist_ok=True``)
once hf_ext is imported: as soon as transformers' Auto model classes are imported, before or after
``import hf_ext``, a post-import hook (wrapt's ``register_post_import_hook``) imports ``hf_ext.mla`` and
``hf_ext.moe``, which register themselves. So this works as it always did:

    >>> import hf_ext                                                          # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM                          # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/mla")                        # doctest: +SKIP

``AutoConfig`` alone (without the Auto model classes) needs ``import hf_ext.mla`` / ``hf_ext.moe`` first.
"""
import importlib

from wrapt import register_post_import_hook

from .errors import HfExtError

__version__ = "0.1.0"
__all__ = ["HfExtError", "mla", "moe", "__version__"]
AUTO_REGISTERED = ("mla", "moe")          # the packages that register configs and models with the Auto classes


def register_auto_classes(_module=None) -> None:
    """Import the packages that register hf-ext's configs and models with transformers' Auto classes."""
    for name in AUTO_REGISTERED:
        importlib.import_module(f"{__name__}.{name}")


register_post_import_hook(register_auto_classes, "transformers.models.auto.modeling_auto")


def __getattr__(name: str):
    """``hf_ext.mla`` / ``hf_ext.moe`` without importing them first (PEP 562)."""
    if name in AUTO_REGISTERED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
