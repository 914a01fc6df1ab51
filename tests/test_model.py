"""model.py: the five variants of Sec. 3, their parameter counts (Table 7), the naming rule that
merging relies on, the two routes of Fig. 2(b), timm loading and the seed hand-over."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import ARCHS, VARIANTS, build_model, expand_experts, load_vit_weights, shared_key

SMALL = dict(vocab_size=50, image_size=32, patch_size=8, depth=4)  # a fast stand-in for every test


def small_model(variant, task="pretrain", arch="vit_tiny", **kw):
    torch.manual_seed(0)
    return build_model(arch, variant, task, **{**SMALL, **kw}).eval()


def random_batch(b=2, length=7, vocab=50, image_size=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0  # the first caption is padded after 4 tokens
    return torch.randn(b, 3, image_size, image_size, generator=g), ids, mask


# --- Table 7 ----------------------------------------------------------------------------------

TABLE7 = {"msa": 217e6, "custom_attn": 151e6, "custom_ffn": 184e6, "custom_ln": 118e6, "maa": 118e6}


def vit_base_vqa_counts():
    with torch.device("meta"):  # shapes only: counts need no memory and no init time
        return {v: sum(p.numel() for p in build_model("vit_base", v, "vqa").parameters()) for v in VARIANTS}


def test_parameter_counts_match_table7_within_2_percent():
    counts = vit_base_vqa_counts()
    for variant, paper in TABLE7.items():
        assert abs(counts[variant] - paper) / paper < 0.02, (variant, counts[variant])


def test_parameter_differences_to_maa_match_table7_within_2_percent():
    counts = vit_base_vqa_counts()
    for variant in ("msa", "custom_attn", "custom_ffn"):
        ours, paper = counts[variant] - counts["maa"], TABLE7[variant] - TABLE7["maa"]
        assert abs(ours - paper) / paper < 0.02, (variant, ours)
    assert counts["custom_ln"] - counts["maa"] < 0.001 * TABLE7["maa"]  # LayerNorms are tiny


# --- the naming rule merge.py relies on ----------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_deleting_modality_segment_gives_exactly_the_maa_keys(variant):
    msa = small_model(variant).state_dict()
    maa = small_model("maa").state_dict()
    collapsed = {}
    for key, value in msa.items():
        collapsed.setdefault(shared_key(key), value.shape)
        assert collapsed[shared_key(key)] == value.shape
    assert set(collapsed) == set(maa)
    assert all(collapsed[k] == maa[k].shape for k in maa)


def test_experts_exist_where_the_paper_puts_them():
    keys = small_model("msa").state_dict()
    n, m = SMALL["depth"], 2
    for i in range(n):
        experts = {e for e in ("v", "l", "vl") if f"blocks.{i}.attn.{e}.qkv.weight" in keys}
        assert experts == ({"v", "l"} if i < n - m else {"v", "l", "vl"}), i
    assert "word_embed.weight" in keys and "patch_embed.proj.weight" in keys  # never merged
    assert any("modality_embed" in k for k in keys)
    # custom_attn: experts only in attention; the norms and the FFN are shared
    attn_only = small_model("custom_attn").state_dict()
    assert "blocks.0.attn.l.proj.weight" in attn_only and "blocks.0.mlp.fc1.weight" in attn_only
    assert "blocks.0.norm1.weight" in attn_only and "norm.weight" in attn_only


def test_no_other_module_is_named_like_an_expert():
    for variant in VARIANTS:
        for name, _ in small_model(variant, task="vqa").named_modules():
            parts = name.split(".")
            for i, part in enumerate(parts):
                if part in ("v", "l", "vl"):  # its parent must be a sublayer of a block or the final norm
                    assert parts[i - 1] in ("attn", "mlp", "norm1", "norm2", "norm"), name


def test_all_experts_start_from_the_same_initialization():
    state = small_model("msa").state_dict()
    for key, value in state.items():
        if ".l." in key or ".vl." in key:
            vision_key = key.replace(".l.", ".v.").replace(".vl.", ".v.")
            assert torch.equal(value, state[vision_key]), key


# --- the two routes -----------------------------------------------------------------------------

def by_hand(model, x, modality, layers, mask=None):
    """Blocks `layers` computed from their modules, picking each sublayer's expert explicitly (an
    independent reading of Fig. 2b: pre-norm, x += attn(norm1(x)); x += mlp(norm2(x)))."""
    pick = lambda sub: sub[modality] if isinstance(sub, torch.nn.ModuleDict) else sub  # noqa: E731
    for block in layers:
        x = x + pick(block.attn)(pick(block.norm1)(x), mask)
        x = x + pick(block.mlp)(pick(block.norm2)(x))
    return x


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_routes_compute_fig2b_for_every_variant_and_size(arch, variant):
    torch.manual_seed(0)
    model = build_model(arch, variant, vocab_size=50, image_size=32, depth=3, fusion_layers=1).eval()
    with torch.no_grad():  # experts that differ, so that using the wrong one shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, ids, mask = random_batch()
    d, lower, top = ARCHS[arch]["dim"], model.blocks[:2], model.blocks[2:]
    norm = lambda m, x: (model.norm[m] if isinstance(model.norm, torch.nn.ModuleDict) else model.norm)(x)  # noqa: E731
    with torch.no_grad():
        r = model.routes(images, ids, mask)
        img_low = by_hand(model, model.embed_image(images), "v", lower)
        txt_low = by_hand(model, model.embed_text(ids), "l", lower, mask.bool())
        pair_mask = torch.cat([torch.ones(2, 5, dtype=torch.bool), mask.bool()], dim=1)
        expected = {
            "image": norm("v", by_hand(model, img_low, "v", top)),
            "text": norm("l", by_hand(model, txt_low, "l", top, mask.bool())),
            "fused": norm("vl", by_hand(model, torch.cat([img_low, txt_low], 1), "vl", top, pair_mask)),
        }
        for name, want in expected.items():
            torch.testing.assert_close(getattr(r, name), want, rtol=1e-4, atol=1e-5, msg=name)
        assert (r.image.shape, r.text.shape, r.fused.shape) == ((2, 5, d), (2, 7, d), (2, 12, d))
        # the single-route encoders are exactly the halves of routes()
        assert torch.equal(model.encode_image(images), r.image)
        assert torch.equal(model.encode_text(ids, mask), r.text)
        assert torch.equal(model.encode_pair(images, ids, mask), r.fused)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_does_not_change_the_other_tokens(variant):
    model = small_model(variant)
    images, ids, mask = random_batch()
    other = ids.clone()
    other[0, 4:] = 7  # different content at the padded positions of caption 0
    with torch.no_grad():
        a, b = model.encode_text(ids, mask), model.encode_text(other, mask)
        torch.testing.assert_close(a[0, :4], b[0, :4], rtol=0, atol=1e-6)
        fa, fb = model.encode_pair(images, ids, mask), model.encode_pair(images, other, mask)
        real = torch.arange(5 + 4)  # the image tokens and the 4 real text tokens
        torch.testing.assert_close(fa[0, real], fb[0, real], rtol=0, atol=1e-6)


def test_routes_use_the_experts_of_fig2():
    """Perturbing the `vl` experts changes the fusion route only; `l` experts the text side only."""
    model = small_model("msa")
    images, ids, mask = random_batch()
    with torch.no_grad():
        before = (model.encode_image(images), model.encode_text(ids, mask), model.encode_pair(images, ids, mask))
        model.blocks[-1].mlp["vl"].fc2.bias.add_(1.0)
        after = (model.encode_image(images), model.encode_text(ids, mask), model.encode_pair(images, ids, mask))
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert not torch.allclose(before[2], after[2])
        model.blocks[0].attn["l"].proj.bias.add_(1.0)
        assert torch.equal(model.encode_image(images), before[0])
        assert not torch.allclose(model.encode_text(ids, mask), before[1])


def head_batch():
    images, ids, mask = random_batch()
    return {"images": images, "images2": torch.randn_like(images), "input_ids": ids, "attention_mask": mask}


def test_vqa_head_pools_the_first_fused_token():
    model = small_model("msa", task="vqa", num_answers=11)
    b = head_batch()
    with torch.no_grad():
        fused = model.encode_pair(b["images"], b["input_ids"], b["attention_mask"])
        expected = model.vqa_head(torch.tanh(model.pooler[0](fused[:, 0])))  # BERT pooler on token 0
        torch.testing.assert_close(model(b), expected)
        assert model(b).shape == (2, 11)
    assert not hasattr(model, "mlm_head") and not hasattr(model, "itc_image_proj")  # only the task's heads


def test_nlvr2_pairs_the_statement_with_both_images():
    model = small_model("msa", task="nlvr2")
    b = head_batch()
    with torch.no_grad():
        left = model.encode_pair(b["images"], b["input_ids"], b["attention_mask"])
        right = model.encode_pair(b["images2"], b["input_ids"], b["attention_mask"])
        pooled = torch.cat([torch.tanh(model.pooler[0](left[:, 0])), torch.tanh(model.pooler[0](right[:, 0]))], -1)
        torch.testing.assert_close(model(b), model.nlvr2_head(pooled))
        swapped = model({**b, "images": b["images2"], "images2": b["images"]})
        assert not torch.allclose(swapped, model(b))  # left and right are told apart


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_vision_heads_use_the_patch_tokens_of_the_vision_route_only(task):
    model = small_model("msa", task=task, num_classes=5, seg_classes=4)
    b = head_batch()
    with torch.no_grad():
        feats = model.encode_image(b["images"])
        if task == "cls":  # BEiT: mean of the patch tokens (not [CLS]), normed, linear
            expected = model.cls_head(model.cls_norm(feats[:, 1:].mean(1)))
        else:  # per-patch classes on the 4x4 grid, bilinearly upsampled to 32x32 pixels
            grid = model.seg_head(feats[:, 1:]).transpose(1, 2).reshape(2, 4, 4, 4)
            expected = F.interpolate(grid, size=32, mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(b), expected)
        before = model(b)
        model.blocks[-1].mlp["vl"].fc2.bias.add_(1.0)  # language / fusion experts play no part
        model.blocks[0].attn["l"].proj.bias.add_(1.0)
        assert torch.equal(model(b), before)


# --- seed hand-over (Sec. 4.3) ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["msa", "custom_attn", "custom_ffn", "custom_ln"])
def test_seed_handover_msa_equals_maa(variant):
    maa = small_model("maa")
    with torch.no_grad():  # make the maa weights non-trivial
        for p in maa.parameters():
            p.add_(0.05 * torch.randn_like(p))
    msa = small_model(variant)
    msa.load_state_dict(expand_experts(maa.state_dict(), msa), strict=True)
    images, ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(msa.encode_image(images), maa.encode_image(images))
        assert torch.equal(msa.encode_text(ids, mask), maa.encode_text(ids, mask))
        assert torch.equal(msa.encode_pair(images, ids, mask), maa.encode_pair(images, ids, mask))


# --- loading timm ViT weights ------------------------------------------------------------------------

def timm_state(depth=4, dim=192, patch=8, image=32, seed=0):
    """A random state dict with timm's ViT key names and shapes (plus a classifier head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + (image // patch) ** 2, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim), "head.weight": r(10, dim), "head.bias": r(10)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
               p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
               p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
               p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
               p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
               p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)}
    return sd


