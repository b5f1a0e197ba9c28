"""APT (cdl_core.prompts.apt): [CLS] key/value additions per layer, the merged copy for evaluation, the cosine head.

Expected values are computed here from DESIGN.md section 2 (a hand-written ViT forward with explicit softmax
attention, the EMA written out, the cosine head written out), not with the code under test.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cdl_core.backbones import FrozenViT, create_backbone
from cdl_core.config import BackboneConfig
from cdl_core.model import CosineHead, ContinualModel
from cdl_core.prompts import PROMPT_METHODS, build_prompt_method
from cdl_core.prompts.apt import APT

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

EMBED, KEY_DIM, DEPTH, N_TASKS = 16, 12, 6, 5


def build(params: dict | None = None, embed: int = EMBED, depth: int = DEPTH) -> APT:
    return build_prompt_method("apt", params or {}, embed, KEY_DIM, N_TASKS, depth)


def demo_backbone() -> FrozenViT:
    return create_backbone(BackboneConfig("demo-s", "random"))


def rows_of(out) -> torch.Tensor:
    """The 2*depth rows an attachment adds, reassembled in the order key(0), value(0), key(1), ..."""
    cls_kv = out.attachment.cls_kv
    return torch.cat([torch.cat(cls_kv[layer]) for layer in sorted(cls_kv)])


def train_like_step(method: APT, scale: float = 0.5) -> None:
    """What an optimiser step does to the live rows: changes them in place."""
    with torch.no_grad():
        method.prompts.add_(scale * torch.randn_like(method.prompts))


# -- the hand-written reference forward ------------------------------------------------------------------------
def reference_cls_kv_attention(attn: nn.Module, x: torch.Tensor, add_k: torch.Tensor | None, add_v: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention written out: per head h, the [CLS] token's key and value get the head's slice
    [h*hd, (h+1)*hd) of the key row and value row added; explicit softmax(q k^T * scale) over all tokens."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    hd = dim // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim] for i in range(3))
    out = torch.empty(batch, tokens, dim)
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        kh, vh = k[:, :, cols].clone(), v[:, :, cols].clone()
        if add_k is not None:
            kh[:, 0] = kh[:, 0] + add_k.reshape(-1)[cols]
            vh[:, 0] = vh[:, 0] + add_v.reshape(-1)[cols]
        scores = q[:, :, cols] @ kh.transpose(1, 2) * hd**-0.5  # B x N x N
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        out[:, :, cols] = weights @ vh
    return out @ attn.proj.weight.T + attn.proj.bias


def reference_vit_cls(vit: nn.Module, images: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """timm's ViT from its block parts, every block computing every token; rows 2l / 2l+1 (if given) enter layer l."""
    for block in vit.blocks:  # the parts this reference leaves out must be identities in this preset
        assert all(isinstance(m, nn.Identity) for m in (block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.ls1, block.ls2))
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for layer, block in enumerate(vit.blocks):
        add_k, add_v = (None, None) if rows is None else (rows[2 * layer], rows[2 * layer + 1])
        x = x + reference_cls_kv_attention(block.attn, block.norm1(x), add_k, add_v)
        x = x + block.mlp(block.norm2(x))
    return vit.norm(x)[:, 0]


# -- 1. attachment structure -----------------------------------------------------------------------------------
def test_apt_is_registered_with_the_cosine_head_and_the_official_script_ema():
    assert PROMPT_METHODS["apt"] is APT
    method = build()
    assert method.head == "cosine"
    assert method.params.ema == 0.7
    assert build({"ema": 0.3}).params.ema == 0.3


