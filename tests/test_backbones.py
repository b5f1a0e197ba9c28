"""Frozen ViT backbones (cdl_core.backbones): prefix attention, frozen forward, weight loading and its errors."""
from __future__ import annotations

import timm
import timm.models._builder as timm_builder
import torch
import pytest
from timm.layers import Attention

from cdl_core.attach import Attachment
from cdl_core.backbones import (
    PRESETS,
    FrozenViT,
    WeightsUnavailableError,
    create_backbone,
    prefix_attention,
    state_dict_sha256,
)
from cdl_core.config import BackboneConfig, ConfigError

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")


def reference_prefix_attention(attn: Attention, x: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out: prefix keys/values concatenated before the tokens' keys/values,
    explicit softmax(q k^T * scale) over all keys, queries from the tokens only."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    hd = dim // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim] for i in range(3))
    prefix_k, prefix_v = prefix_k.expand(batch, -1, -1), prefix_v.expand(batch, -1, -1)
    k_all, v_all = torch.cat((prefix_k, k), dim=1), torch.cat((prefix_v, v), dim=1)
    out = torch.empty(batch, tokens, dim)
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[:, :, cols] @ k_all[:, :, cols].transpose(1, 2) * hd**-0.5  # B x N x (L + N)
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        out[:, :, cols] = weights @ v_all[:, :, cols]
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("prefix_batch", [3, 1])
def test_prefix_attention_equals_explicit_softmax_over_prefix_and_token_keys(prefix_batch):
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2, qkv_bias=True).eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()  # timm zero-inits nothing here, but make sure biases matter
    x = torch.randn(3, 5, 16)
    prefix_k, prefix_v = torch.randn(prefix_batch, 4, 16), torch.randn(prefix_batch, 4, 16)
    got = prefix_attention(attn, x, (prefix_k, prefix_v))
    assert got.shape == x.shape  # queries come from the tokens only
    assert torch.allclose(got, reference_prefix_attention(attn, x, prefix_k, prefix_v), atol=1e-5)
    # keys and values must not be swapped: this differs unless the prefix halves are equal
    swapped = reference_prefix_attention(attn, x, prefix_v, prefix_k)
    assert not torch.allclose(got, swapped, atol=1e-3)


def _demo_backbone() -> FrozenViT:
    torch.manual_seed(0)
    return create_backbone(BackboneConfig("demo-s", "random"))


def test_frozen_vit_without_prefixes_equals_timm_forward_features_cls():
    """Equal up to rounding: the last block computes [CLS] alone (its query, projection and MLP)."""
    backbone = _demo_backbone()
    images = torch.randn(2, 3, 32, 32)
    expected = backbone.vit.forward_features(images)[:, 0]
    torch.testing.assert_close(backbone(images).cls, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone(images, Attachment()).cls, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone.query(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 2, 5])  # 5: the last block, computed for [CLS] alone
def test_frozen_vit_prefix_at_one_layer_equals_timm_blocks_with_reference_attention_there(layer):
    backbone = _demo_backbone()
    vit = backbone.vit
    images = torch.randn(2, 3, 32, 32)
    prefix = (torch.rand(2, 3, backbone.embed_dim), torch.rand(2, 3, backbone.embed_dim))
    captured = {}
    handle = vit.blocks[layer].register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        vit.forward_features(images)  # timm's own path up to the prompted block
        handle.remove()
        x = captured["x"]
        block = vit.blocks[layer]
        x = x + reference_prefix_attention(block.attn, block.norm1(x), *prefix)
        x = x + block.mlp(block.norm2(x))
        for later in vit.blocks[layer + 1 :]:
            x = later(x)
        expected = vit.norm(x)[:, 0]
        got = backbone(images, Attachment({layer: prefix})).cls
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, backbone(images).cls, atol=1e-3)  # the prefix really changed something


def test_frozen_vit_is_frozen_in_train_mode_and_passes_gradients_to_prefixes_only():
    backbone = _demo_backbone()
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    prefix = (torch.rand(1, 2, backbone.embed_dim, requires_grad=True), torch.rand(1, 2, backbone.embed_dim, requires_grad=True))
    out = backbone(torch.randn(2, 3, 32, 32), Attachment({0: prefix})).cls
    # weighted: a plain sum of a LayerNorm output (unit gain, zero bias) has zero gradient
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix)
    assert all(p.grad is None for p in backbone.parameters())


