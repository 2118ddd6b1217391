"""Every tower at tiny size: forward/backward with masks, MAE masking, padding/lead invariances, checkpointing."""

import pytest
import torch

from medfm.model_zoo import build_multimodal, create, list_models, tiny_config
from medfm.model_zoo.masking import random_masking

B = 2


def _batch(seed=0, n_leads=12, t=500, n_events=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, t - 180])
    ev = torch.tensor([n_events, 5])
    return {
        "image": torch.randn(B, 1, 32, 32, generator=g),
        "volume": torch.randn(B, 1, 16, 32, 32, generator=g),
        "signal": torch.randn(B, n_leads, t, generator=g),
        "signal_valid": torch.arange(t)[None] < lengths[:, None],
        "signal_leads": torch.tensor([[True] * n_leads, [True] * (n_leads - 3) + [False] * 3]),
        "ehr_codes": torch.randint(2, 64, (B, n_events), generator=g),
        "ehr_times": -torch.rand(B, n_events, generator=g) * 400,
        "ehr_values": torch.randn(B, n_events, generator=g) * 50,
        "ehr_has_value": torch.rand(B, n_events, generator=g) > 0.5,
        "ehr_valid": torch.arange(n_events)[None] < ev[:, None],
        "text_ids": torch.tensor([[101, 2053, 11325, 9556, 102, 0], [101, 2235, 2187, 1041, 2464, 102]]),
        "text_valid": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_multimodal(tiny_config())


def test_registry_names_and_errors():
    names = list_models()
    for expected in ("vit2d_tiny_p16", "vit2d_base_p14", "vit2d_huge_p14", "vit3d_tiny", "vit3d_base_p4x16",
                     "signal_tiny", "ehr_tiny", "text_minilm", "text_bert_tiny"):
        assert expected in names
    assert set(list_models("signal")) == {"signal_tiny", "signal_small", "signal_base"}
    from medfm.schema import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'vit2d_tiny_p16'"):
        create("vit2d_tiny_p61")
    with pytest.raises(ConfigError, match="depht"):
        create("vit2d_tiny_p16", depht=2)
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        create("vit2d_tiny_p16", img_size=30)


def test_every_modality_forward_backward_with_masks(model):
    batch = _batch()
    total = 0
    for m in model.modalities:
        tokens, pooled = model.encode(m, batch)
        assert tokens.shape[0] == B and tokens.shape[-1] == model.towers[m].width
        emb = model.embed(m, batch)
        assert emb.shape == (B, 32)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
        total = total + emb.sum() + pooled.square().mean()
    for m in model.mae_decoders:
        out = model.mae(m, batch, mask_ratio=0.75)
        assert out["pred"].shape == out["target"].shape
        assert out["mask"].shape == out["pred"].shape[:2]
        total = total + ((out["pred"] - out["target"]) ** 2).mean(-1).mul(out["mask"]).sum()
    for m in model.caption_decoder.context_proj:
        logits = model.caption_logits(m, batch)
        assert logits.shape == (*batch["text_ids"].shape, model.caption_decoder.vocab_size)
        total = total + logits.logsumexp(-1).mean()
    model.zero_grad()
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "logit" not in n]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_learnable_scalars_have_shape_1(model):
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)
    assert all(p.dim() >= 1 for p in model.parameters())