@pytest.mark.parametrize("train", [True, False])
def test_attachment_adds_rows_2l_and_2l_plus_1_to_cls_key_and_value_at_every_layer_without_a_query(train):
    torch.manual_seed(0)
    method = build()
    method.begin_task(0)
    if not train:
        train_like_step(method)
        method.end_task(0)  # so the evaluation rows are not all zeros
    source = method.prompts if train else method.merged
    out = method(None, 0, train)
    att = out.attachment
    assert set(att.cls_kv) == set(range(DEPTH))
    for layer in range(DEPTH):
        key, value = att.cls_kv[layer]
        assert key.shape == value.shape == (1, EMBED)
        assert torch.equal(key[0], source[2 * layer]) and torch.equal(value[0], source[2 * layer + 1])
    assert att.prefixes == {} and att.tokens is None and att.taps == frozenset()
    assert out.loss.shape == () and float(out.loss) == 0.0


def test_prompts_are_one_trunc_normal_tensor_of_2_depth_rows_and_the_only_parameter():
    torch.manual_seed(0)
    method = build(embed=64, depth=24)
    names = dict(method.named_parameters())
    assert list(names) == ["prompts"]
    prompts = names["prompts"].detach()
    assert prompts.shape == (2 * 24, 64)
    # trunc_normal_(std=0.02) truncates at its default bounds a=-2, b=2, absolute values (as timm's does in the
    # official code): at std 0.02 that is 100 std, so the rows are in effect normal(0, 0.02) with tails past 2 std.
    assert 0.018 < float(prompts.std()) < 0.022 and abs(float(prompts.mean())) < 0.002
    assert 0.04 < float(prompts.abs().max()) <= 2.0


def test_rows_are_not_reset_between_tasks():
    torch.manual_seed(0)
    method = build()
    method.begin_task(0)
    train_like_step(method)
    trained = method.prompts.detach().clone()
    method.end_task(0)
    method.begin_task(1)
    assert torch.equal(method.prompts, trained)
    assert torch.equal(rows_of(method(None, 1, True)), trained)


# -- 2. against an independent reference forward ---------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.02, 1.0])  # the official init's size, and rows big enough to matter a lot
def test_backbone_with_apt_equals_a_hand_written_vit_with_cls_key_value_additions(scale):
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    assert backbone.num_heads > 1  # the per-head slicing is exercised
    with torch.no_grad():
        method.prompts.copy_(scale * torch.randn_like(method.prompts))
    method.begin_task(0)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        got = backbone(images, method(None, 0, True).attachment).cls
        expected = reference_vit_cls(backbone.vit, images, method.prompts)
        plain = reference_vit_cls(backbone.vit, images, None)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        assert not torch.allclose(got, plain, atol=1e-4)  # the rows really entered
        # key and value rows are not interchangeable: the reference with them swapped differs
        swapped = method.prompts.detach().reshape(DEPTH, 2, -1).flip(1).reshape(2 * DEPTH, -1)
        assert not torch.allclose(got, reference_vit_cls(backbone.vit, images, swapped), atol=1e-4)


