"""Replaying the unchanged layers gives the full forward's NLL bit for bit, and skips their compute."""
import numpy as np
import pytest
import torch

from qlib import replay
from qlib.studies import block_precision as bp


def _tiny(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def _full_nll(model, ids, context):
    windows = ids[: ids.numel() // context * context].view(-1, context)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").reshape(-1)


def test_replayed_layers_give_the_full_forward_and_are_not_run():
    model, ids = _tiny(), torch.randint(0, 64, (10 * 16 + 5,))
    p = replay.PrefixNLL(model, ids, 16, batch=4)
    assert len(p.batches) == 3 and np.array_equal(p.nll(record=True), _full_nll(model, ids, 16).double().numpy())
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1.5)  # change block 2 only
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, j=j: calls.append(j))
             for j, layer in enumerate(model.model.layers)]
    got = p.nll(start=2)
    for h in hooks:
        h.remove()
    assert set(calls) == {2, 3} and isinstance(model.model.layers[0], type(model.model.layers[3]))
    assert np.array_equal(got, _full_nll(model, ids, 16).double().numpy())
    # a start past the change is wrong by construction: the replay really is used
    assert not np.array_equal(p.nll(start=3), got)


def test_the_search_loss_replays_from_the_first_changed_block():
    model = _tiny()
    r = bp.Rounder(model)
    ids = torch.randint(0, 64, (8 * 16,))
    loss = bp.DevLoss(r, ids, 16)

    def fresh(bitmap):  # a full forward with the blocks at `bitmap`
        r.set(bitmap)
        return float(replay.PrefixNLL(model, ids, 16).nll().mean())

    assert loss([8] * 4, keep=True) == fresh([8] * 4)
    assert loss([8, 8, 2, 8]) == fresh([8, 8, 2, 8])
    assert loss([8, 2, 8, 8], keep=True) == fresh([8, 2, 8, 8])
    assert loss([8, 2, 8, 2]) == fresh([8, 2, 8, 2])   # from the kept bitmap, block 3 only
    assert loss([8, 2, 8, 2]) != pytest.approx(loss([8] * 4), abs=0)


def test_no_window_is_refused():
    with pytest.raises(ValueError, match="no window"):
        replay.PrefixNLL(_tiny(), torch.arange(10), 16)
