"""Capture: rows by token position, every module in execution order, padding dropped."""

import pytest
import torch

from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import VarlenMeta
from lockstep.models.qwen3.capture import Capture


@pytest.fixture(scope="module")
def model(tied_dir):
    return build_model(ModelConfig(path=str(tied_dir)), "cpu")


def _forward(model, tokens, positions, cu_seqlens):
    return model(torch.tensor(tokens), torch.tensor(positions), VarlenMeta(torch.tensor(cu_seqlens, dtype=torch.int32)))


@torch.no_grad()
def test_rows_follow_positions_and_padding_is_dropped(model):
    tokens = [5, 9, 12, 7, 3]
    with Capture(model, logits_positions=torch.tensor([2, 3, 4])) as capture:
        # the sequence in two forwards; the second carries a 2-row padding sequence at position 0
        first = _forward(model, tokens[:3], [0, 1, 2], [0, 3])
        second = _forward(model, tokens[3:] + [0, 0], [3, 4, 0, 1], [0, 2, 4])
        model.logits(torch.cat([first[2:], second[:2]]))  # rows that predict tokens 3, 4 and the next
    acts = capture.activations()
    assert acts.order[0] == "tok_embeddings" and acts.order[-2:] == ["norm", "output"]
    assert acts.order.index("layers.0.attention.qkv") < acts.order.index("layers.0.attention") < acts.order.index("layers.0")
    assert all(acts.positions[m].tolist() == [0, 1, 2, 3, 4] for m in acts.order if m != "output")
    assert acts.positions["output"].tolist() == [2, 3, 4]
    assert acts.inputs["tok_embeddings"][0].tolist() == tokens
    # the final norm's first output is the model's output, row for row
    assert torch.equal(acts.outputs["norm"][0], torch.cat([first, second[:2]]))
    assert [t.shape for t in acts.outputs["layers.1.ffn_norm"]] == [(5, 64), (5, 64)]  # (normed, x + residual)

    with Capture(model) as capture:  # a sequence that skips a position is refused when read
        _forward(model, tokens[:2], [0, 1], [0, 2])
        _forward(model, tokens[2:3], [5], [0, 1])
    with pytest.raises(RuntimeError, match="starts at position 5, expected 2"):
        capture.activations()
    assert not model._forward_hooks and not model.layers["0"]._forward_hooks  # hooks removed on exit