def test_apt_keeps_the_sequence_length_and_attaches_no_tokens():
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    images = torch.rand(2, 3, 32, 32)
    seen: dict[str, list] = {"plain": [], "apt": []}
    current = []
    handles = [block.norm1.register_forward_hook(lambda m, args, out: seen[current[0]].append(tuple(args[0].shape)))
               for block in backbone.vit.blocks]
    with torch.no_grad():
        current[:] = ["plain"]
        backbone(images)
        current[:] = ["apt"]
        out = backbone(images, method(None, 0, True).attachment)
    for handle in handles:
        handle.remove()
    patches = (32 // 4) ** 2
    assert seen["apt"] == seen["plain"] == [(2, 1 + patches, backbone.embed_dim)] * backbone.depth
    assert out.tokens is None


@pytest.mark.parametrize("row", [0, 1, 6, 11])  # key / value of the first layer, key of layer 3, value of the last
def test_changing_one_row_changes_the_output(row):
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = backbone(images, method(None, 0, True).attachment).cls
        method.prompts[row] += torch.randn(backbone.embed_dim)
        after = backbone(images, method(None, 0, True).attachment).cls
        assert not torch.allclose(before, after, atol=1e-4)
        # and only that row changed what the reference computes too
        assert torch.allclose(after, reference_vit_cls(backbone.vit, images, method.prompts), atol=1e-5)


# -- 3. merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [0.7, 0.3])
def test_merged_copy_is_the_rows_after_task_0_then_an_ema_of_the_rows(ema):
    torch.manual_seed(0)
    method = build({"ema": ema})
    assert torch.equal(method.merged, torch.zeros(2 * DEPTH, EMBED))
    method.begin_task(0)
    train_like_step(method)
    rows_0 = method.prompts.detach().clone()
    method.end_task(0)
    assert torch.equal(method.merged, rows_0)
    merged = rows_0
    for task in (1, 2):
        method.begin_task(task)
        train_like_step(method)
        rows = method.prompts.detach().clone()
        method.end_task(task)
        merged = ema * merged + (1 - ema) * rows
        assert torch.allclose(method.merged, merged, atol=1e-6)
        assert not torch.allclose(method.merged, rows, atol=1e-3)  # really a mix, not the live rows


def test_evaluation_uses_the_merged_copy_and_training_the_live_rows():
    torch.manual_seed(0)
    method = build()
    method.begin_task(0)
    train_like_step(method)
    method.end_task(0)
    method.begin_task(1)
    train_like_step(method)  # now rows != G
    assert not torch.allclose(method.prompts, method.merged, atol=1e-3)
    assert torch.equal(rows_of(method(None, 1, train=True)), method.prompts)
    assert torch.equal(rows_of(method(None, 1, train=False)), method.merged)
    assert torch.equal(rows_of(method(None, 1, train=False, merged="current")), method.merged)
    assert torch.equal(rows_of(method(None, 1, train=True, merged="previous")), method.prompts)  # training ignores it


def test_previous_view_is_the_merged_copy_before_the_last_end_task():
    torch.manual_seed(0)
    method = build()
    method.begin_task(0)
    assert torch.equal(rows_of(method(None, 0, False, "previous")), torch.zeros(2 * DEPTH, EMBED))
    train_like_step(method)
    method.end_task(0)
    g0 = method.merged.clone()
    assert torch.equal(rows_of(method(None, 0, False, "previous")), torch.zeros(2 * DEPTH, EMBED))  # zeros on task 0
    assert torch.equal(rows_of(method(None, 0, False, "current")), g0)
    method.begin_task(1)
    train_like_step(method)
    method.end_task(1)
    assert torch.equal(rows_of(method(None, 1, False, "previous")), g0)
    assert not torch.equal(method.merged, g0)


def test_previous_view_on_task_0_is_the_prompt_free_backbone():
    """The official teacher's signal on the first task: G all zeros, i.e. nothing added to [CLS]."""
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    method.begin_task(0)
    train_like_step(method)
    method.end_task(0)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        previous = backbone(images, method(None, 0, False, "previous").attachment).cls
        current = backbone(images, method(None, 0, False, "current").attachment).cls
        assert torch.allclose(previous, reference_vit_cls(backbone.vit, images, None), atol=1e-5)
        assert torch.allclose(current, reference_vit_cls(backbone.vit, images, method.merged), atol=1e-5)
        assert not torch.allclose(previous, current, atol=1e-4)


def test_unknown_merged_view_is_refused():
    method = build()
    with pytest.raises(ValueError, match="previous"):
        method(None, 0, False, "both")


# -- 4. gradients ----------------------------------------------------------------------------------------------
def test_training_pass_gives_every_row_a_gradient_and_the_merged_copies_none():
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    method.begin_task(0)
    method.end_task(0)
    assert not method.merged.requires_grad and not method.merged_previous.requires_grad
    assert {n for n, _ in method.named_buffers()} == {"merged", "merged_previous"}
    out = backbone(torch.rand(2, 3, 32, 32), method(None, 0, True).attachment).cls
    (out * torch.randn_like(out)).sum().backward()  # weighted: a plain sum after LayerNorm has zero gradient
    grad = method.prompts.grad
    assert grad is not None and bool((grad.abs().sum(dim=1) > 0).all())  # each of the 2*depth rows
    assert method.merged.grad is None and method.merged_previous.grad is None
    assert all(p.grad is None for p in backbone.parameters())


def test_evaluation_pass_does_not_reach_the_rows():
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    method.begin_task(0)
    method.end_task(0)
    out = backbone(torch.rand(2, 3, 32, 32), method(None, 0, False).attachment).cls
    assert not out.requires_grad


# -- 5. the cosine head ----------------------------------------------------------------------------------------
def test_cosine_head_is_layernorm_without_affine_then_normalised_weight_rows_plus_bias():
    torch.manual_seed(0)
    head = CosineHead(EMBED, 7)
    with torch.no_grad():
        head.linear.bias.normal_()
        head.linear.weight.mul_(torch.rand(7, 1) * 5)  # rows of different norms, so the normalisation matters
    x = 3 * torch.randn(4, EMBED) + 1
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    w = head.linear.weight
    expected = normed @ (w / w.norm(dim=1, keepdim=True)).T + head.linear.bias
    assert torch.allclose(head(x), expected, atol=1e-5)
    assert not torch.allclose(head(x), normed @ w.T + head.linear.bias, atol=1e-3)
    assert not any(name.startswith("norm.") for name, _ in head.named_parameters())


def test_continual_model_with_apt_builds_the_cosine_head_and_runs_without_a_query():
    torch.manual_seed(0)
    backbone = demo_backbone()
    method = build(embed=backbone.embed_dim, depth=backbone.depth)
    model = ContinualModel(backbone, method, n_classes=10)
    assert isinstance(model.head, CosineHead)
    assert {n for n, _ in model.named_parameters() if not n.startswith("backbone.")} == {
        "prompt.prompts", "head.linear.weight", "head.linear.bias"}
    method.begin_task(0)
    images = torch.rand(2, 3, 32, 32)
    out = model(images, None, 0, train=True)
    w, b = model.head.linear.weight, model.head.linear.bias
    feats = out.features
    normed = (feats - feats.mean(1, keepdim=True)) / torch.sqrt(feats.var(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(out.logits, normed @ (w / w.norm(dim=1, keepdim=True)).T + b, atol=1e-5)
    assert torch.allclose(feats, reference_vit_cls(backbone.vit, images, method.prompts), atol=1e-5)
    assert float(out.prompt_loss) == 0.0


# -- 6. state dict round trip ----------------------------------------------------------------------------------
def test_trainable_state_dict_round_trip_restores_rows_and_both_merged_copies():
    torch.manual_seed(0)
    backbone = demo_backbone()

    def model() -> ContinualModel:
        return ContinualModel(backbone, build(embed=backbone.embed_dim, depth=backbone.depth), n_classes=10)

    saved = model()
    for task in (0, 1):
        saved.prompt.begin_task(task)
        train_like_step(saved.prompt)
        saved.prompt.end_task(task)
    train_like_step(saved.prompt)  # rows, G and the previous G all differ and none is zero
    state = saved.trainable_state_dict()
    assert {"prompt.prompts", "prompt.merged", "prompt.merged_previous"} <= set(state)

    torch.manual_seed(1)  # a restart: fresh rows, zero merged copies
    restored = model()
    assert not torch.equal(restored.prompt.merged, saved.prompt.merged)
    restored.load_trainable_state_dict(state)
    for name in ("prompts", "merged", "merged_previous"):
        assert torch.equal(getattr(restored.prompt, name), getattr(saved.prompt, name)), name
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for merged in ("current", "previous"):
            assert torch.equal(restored(images, None, 1, False, merged=merged).logits, saved(images, None, 1, False, merged=merged).logits)
    # and the merging carries on from the restored G
    restored.prompt.end_task(2)
    saved.prompt.end_task(2)
    assert torch.equal(restored.prompt.merged, saved.prompt.merged)


def test_plain_state_dict_of_the_method_holds_the_buffers():
    torch.manual_seed(0)
    method = build()
    method.begin_task(0)
    train_like_step(method)
    method.end_task(0)
    other = build()
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.merged, method.merged) and torch.equal(other.merged_previous, method.merged_previous)
    assert torch.equal(other.prompts, method.prompts)
