"""LoRA fine-tuning (fusion.training.lora): adapters start as the pretrained model, only they
(and what train_also names) learn, and merging writes them into an ordinary model whose
outputs equal the adapted one's."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from fusion.config import LoraTrainConfig  # noqa: E402
from fusion.errors import UserError  # noqa: E402
from fusion.models.attention import layout_from_segments  # noqa: E402
from fusion.models.chameleon import Chameleon  # noqa: E402
from fusion.models.schemas import ChameleonConfig  # noqa: E402
from fusion.training.lora import add_lora, has_lora, merge_lora  # noqa: E402


def tiny_chameleon(tokenizer) -> Chameleon:
    torch.manual_seed(0)
    cfg = ChameleonConfig(source_alignment=True, source_copy=True,
                          backbone_overrides={"d_model": 64, "n_layers": 2, "qk_norm": True})
    model = Chameleon(cfg, tokenizer.vocab_size, codebook_size=16, codes_per_image=4)
    with torch.no_grad():  # a head with a pretrained model's range of logits, so that what
        model.lm_head.weight.mul_(20.0)  # the frozen head can express is not the limit
    return model


def logits(model, ids):
    return model(ids, layout_from_segments([[(0, "text", ids.shape[1])]] * ids.shape[0]))


def test_adapters_start_as_the_model_learn_alone_and_merge_into_it(tokenizer):
    model = tiny_chameleon(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = logits(model, ids)
    plain_keys = set(model.state_dict())
    add_lora(model, LoraTrainConfig(rank=8, alpha=16.0, train_also=["copy_gate"]))
    assert has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), start)  # B = 0: the same function
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(".lora_A." in n for n in trained) == 7 * 2  # 7 projections x 2 blocks
    assert all(".lora_" in n or n.startswith("copy_gate.") for n in trained)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trained.values(), lr=3e-2)
    losses = []
    for _ in range(60):  # overfit one batch through the adapters alone
        out = logits(model, ids)
        loss = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        adapted = logits(model, ids)
        merge_lora(model)
        assert not has_lora(model) and set(model.state_dict()) == plain_keys
        torch.testing.assert_close(logits(model, ids), adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapted, start)


@pytest.mark.parametrize("change, message", [
    (dict(targets=["wx"]), "choose among"),
    (dict(targets=[]), "choose among"),
    (dict(train_also=["nothing_here"]), "names no parameter"),
    (dict(rank=0), "must be positive"),
])
def test_bad_lora_settings_are_refused(tokenizer, change, message):
    with pytest.raises(UserError, match=message):
        add_lora(tiny_chameleon(tokenizer), LoraTrainConfig(**{"rank": 4, **change}))
