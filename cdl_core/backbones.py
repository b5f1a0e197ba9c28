"""Frozen timm Vision Transformers with prefix-tuning attention.

A preset (cdl_core.catalog.presets) names a timm architecture plus where its weights come from. Paper presets
load their named pretrained tag from the hub (or a local state-dict file); demo presets are small CPU-sized
ViTs whose weights come from `cdl_core.pretrain` (offline, cached).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment, BackboneOutput, Prefix
from cdl_core.config import BackboneConfig
from cdl_core.errors import ConfigError, WeightsUnavailableError
from cdl_core.catalog.presets import PRESETS, BackbonePreset, get_preset, uses_demo_pretraining  # noqa: F401 (PRESETS re-exported)
from cdl_core.catalog.presets import weights_source_id as _weights_source_id

log = logging.getLogger(__name__)

class FrozenViT(nn.Module):
    """A frozen timm ViT that applies what prompt and distillation methods attach (`cdl_core.attach`).

    `query` gives the [CLS] output of a prompt-free pass (the prompt-selection query); `forward` gives the
    outputs of a pass with an `Attachment` applied.
    """

    def __init__(self, vit: nn.Module, preset: BackbonePreset, weights: str, weights_sha256: str) -> None:
        super().__init__()
        self.vit = vit
        self.preset = preset
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self._compiled: Callable | None = None
        self.vit.requires_grad_(False)
        self.vit.eval()
        self.mean, self.std = preset.mean, preset.std  # the preset's metadata (tested equal to timm's config)
        for block in vit.blocks:
            if getattr(block.attn, "gate", None) is not None:
                raise ConfigError(f"{preset.name}: gated attention is not supported by prefix prompts")

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def image_size(self) -> int:
        return self.vit.patch_embed.img_size[0]

    def train(self, mode: bool = True) -> "FrozenViT":
        # Frozen: dropout/drop-path stay off whatever mode the owning model is in.
        return super().train(False)

    def enable_compile(self) -> None:
        """Run the passes through `torch.compile` (train.compile; opt-in, meant for GPUs)."""
        self._compiled = torch.compile(self._apply_attachment)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS] feature of the frozen, prompt-free pass, in float32. Computed under inference mode (no autograd
        bookkeeping at all) and copied out of it: prompt selection saves the query for its backward pass, which
        an inference tensor cannot be."""
        with torch.inference_mode():
            feature = self(images).cls
        return feature.to(torch.float32, copy=True)

    def forward(self, images: torch.Tensor, attachment: Attachment | None = None) -> BackboneOutput:
        return (self._compiled or self._apply_attachment)(images, attachment or Attachment())

    def _apply_attachment(self, images: torch.Tensor, attachment: Attachment) -> BackboneOutput:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        extra = 0
        if attachment.tokens is not None:  # after [CLS], no position embedding
            extra = attachment.tokens.shape[1]
            x = torch.cat((x[:, :1], attachment.tokens.expand(len(x), -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        read = 1 + extra  # [CLS] and the attached tokens: the outputs anything reads
        *blocks, last = vit.blocks
        # Unless its output tokens are tapped, the last block computes only the rows read: it needs keys and values
        # of every token, but queries, projection and MLP of those rows alone (token-wise LayerNorms and MLP make
        # that exact).
        full_last = len(blocks) in attachment.taps
        taps = {}
        for index, block in enumerate(vit.blocks if full_last else blocks):
            attended = prefix_attention(block.attn, block.norm1(x), attachment.prefixes.get(index), attachment.cls_kv.get(index))
            x = x + block.drop_path1(block.ls1(attended))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
            if index in attachment.taps:
                taps[index] = x
        if not full_last:
            index = len(blocks)
            attended = prefix_attention(last.attn, last.norm1(x), attachment.prefixes.get(index), attachment.cls_kv.get(index), query_rows=read)
            x = x[:, :read] + last.drop_path1(last.ls1(attended))
            x = x + last.drop_path2(last.ls2(last.mlp(last.norm2(x))))
        out = vit.norm(x[:, :read])
        return BackboneOutput(out[:, 0], out[:, 1:] if extra else None, taps)


def prefix_attention(
    attn: nn.Module, x: torch.Tensor, prefix: Prefix | None, cls_kv: Prefix | None = None, query_rows: int | None = None,
) -> torch.Tensor:
    """timm `Attention` via SDPA, with prefix key/value tokens prepended (queries unchanged) and `cls_kv` added to
    the first token's key and value. `query_rows`: the output of the first that many tokens alone, only their
    queries projected."""
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if query_rows is not None:
        rows = x[:, :query_rows]
        q = F.linear(rows, weight[:dim], None if bias is None else bias[:dim]).reshape(batch, query_rows, heads, head_dim).transpose(1, 2)
        k, v = F.linear(x, weight[dim:], None if bias is None else bias[dim:]).reshape(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if cls_kv is not None:
        add_k, add_v = (a.reshape(-1, heads, 1, head_dim) for a in cls_kv)
        k = torch.cat((k[:, :, :1] + add_k, k[:, :, 1:]), dim=2)
        v = torch.cat((v[:, :, :1] + add_v, v[:, :, 1:]), dim=2)
    if prefix is not None:
        prefix_k, prefix_v = (p.expand(batch, -1, -1).reshape(batch, -1, heads, head_dim).transpose(1, 2) for p in prefix)
        k = torch.cat((prefix_k, k), dim=2)
        v = torch.cat((prefix_v, v), dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, q.shape[2], heads * head_dim))
    return attn.proj_drop(attn.proj(out))


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of a module's weights, recorded with every run (DESIGN.md section 4: which weights were used)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_source_id(cfg: BackboneConfig) -> str:
    """Names the weights `cfg` loads without loading them (see cdl_core.catalog.presets.weights_source_id)."""
    return _weights_source_id(cfg.preset, cfg.weights, cfg.pretrained_tag)


def create_backbone(cfg: BackboneConfig) -> FrozenViT:
    """Build the frozen ViT for `cfg` (preset + weights source) through `timm.create_model`."""
    preset = get_preset(cfg.preset)
    weights = cfg.weights
    if uses_demo_pretraining(preset.name, weights):
        from cdl_core.pretrain import ensure_demo_weights

        weights = str(ensure_demo_weights(preset.name))
    kwargs = dict(preset.model_kwargs, num_classes=0)
    if weights == "random":
        # Random weights are a fixed weights source too: seeded by the preset, whatever the global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(hashlib.sha256(preset.name.encode()).digest()[:4], "little"))
            vit = timm.create_model(preset.timm_name, pretrained=False, **kwargs)
    elif weights == "default":
        try:
            vit = timm.create_model(preset.hub_model(cfg.pretrained_tag), pretrained=True, **kwargs)
        except Exception as err:  # hub unreachable, offline, missing cache, unknown tag
            raise WeightsUnavailableError(
                f"could not load pretrained weights {preset.hub_model(cfg.pretrained_tag)} for {preset.name} from the Hugging "
                f"Face hub ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}); "
                "when offline set the backbone's weights to a local state-dict file (e.g. --student-weights PATH) or 'random'"
            ) from err
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist; give a saved state-dict file")
        vit = timm.create_model(preset.timm_name, pretrained=False, **kwargs)
        try:
            state = timm.models.load_state_dict(str(path))
        except Exception as err:
            raise WeightsUnavailableError(f"weights file {path} could not be read as a state dict ({type(err).__name__}: {err})") from err
        # Strict load (timm's pretrained path is lenient without a head): a file missing blocks must not
        # silently leave them random while the run records the file as its weights.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = vit.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches raise even when not strict
            lines = str(err).splitlines()
            mismatch = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
            raise WeightsUnavailableError(f"weights file {path} does not fit preset {preset.name}: {mismatch}") from err
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"weights file {path} does not fit preset {preset.name}: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
    sha = state_dict_sha256(vit)
    log.info("backbone %s weights=%s sha256=%s", preset.name, weights, sha[:12])
    return FrozenViT(vit, preset, weights, sha)
