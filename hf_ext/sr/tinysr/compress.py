"""TinySR (https://arxiv.org/abs/2508.17434): compress a one-step SR teacher pipeline into a student.

Steps, each a tested pure function or a training loop through accelerate:
1. **Depth search** (``depth_search.search_depth``): a copy of the teacher's transformer trains under sampled
   block masks (Dynamic Inter-block Activation + Expansion-Corrosion) to reproduce the teacher's one-step
   latents; the most likely mask names the ``keep_blocks`` blocks that survive.
2. **Prune** (``prune_student``): ``surgery.keep_blocks`` makes the transformer really shorter, and
   ``surgery.drop_text_stream`` (with ``drop_text_stream=True``) removes its prompt tokens; the VAE is
   channel-pruned (``vae_channel_pruning``) by importance to ``vae_width``, its attention removed and its k x k
   convs made SepConv (``vae_compression``). The latent space is the teacher's, so the teacher's latents stay
   valid targets. Works on a converted TSD-SR teacher (``TSDSRPipeline.to_onestep()``), whose latent math the
   student keeps.
3. **Distil** (``distillation.distill``): the student's one step learns the teacher's latents, its decoder the
   teacher's images, on the train photos. The teacher labels every input, so the LR can come from any
   degradation; the default mixes the Real-ESRGAN-style one with clean bicubic downscaling, so that the student
   follows the teacher on both.
4. **Pre-cache** (``surgery.precache``): the time and prompt embeddings and every AdaLN modulation become stored
   buffers, and the modules that made them are dropped (bit-identical).

Example:
    >>> teacher = OneStepSRPipeline.from_pretrained("tests/fixtures/sr_teacher")               # doctest: +SKIP
    >>> student, log = compress_tinysr(teacher, TinySRConfig(keep_blocks=4, vae_width=16))     # doctest: +SKIP
    >>> student.save_pretrained("out/tinysr")                                                   # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from ...errors import BadConfigError
from ..data import DEGRADATIONS, sr_batches
from ..onestep.pipeline_onestep_sr import OneStepSRPipeline
from ..onestep.training import latents
from .depth_search import DepthSearchConfig, search_depth
from .distillation import distill
from .surgery import drop_text_stream, keep_blocks, precache
from .vae_channel_pruning import prune_vae_channels
from .vae_compression import remove_attention, to_sepconv_vae


@dataclass
class TinySRConfig:
    keep_blocks: int                    # transformer blocks that survive
    vae_width: int                      # first VAE block's width after channel pruning (others scale alike)
    group_size: int = 4                 # depth search: blocks per group (each keeps keep_blocks / groups)
    search_steps: int = 300
    distill_steps: int = 1000
    batch_size: int = 8
    crop: int = 96                      # HR training crop (pixels)
    lr: float = 5e-4
    sepconv: bool = True
    output_weight: float = 1.0          # distillation: weight of the student's whole path vs the teacher's image
    drop_text_stream: bool = False      # remove the prompt tokens before distilling (TinySR's TinySD3 transformer)
    degrade: str = "mixed"              # training LR: "realistic", "bicubic" or "mixed" (teacher-labelled, so any)
    seed: int = 0


@torch.no_grad()
def prune_student(teacher: OneStepSRPipeline, keep: list[int], vae_width: int, sepconv: bool = True,
                  text_stream: bool = True) -> OneStepSRPipeline:
    """The student before distillation: the transformer's blocks ``keep`` only (and without its prompt tokens
    unless ``text_stream``), and the VAE channel-pruned to ``vae_width``, without attention, with SepConv convs
    (``sepconv``). ``teacher`` is left untouched."""
    vae = remove_attention(prune_vae_channels(teacher.vae, vae_width))
    transformer = keep_blocks(teacher.transformer, keep)
    return OneStepSRPipeline(vae=to_sepconv_vae(vae) if sepconv else vae,
                             transformer=transformer if text_stream else drop_text_stream(transformer),
                             latent_math=teacher.config.latent_math)


def check_config(teacher, c: TinySRConfig) -> int:
    """Per-group keep count; refuses (``BadConfigError``) settings that cannot be met, before any slow work."""
    n = teacher.transformer.config.num_layers
    if n % c.group_size:
        raise BadConfigError(f"the teacher has {n} blocks, which groups of {c.group_size} do not divide; pass another group size")
    groups = n // c.group_size
    if not 1 <= c.keep_blocks <= n or c.keep_blocks % groups:
        raise BadConfigError(f"keep_blocks={c.keep_blocks}: with {n} blocks in {groups} groups of {c.group_size}, keep a "
                         f"multiple of {groups} between {groups} and {n}")
    if c.degrade not in DEGRADATIONS:
        raise BadConfigError(f"degrade={c.degrade!r}: use one of {DEGRADATIONS}")
    if teacher.transformer.config.precached:
        raise BadConfigError("the teacher is already pre-cached; give the uncached teacher (its AdaLN layers train)")
    try:
        prune_vae_channels(teacher.vae, c.vae_width)
    except ValueError as e:
        raise BadConfigError(f"vae_width: {e}") from None
    return c.keep_blocks // groups


def compress_tinysr(teacher: OneStepSRPipeline, config: TinySRConfig, progress: bool = True, accelerator=None):
    """Search, prune, distil and pre-cache: returns (student pipeline, log). Both loops train through
    ``accelerator`` (default: a new ``Accelerator()`` each)."""
    c = config
    per_group = check_config(teacher, c)
    teacher.vae.requires_grad_(False).eval()
    teacher.transformer.requires_grad_(False).eval()
    scales = tuple(teacher.transformer.config.trained_upscales or (4,))
    torch.manual_seed(c.seed)

    def latent_pairs():                                              # (z_lr, the teacher's one-step latent)
        for up, _, _ in sr_batches("train", c.crop, c.batch_size, scales, seed=c.seed, degrade=c.degrade):
            with torch.no_grad():                                    # (not around the yield: it would leak)
                z = latents(teacher.vae, up.to(teacher.device), teacher.config.latent_math)
                target = z - teacher.transformer.sigma * teacher.transformer(z)
            yield z, target

    searched = copy.deepcopy(teacher.transformer).requires_grad_(True)
    search = DepthSearchConfig(group_size=c.group_size, keep=per_group, steps=c.search_steps, lr=c.lr)
    keep, gates, search_log = search_depth(_OneStep(searched), latent_pairs(), search, progress,
                                           accelerator=accelerator)
    student = prune_student(OneStepSRPipeline(vae=teacher.vae, transformer=searched, latent_math=teacher.config.latent_math),
                            keep, c.vae_width, c.sepconv, text_stream=not c.drop_text_stream)
    student.vae.requires_grad_(True)
    student.transformer.requires_grad_(True)
    batches = sr_batches("train", c.crop, c.batch_size, scales, seed=c.seed + 1, degrade=c.degrade)
    distill_log = distill(student, teacher, batches, c.distill_steps, lr=c.lr, output_weight=c.output_weight,
                          progress=progress, accelerator=accelerator)
    student = OneStepSRPipeline(vae=student.vae.eval(), transformer=precache(student.transformer).eval(),
                                latent_math=student.config.latent_math)
    return student, {"config": asdict(c), "keep": keep, "search_final_loss": search_log["final_loss"],
                     "distill_final_loss": distill_log["final_loss"], "distill_loss_every_50": distill_log["loss_every_50"]}


def continue_distillation(student: OneStepSRPipeline, teacher: OneStepSRPipeline, config: TinySRConfig,
                          progress: bool = True, accelerator=None):
    """More distillation steps (``config.distill_steps``) for an already compressed ``student``: the structure,
    the kept blocks and the pre-cached modulations stay; every other weight trains, through ``accelerator``
    (default: a new ``Accelerator()``). Returns (student, log)."""
    if not student.transformer.config.precached:
        raise BadConfigError("the student is not pre-cached; compress it with compress_tinysr first")
    teacher.vae.requires_grad_(False).eval()
    teacher.transformer.requires_grad_(False).eval()
    scales = tuple(teacher.transformer.config.trained_upscales or (4,))
    seed = config.seed + 2                                       # fresh batches, not the first run's
    torch.manual_seed(seed)
    student.vae.requires_grad_(True)
    student.transformer.requires_grad_(True)
    batches = sr_batches("train", config.crop, config.batch_size, scales, seed=seed, degrade=config.degrade)
    log = distill(student, teacher, batches, config.distill_steps, lr=config.lr,
                  output_weight=config.output_weight, progress=progress, accelerator=accelerator)
    student.vae.eval()
    student.transformer.eval()
    return student, {"config": asdict(config), "continued": True, "distill_final_loss": log["final_loss"],
                     "distill_loss_every_50": log["loss_every_50"]}


class _OneStep(torch.nn.Module):
    """z -> z - sigma * v(z, mask), with the transformer's ``sigma``: what the depth search fits to the teacher's
    one-step latents (it passes ``block_mask``)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    @property
    def device(self):
        return self.transformer.device

    def forward(self, z, block_mask=None):
        return z - self.transformer.sigma * self.transformer(z, block_mask=block_mask)