def test_random_masking_contract():
    x = torch.randn(B, 16, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    kept, mask, ids_restore, _ = random_masking(x, 0.75, g1)
    kept2, mask2, _, _ = random_masking(x, 0.75, g2)
    assert torch.equal(kept, kept2) and torch.equal(mask, mask2)  # reproducible with a generator
    assert kept.shape == (B, 4, 4) and mask.sum(1).tolist() == [12.0, 12.0]
    # un-shuffling [kept, zeros] with ids_restore puts every kept token back at its place
    full = torch.cat([kept, torch.zeros(B, 12, 4)], 1)
    restored = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(restored * (1 - mask[..., None]), x * (1 - mask[..., None]))
    # padding is removed before any real token
    valid = torch.ones(B, 16, dtype=torch.bool)
    valid[1, 6:] = False
    _, mask, _, kept_valid = random_masking(x, 0.5, torch.Generator().manual_seed(0), valid=valid)
    # sample 1 has only 6 real tokens for 8 slots: all 6 are kept, and the 2 padded fillers are flagged
    assert mask[1, :6].eq(0).all() and kept_valid[1].sum() == 6 and kept_valid[0].all()


def test_patchify_unpatchify_roundtrip(model):
    b = _batch()
    for m, key in (("image", "image"), ("volume", "volume"), ("signal", "signal")):
        tower = model.towers[m]
        patches = tower.patchify(b[key])
        back = tower.unpatchify(patches) if m == "signal" else tower.unpatchify(patches, tower.grid_size(b[key]))
        torch.testing.assert_close(back, b[key])


def test_signal_padding_and_missing_leads(model):
    tower = model.towers["signal"].eval()
    b = _batch()
    x, masks = tower.batch_inputs(b)
    pooled = tower.pool(tower(x, **masks), **masks)
    x2 = x.clone()
    x2[1, :, 320:] = 1e3  # garbage in the padded tail of sample 1
    x2[1, 9:] = -7.0  # garbage in its missing leads
    pooled2 = tower.pool(tower(x2, **masks), **masks)
    torch.testing.assert_close(pooled, pooled2, atol=1e-5, rtol=1e-5)
    # a missing lead is not the same as a flat lead
    flat = dict(masks, signal_leads=torch.ones_like(masks["signal_leads"]))
    x3 = x.clone()
    x3[1, 9:] = 0
    assert not torch.allclose(tower.pool(tower(x3, **flat), **flat)[1], pooled[1])
    # variable length: a signal that is not a multiple of the patch size still works
    odd = tower(torch.randn(B, 12, 123))
    assert odd.shape == (B, 1 + 3, tower.width)


def test_ehr_padding_invariance_and_unknown_codes(model):
    tower = model.towers["ehr"].eval()
    b = _batch()
    x, masks = tower.batch_inputs(b)
    ref = tower.pool(tower(x, **masks), **masks)
    x2 = x.clone()
    x2[1, 5:] = 3
    masks2 = dict(masks, ehr_values=masks["ehr_values"].clone())
    masks2["ehr_values"][1, 5:] = 1e6
    torch.testing.assert_close(tower.pool(tower(x2, **masks2), **masks2), ref, atol=1e-5, rtol=1e-5)
    x3 = x.clone()
    x3[0, 0] = 10_000  # out of vocabulary -> <unk>, not an index error
    x4 = x.clone()
    x4[0, 0] = 1
    torch.testing.assert_close(tower(x3, **masks), tower(x4, **masks))


def test_vit_other_input_shapes_and_learned_pos_interpolation():
    vit = create("vit2d_tiny_p16", img_size=32, width=32, depth=1, num_heads=2, pos_embed="learned", pool="gap",
                 num_registers=2)
    out = vit(torch.randn(B, 3, 48, 64))
    assert out.shape == (B, 1 + 2 + 12, 32) and vit.pool(out).shape == (B, 32)
    v3 = create("vit3d_tiny", img_size=[16, 32, 32], patch_size=[4, 16, 16], width=36, depth=1, num_heads=2)
    assert v3(torch.randn(B, 1, 8, 48, 32)).shape == (B, 1 + 2 * 3 * 2, 36)
    v3l = create("vit3d_tiny", img_size=[16, 32, 32], patch_size=[4, 16, 16], width=36, depth=1, num_heads=2,
                 pos_embed="learned")
    assert v3l(torch.randn(B, 1, 24, 32, 16)).shape == (B, 1 + 6 * 2, 36)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        v3(torch.randn(B, 1, 10, 32, 32))


def test_mae_decoder_other_grid(model):
    vit = model.towers["volume"]
    x = torch.randn(B, 1, 8, 48, 32)
    latent, mask, ids = vit.forward_masked(x, 0.5, torch.Generator().manual_seed(0))
    pred = model.mae_decoders["volume"](latent, ids, grid=vit.grid_size(x))
    assert pred.shape == vit.patchify(x).shape
    with pytest.raises(ValueError, match="grid"):
        model.mae_decoders["volume"](latent, ids)


@pytest.mark.parametrize("name", ["vit2d_tiny_p16", "signal_tiny", "ehr_tiny", "text_bert_tiny"])
def test_grad_checkpointing_same_gradients(name):
    over = {"text_bert_tiny": {"width": 32, "num_heads": 2, "intermediate_size": 64}}.get(
        name, {"width": 32, "depth": 2, "num_heads": 2})
    if name == "vit2d_tiny_p16":
        over.update(img_size=32, in_chans=1)
    torch.manual_seed(0)
    tower = create(name, **over)
    b = _batch()
    if name == "signal_tiny":
        b["signal"] = b["signal"][:, :12]
    x, masks = tower.batch_inputs(b)

    def grads():
        tower.zero_grad()
        tower.pool(tower(x, **masks), **masks).square().sum().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    tower.train()
    for m in tower.modules():  # deterministic: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref = grads()
    tower.set_grad_checkpointing(True)
    got = grads()
    tower.set_grad_checkpointing(False)
    assert ref.keys() == got.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_caption_decoder_is_causal_and_generates(model):
    model.eval()
    b = _batch()
    logits = model.caption_logits("image", b)
    b2 = dict(b, text_ids=b["text_ids"].clone())
    b2["text_ids"][:, -1] = 7  # change the last token: earlier positions must not move
    torch.testing.assert_close(model.caption_logits("image", b2)[:, :-1], logits[:, :-1])
    tokens, _ = model.encode("image", b)
    ids = model.caption_decoder.generate(tokens, "image", bos_id=101, eos_id=102, max_new_tokens=5)
    assert ids.shape[0] == B and ids[:, 0].eq(101).all() and ids.shape[1] <= 6
