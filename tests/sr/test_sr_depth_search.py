"""TinySR depth search: masks keep exactly N blocks, gradients reach the gates, the search finds the blocks
that matter (including a block moving between groups by expansion-corrosion)."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_ext.sr.onestep.modeling_onestep_sr import OneStepSRTransformer2DModel
from hf_ext.sr.tinysr.depth_search import BlockGates, DepthSearchConfig, search_depth
from hf_ext.sr.tinysr.surgery import keep_blocks


def test_sampled_masks_are_binary_keep_n_blocks_and_train_the_gates():
    torch.manual_seed(0)
    gates = BlockGates(num_blocks=12, group_size=4, keep=2)
    with torch.no_grad():
        gates.logits.normal_()
        gates.pair_logits.normal_()
    for _ in range(50):
        m = gates.sample(tau=0.5)
        assert set(m.tolist()) <= {0.0, 1.0} and int(m.sum()) == 6
    (gates.sample(1.0) * torch.arange(12.0)).sum().backward()
    assert gates.logits.grad.abs().sum() > 0 and gates.pair_logits.grad.abs().sum() > 0
    assert len(gates.keep_indices()) == 6
    with pytest.raises(ValueError, match="divide"):
        BlockGates(num_blocks=10, group_size=4)


def teacher_with_idle_blocks(num_layers: int, active: set[int]):
    """A tiny model whose blocks outside ``active`` are exactly the identity (zero AdaLN-Zero modulation)."""
    torch.manual_seed(0)
    model = OneStepSRTransformer2DModel(num_layers=num_layers, num_attention_heads=2, attention_head_dim=8,
                                        joint_attention_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    with torch.no_grad():
        for i, block in enumerate(model.transformer_blocks):
            if i not in active:
                for lin in (block.norm1.linear, block.norm1_context.linear):
                    lin.weight.zero_()
                    lin.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("num_layers, active, ec", [(4, {0, 2}, False), (8, {0, 1, 2, 5}, True)])
def test_search_keeps_the_blocks_that_matter(num_layers, active, ec):
    teacher = teacher_with_idle_blocks(num_layers, active)
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(2, 4, 6, 6, generator=g) for _ in range(4)]
    with torch.no_grad():
        batches = [(z, teacher(z)) for z in zs]
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)                                                   # the Gumbel noise (seeds 1-3 pass too)
    keep, gates, log = search_depth(student, batches, DepthSearchConfig(steps=60, lr=0.0, gate_lr=0.1,
                                                                        expansion_corrosion=ec), progress=False)
    assert set(keep) == active, (keep, log["final_loss"])
    with torch.no_grad():
        pruned = keep_blocks(teacher, keep)
        assert pruned.config.num_layers == len(active)
        # bit for bit: an idle block adds 0 * (finite attention and MLP outputs) = exact zeros to both streams,
        # and the kept blocks are the same computation on the same values and shapes
        assert torch.equal(pruned(zs[0]), batches[0][1])