def reference_vit_features(sd, images, depth=4, heads=3, patch=8):
    """timm's forward_features written out independently: explicit softmax attention, no einops."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    b, d = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], 1) + sd["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, -1, d)
        x = x + h @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_state_dict_loads_into_every_expert_and_reproduces_reference(variant):
    sd = timm_state()
    model = small_model(variant)
    load_vit_weights(model, {"module." + k: v for k, v in sd.items()})  # a DDP-saved file
    with torch.no_grad():
        model.modality_embed.zero_()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        ours, ref = model.encode_image(images), reference_vit_features(sd, images)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
    state = model.state_dict()
    for key in state:  # every expert holds the checkpoint's tensor
        if shared_key(key) in sd:
            assert torch.equal(state[key], sd[shared_key(key)]), key


def test_load_vit_weights_resizes_pos_embed():
    sd = timm_state(image=64)  # an 8x8 grid loaded into a 4x4-grid model
    model = small_model("maa")
    load_vit_weights(model, sd)
    assert model.pos_embed.shape == (1, 17, 192)
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # [CLS] position kept as is


# --- bad input -------------------------------------------------------------------------------------

def test_unknown_arch_variant_task_or_option_name_it():
    with pytest.raises(ValueError, match="vit_huge"):
        build_model("vit_huge", "msa")
    with pytest.raises(ValueError, match="moe"):
        build_model("vit_tiny", "moe")
    with pytest.raises(ValueError, match="captioning"):
        build_model("vit_tiny", "msa", "captioning")
    with pytest.raises(ValueError, match="depht"):
        build_model("vit_tiny", "msa", depht=4)


def test_wrong_image_size_and_too_long_text_name_it():
    model = small_model("msa")
    with pytest.raises(ValueError, match=r"image_size=32.*\(2, 3, 48, 48\)"):
        model.encode_image(torch.zeros(2, 3, 48, 48))
    with pytest.raises(ValueError, match="41 tokens exceed max_text_len=40"):
        model.encode_text(torch.zeros(1, 41, dtype=torch.long), torch.ones(1, 41))


def test_bad_vit_checkpoints_name_the_key():
    model = small_model("msa")
    sd = timm_state()
    with pytest.raises(KeyError, match="blocks.2.mlp.fc1.bias"):
        load_vit_weights(model, {k: v for k, v in sd.items() if k != "blocks.2.mlp.fc1.bias"})
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight"):
        load_vit_weights(model, sd | {"blocks.1.attn.qkv.weight": torch.zeros(5, 5)})
    with pytest.raises(KeyError, match="fc_norm.weight"):
        load_vit_weights(model, sd | {"fc_norm.weight": torch.ones(192)})
    with pytest.raises(KeyError, match="blocks.4.norm1.weight"):  # a deeper ViT than the model
        load_vit_weights(model, timm_state(depth=5))


def test_bad_seed_checkpoint_names_the_key():
    msa, maa = small_model("msa"), small_model("maa").state_dict()
    with pytest.raises(KeyError, match="blocks.0.mlp.fc2.weight"):
        expand_experts({k: v for k, v in maa.items() if k != "blocks.0.mlp.fc2.weight"}, msa)
    with pytest.raises(ValueError, match="word_embed.weight"):
        expand_experts(maa | {"word_embed.weight": torch.zeros(3, 3)}, msa)
    with pytest.raises(KeyError, match="extra.bias"):
        expand_experts(maa | {"extra.bias": torch.zeros(3)}, msa)
