"""``MeftConfig``: the PEFT config of MEFT reversible adapters (peft_type ``"MEFT"``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from ..errors import HfExtError

PEFT_TYPE = "MEFT"
VARIANTS = ("meft1", "meft2", "meft3")
STREAM_BITS = 36  # bits of scale (k * layers * streams) float64 streams reverse within; measured, see README
MAX_K = 8         # smallest default scale 2^-8


class MeftError(HfExtError, ValueError):
    """Bad MEFT settings or an unsupported model; the message names the fix."""


def default_scales(variant: str, n_layers: int, pre_ln: bool = False) -> tuple[float, float]:
    """The smallest power-of-two scale whose reversal passes the monitor (measured, see README).

    With float64 streams and lam, beta = 2^-k, every product is exact, and the sum of a scaled stream and an
    F/G output (float32) is exact while the stream spans under 53 mantissa bits; each layer widens it by k bits
    per scaled stream, so the error of the rebuilt input grows like 2^(bits - 53) once bits = k * layers *
    streams passes ~29. Measured on MiniLM (``benchmarks/meft_safety.py``, scale sweep): up to 36 bits every
    variant rebuilds its input to <= 6e-7 and its gradients equal autograd's; at 42 bits the error is about
    1e-5, at 48 bits 1e-3 to 4. So the default is the smallest scale within 36 bits, and k is at most 8 (below 2^-8 a
    layer starts within 0.4% of the PLM, and smaller scales only spend headroom). Smaller scales start closer
    to the pretrained model: on MiniLM (6 layers) MEFT1 deviates 60% at 2^-3 and 7% at 2^-6.

    Pre-LN decoders (``pre_ln``): F and G contain the residual connection (as in the official RevLLaMA),
    so the two streams grow geometrically with depth and no scale is exact; measured on SmolLM2 (30
    layers), only lam = beta = 1 keeps gradients within 1e-4 of autograd, so that is the default there.
    """
    if pre_ln:
        return 1.0, 1.0
    per_layer = 2 if variant == "meft3" else 1
    s = 2.0 ** -min(MAX_K, STREAM_BITS // (per_layer * max(n_layers, 1)))
    return {"meft1": (s, 1.0), "meft2": (1.0, s), "meft3": (s, s)}[variant]


@dataclass
class MeftConfig(PeftConfig):
    """MEFT (Liao et al., NeurIPS 2023): the layers of a pretrained model become reversible couplings
    y1 = lam*x1 + F(x2), y2 = beta*x2 + G(y1), so training stores only the top activations.

    Args:
        variant: ``"meft1"`` (F = layer, G = adapter), ``"meft2"`` (F = adapter, G = layer) or
            ``"meft3"`` (F = attention block, G = MLP block, both with adapters).
        adapter_dim: bottleneck width of every adapter.
        lam, beta: coupling scales; ``None`` takes ``default_scales(variant, n_layers)`` at injection: the
            smallest power of two whose stream arithmetic stays exact (the reversal is then as exact as the
            kernels recompute F and G; the monitor checks). Small scales start the model closer
            to the pretrained one but amplify rounding by 1/scale per layer.
        num_rev_layers: how many of the target layers (from the bottom) run reversibly; the rest use
            ordinary backprop. ``None``: all.
        reconstruction_dtype: dtype of the two streams (the coupling sums, their inverse and the saved top
            outputs); F and G still compute in the model's dtype. ``"float64"`` makes small scales safe.
        target_layers: indices of the layers that form the reversible stack (contiguous); ``None``: all.
            Layers below run as the frozen pretrained model and save nothing for backward.
        output: ``"plm_stream"`` (the stream that carries the pretrained computation; it equals the
            pretrained output in the limit of small scales) or ``"mean"`` ((x1 + x2) / 2, as the official code).
        adapter_act: activation of the adapters.
        adapter_dropout: dropout inside the adapters (replayed exactly in the backward).
        check_every: every this many training forwards, the backward compares the reconstructed input of
            the first layer with the real one (0 turns the monitor off).
        check_threshold: relative reconstruction error above which the monitor warns or raises.
        check_action: ``"warn"`` or ``"raise"``.

    Example:
        >>> from peft import get_peft_model
        >>> from hf_ext.meft import MeftConfig
        >>> model = get_peft_model(base_model, MeftConfig(variant="meft3", task_type="SEQ_CLS"))  # doctest: +SKIP
    """

    variant: str = field(default="meft1", metadata={"help": "meft1, meft2 or meft3"})
    adapter_dim: int = field(default=16, metadata={"help": "adapter bottleneck width"})
    lam: float | None = field(default=None, metadata={"help": "scale of x1 (None: variant default)"})
    beta: float | None = field(default=None, metadata={"help": "scale of x2 (None: variant default)"})
    num_rev_layers: int | None = field(default=None, metadata={"help": "reversible layers from the bottom"})
    reconstruction_dtype: str | None = field(default="float64", metadata={"help": "dtype of the two streams"})
    target_layers: list[int] | None = field(default=None, metadata={"help": "contiguous layer indices"})
    output: str = field(default="plm_stream", metadata={"help": "plm_stream or mean"})
    adapter_act: str = field(default="gelu", metadata={"help": "adapter activation"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout inside adapters"})
    check_every: int = field(default=100, metadata={"help": "reconstruction check period (0: off)"})
    check_threshold: float = field(default=1e-4, metadata={"help": "relative reconstruction error bound"})
    check_action: str = field(default="warn", metadata={"help": "warn or raise"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "set from target_layers"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "extra trainable modules"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.variant not in VARIANTS:
            raise MeftError(f"variant={self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in ("lam", "beta"):
            if getattr(self, name) is not None and float(getattr(self, name)) == 0:
                raise MeftError(f"{name}=0: the inverse divides by {name}, so it must be non-zero "
                                 f"(the paper uses 0.1; 1 is the most stable)")
        if self.output not in ("plm_stream", "mean"):
            raise MeftError(f"output={self.output!r}; choose 'plm_stream' or 'mean'")
        if self.check_action not in ("warn", "raise"):
            raise MeftError(f"check_action={self.check_action!r}; choose 'warn' or 'raise'")
        if self.adapter_dim < 1:
            raise MeftError(f"adapter_dim={self.adapter_dim}; give a positive width")
