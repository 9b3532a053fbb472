"""The check every MEFT gradient test shares: the monitor's reading bounds the gradient error."""
from __future__ import annotations

from numerics import U32


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def assert_monitor_bounds_the_gradient_error(pm, a, b, silent=True):
    """``a`` reversible, ``b`` autograd gradients, from a step the monitor checked (check_every=1).

    The bound: relative gradient error <= the relative error of the first layer's rebuilt input, which the
    monitor reports. That input is the worst rebuilt one (errors grow by 1/(lam*beta) per layer going
    down), and the adapter gradients are smooth functions of the rebuilt inputs; every measured ratio is
    below 0.03 (MiniLM and SmolLM2, also under emulated recompute differences), so the bound has >= 30x
    room and fails only when the gradients are wrong for another reason than the reconstruction.
    With an exact reconstruction the gradients may still differ by float32 rounding of the accumulation
    order, hence the floor U32. ``silent``: the reconstruction is also within the monitor's threshold.
    """
    recon = pm.base_model.last_recon_error
    assert recon is not None and b.norm() > 0
    assert rel(a, b) <= max(recon, U32), (rel(a, b), recon)
    if silent:
        assert recon <= pm.base_model.peft_config["default"].check_threshold, recon