def test_taps_return_timm_block_outputs_and_a_tapped_last_block_computes_every_token():
    """Taps are each block's output tokens before the final norm, as timm's own blocks compute them; tapping the
    last block leaves [CLS] unchanged (the fast [CLS]-only path and the full path agree)."""
    backbone = _demo_backbone()
    vit = backbone.vit
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    handles = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in vit.blocks]
    with torch.no_grad():
        expected_cls = vit.forward_features(images)[:, 0]
        for handle in handles:
            handle.remove()
        fast = backbone(images, Attachment(taps=frozenset({1, 3})))
        full = backbone(images, Attachment(taps=frozenset({backbone.depth - 1})))
    assert set(fast.taps) == {1, 3} and set(full.taps) == {backbone.depth - 1}
    for block in (1, 3):
        torch.testing.assert_close(fast.taps[block], outputs[block], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.taps[backbone.depth - 1], outputs[-1], rtol=1e-5, atol=1e-5)
    assert full.taps[backbone.depth - 1].shape == (2, backbone.preset.tokens, backbone.embed_dim)
    for out in (fast, full):
        torch.testing.assert_close(out.cls, expected_cls, rtol=1e-5, atol=1e-5)
        assert out.tokens is None


def test_attached_tokens_read_through_the_fast_last_block_equal_the_full_pass():
    """Extra tokens are read after the final norm; the last block computing only [CLS] and them equals computing
    every token (taps of the last block force the full path)."""
    backbone = _demo_backbone()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.rand(1, 2, backbone.embed_dim)
    with torch.no_grad():
        fast = backbone(images, Attachment(tokens=tokens))
        full = backbone(images, Attachment(tokens=tokens, taps=frozenset({backbone.depth - 1})))
        plain = backbone(images)
    assert fast.tokens.shape == (2, 2, backbone.embed_dim)
    torch.testing.assert_close(fast.tokens, backbone.vit.norm(full.taps[backbone.depth - 1][:, 1:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.cls, full.cls, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast.cls, plain.cls, atol=1e-4)  # [CLS] attends to the attached tokens


def test_merged_attachments_concatenate_prefixes_and_tokens_and_sum_cls_additions():
    d = 4
    a = Attachment({0: (torch.ones(1, 2, d), torch.ones(1, 2, d))}, torch.zeros(1, 1, d), {1: (torch.ones(1, d), torch.ones(1, d))}, frozenset({2}))
    b = Attachment({0: (torch.full((3, 1, d), 2.0), torch.full((3, 1, d), 2.0)), 4: (torch.ones(3, 1, d),) * 2},
                   torch.ones(1, 1, d), {1: (torch.ones(1, d), 2 * torch.ones(1, d))}, frozenset({5}))
    merged = a.merge(b, batch=3)
    key, value = merged.prefixes[0]
    assert key.shape == (3, 3, d) and torch.equal(key[:, :2], torch.ones(3, 2, d)) and torch.equal(key[:, 2:], torch.full((3, 1, d), 2.0))
    assert set(merged.prefixes) == {0, 4}
    assert merged.tokens.shape == (3, 2, d) and torch.equal(merged.tokens[:, 1], torch.ones(3, d)) and not merged.tokens[:, 0].any()
    torch.testing.assert_close(merged.cls_kv[1][0], 2 * torch.ones(1, d))
    torch.testing.assert_close(merged.cls_kv[1][1], 3 * torch.ones(1, d))
    assert merged.taps == {2, 5}


# -- weights -------------------------------------------------------------------------------------------------
def _timm_model(preset_name: str, **kw) -> torch.nn.Module:
    preset = PRESETS[preset_name]
    return timm.create_model(preset.timm_name, pretrained=False, **dict(preset.model_kwargs, **kw))


@pytest.mark.parametrize("preset", ["vit_tiny_patch16_224", "demo-s"])
def test_local_weights_file_is_loaded_exactly_and_hashed(preset, tmp_path):
    torch.manual_seed(1)
    saved = _timm_model(preset, num_classes=0)
    path = tmp_path / "weights.pt"
    torch.save(saved.state_dict(), path)
    BackboneConfig(preset, str(path)).validate("student")  # a file path is a valid weights value
    torch.manual_seed(2)  # a different random init, so a silently ignored file would show
    backbone = create_backbone(BackboneConfig(preset, str(path)))
    loaded, expected = backbone.vit.state_dict(), saved.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    assert backbone.weights_sha256 == state_dict_sha256(saved)
    assert backbone.weights == str(path)


def test_local_weights_with_a_classifier_head_load_every_backbone_tensor(tmp_path):
    """What `cdl_core.pretrain` saves: a demo ViT with a 10-class head; the backbone drops only the head."""
    torch.manual_seed(3)
    saved = _timm_model("demo-s", num_classes=10)
    path = tmp_path / "with_head.pt"
    torch.save(saved.state_dict(), path)
    backbone = create_backbone(BackboneConfig("demo-s", str(path)))
    loaded, expected = backbone.vit.state_dict(), saved.state_dict()
    assert set(expected) - set(loaded) == {"head.weight", "head.bias"}
    for name in loaded:
        assert torch.equal(loaded[name], expected[name]), name


def test_weights_sha256_changes_when_one_weight_changes():
    backbone = _demo_backbone()
    before = state_dict_sha256(backbone.vit)
    assert backbone.weights_sha256 == before
    with torch.no_grad():
        backbone.vit.blocks[3].mlp.fc1.weight[5, 7] += 1e-3
    assert state_dict_sha256(backbone.vit) != before


def test_weights_file_with_wrong_shapes_raises_weights_unavailable(tmp_path):
    path = tmp_path / "demo_t.pt"
    torch.save(_timm_model("demo-t", num_classes=0).state_dict(), path)  # width 128, preset demo-s is 64
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone(BackboneConfig("demo-s", str(path)))
    message = str(info.value)
    assert "does not fit preset demo-s" in message and str(path) in message and "\n" not in message


def test_weights_file_missing_backbone_tensors_raises_weights_unavailable(tmp_path):
    """A file from a shallower ViT of the same width has no tensors for the last blocks; loading it must not
    silently leave those blocks randomly initialised."""
    path = tmp_path / "shallow.pt"
    torch.save(_timm_model("demo-s", num_classes=0, depth=4).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="demo-s"):
        create_backbone(BackboneConfig("demo-s", str(path)))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_backbone(BackboneConfig("vit_tiny_patch16_224", str(missing)))
    with pytest.raises(ConfigError, match="no such file"):
        BackboneConfig("vit_tiny_patch16_224", str(missing)).validate("student")


def test_unknown_preset_is_a_config_error_listing_the_presets():
    with pytest.raises(ConfigError, match="demo-s"):
        create_backbone(BackboneConfig("vit_huge", "random"))
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224"):
        BackboneConfig("vit_huge", "random").validate("student")


def test_hub_weights_when_offline_raise_weights_unavailable_telling_to_pass_a_local_file(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise LocalEntryNotFoundError("offline: no cached file and outgoing traffic disabled (simulated)")

    # every way timm fetches remote weights fails as it does offline; nothing can touch the network
    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(timm_builder, name, offline)
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone(BackboneConfig("vit_tiny_patch16_224", "default"))
    assert calls, "the hub path was not exercised"
    message = str(info.value)
    assert "vit_tiny_patch16_224" in message and "local state-dict file" in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_metadata_is_what_timm_builds(name):
    """Validation and planning read a preset's shape and input scaling from its metadata alone: it must be what
    timm builds (and, for hub presets, the tag timm 1.0 loads under the bare name)."""
    preset = PRESETS[name]
    vit = timm.create_model(preset.timm_name, pretrained=False, num_classes=0, **preset.model_kwargs)
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.patch_embed.img_size[0]) == (
        preset.embed_dim, preset.depth, preset.num_heads, preset.image_size)
    if preset.weights_source == "demo_pretrain":  # pretrained here on [0, 1] inputs, not with timm's config
        assert (preset.mean, preset.std) == ((0.0,) * 3, (1.0,) * 3)
    else:
        assert (tuple(vit.pretrained_cfg["mean"]), tuple(vit.pretrained_cfg["std"])) == (preset.mean, preset.std)
    if preset.weights_source == "hub":
        default = timm.models.get_pretrained_cfg(preset.timm_name)
        assert (default.tag, default.hf_hub_id) == (preset.pretrained_tag, preset.hf_hub_id())
