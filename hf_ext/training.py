"""The optimisation loop the hf-ext trainers share (nanoGPT's shape, through accelerate).

Several trainers run the same steps: compute a loss, back-propagate it through the ``Accelerator``, clip the
gradient norm, step the optimizer and the schedule, clear the gradients, and show the loss on a progress bar.
``optimize`` is that loop once; each trainer keeps what is its own (the model, the data of a step, the loss,
the optimizer and schedule it builds). Trainers whose loops differ in kind (epochs with a dev-set choice,
checkpoint and resume, dead-latent resampling) keep their own loops.

Example:
    >>> acc = Accelerator()                                                           # doctest: +SKIP
    >>> model, opt, sched = acc.prepare(model, opt, sched)                            # doctest: +SKIP
    >>> losses = optimize(acc, model, opt, sched, lambda step: model(batch(step)).loss, steps=100,
    ...                   desc="fine-tune", max_grad_norm=1.0)                        # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable

import torch


def optimize(acc, model, opt, sched, step_loss: Callable[[int], torch.Tensor], steps: int, desc: str,
             progress: bool = True, max_grad_norm: float | None = None, log_every: int = 1) -> list[float]:
    """Run ``steps`` optimizer steps on prepared ``model``, ``opt`` and ``sched`` (``sched`` may be None).

    ``step_loss(step)`` returns the step's scalar loss. The gradient norm is clipped to ``max_grad_norm`` when
    given. Returns the loss of every ``log_every``-th step (a float each; reading it waits for the device, so
    a GPU trainer logs less often), the last of which the progress bar shows.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps={steps}: train for at least one step")
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        loss = step_loss(step)
        acc.backward(loss)
        if max_grad_norm is not None:
            acc.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0:
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
