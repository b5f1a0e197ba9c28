"""The CDL student distillation step (CDL-Prompt, or logit KD) written the way the official code (IRVLUTD/CDL on
GT-RIPL/CODA-Prompt) computes it — a yardstick for bench/step_throughput.py, never imported by the product.

Same math as `cdl_core` (checked by `check_same_step`: same loss and gradients on the same inputs and weights),
with the official code's costs (DESIGN.md section 2):
- backbones not actually frozen: their weights keep requires_grad, so every backward computes weight gradients
  for every backbone parameter (the optimizer holds only prompts and heads, so they are thrown away);
- a separate frozen query pass for the teacher and for the student, although both use the student-size ViT;
- attention written by hand, materialising the softmax matrix, with prompts concatenated to keys and values;
- the teacher's forward runs every step with autograd on; its blocks (and, for CDL-Prompt, the student's blocks
  at the teacher's prompt layers) build token-correlation matrices that nothing reads.
It works on deep copies of a `ContinualRun`'s teacher and student, so both implementations start from the same
weights and neither changes the other.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.distill import TaskClasses
from cdl_core.learner import ContinualRun


def vit_cls_feature(vit: nn.Module, images: torch.Tensor, prefixes: dict, correlations: tuple[int, ...] = ()) -> torch.Tensor:
    """[CLS] output of a timm ViT; `prefixes[layer] = (key tokens, value tokens)` are concatenated in front of
    that layer's keys and values, and attention is softmax(q k^T * scale) v spelled out. After the blocks in
    `correlations` the token-correlation matrix is built, as the official code does, and dropped."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for layer, block in enumerate(vit.blocks):
        attn = block.attn
        h = block.norm1(x)
        batch, tokens, dim = h.shape
        heads = attn.num_heads
        qkv = attn.qkv(h).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if layer in prefixes:
            pk, pv = prefixes[layer]
            pk = pk.expand(batch, -1, -1).reshape(batch, -1, heads, dim // heads).permute(0, 2, 1, 3)
            pv = pv.expand(batch, -1, -1).reshape(batch, -1, heads, dim // heads).permute(0, 2, 1, 3)
            k = torch.cat((pk, k), dim=2)
            v = torch.cat((pv, v), dim=2)
        weights = (q @ k.transpose(-2, -1)) * attn.scale
        weights = weights.softmax(dim=-1)
        out = attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
        x = x + block.ls1(out)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        if layer in correlations:
            normed = F.normalize(x, dim=2)
            _ = normed @ normed.transpose(1, 2)
    return vit.norm(x)[:, 0]


def split(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = prompt.shape[-2] // 2
    return prompt[..., :i, :], prompt[..., i:, :]


def coda_attend(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    a_query = torch.einsum("bd,kd->bkd", query, attention)
    aq_k = torch.einsum("bkd,kd->bk", F.normalize(a_query, dim=2), F.normalize(keys, dim=1))
    return torch.einsum("bk,kld->bld", aq_k, components)


def prompts(model: nn.Module, query: torch.Tensor, task_id: int, train: bool) -> tuple[dict, torch.Tensor]:
    """Prompts (layer -> (Ek, Ev)) and prompt loss of a prompt method, official style. `train`: DualPrompt picks
    the task's E-prompt (else the best key's)."""
    method, params = model.prompt, model.prompt.params
    loss = query.new_zeros(())
    prefixes = {}
    batch = len(query)
    if method.name == "coda":
        start, stop = method.task_slice(method.current_task)
        for layer in params.layers:
            k, a, p = (store[str(layer)] for store in (method.keys, method.attention, method.components))
            k, a, p = (torch.cat((t[:start].detach().clone(), t[start:stop]), dim=0) for t in (k, a, p))
            prefixes[layer] = split(coda_attend(query, k, a, p))
    elif method.name == "l2p":
        q = F.normalize(query, dim=1)
        for layer in params.layers:
            cos_sim = torch.einsum("bj,kj->bk", q, F.normalize(method.keys[str(layer)], dim=1))
            k_idx = cos_sim.topk(params.top_k, dim=1).indices
            loss = loss + (1.0 - cos_sim.gather(1, k_idx)).sum()
            chosen = method.prompts[str(layer)][k_idx]
            i = params.length // 2
            prefixes[layer] = (chosen[:, :, :i, :].reshape(batch, -1, chosen.shape[-1]), chosen[:, :, i:, :].reshape(batch, -1, chosen.shape[-1]))
    elif method.name == "dualprompt":
        q = F.normalize(query, dim=1)
        for layer in sorted(set(params.layers) | set(params.g_layers)):
            keys, values = [], []
            if layer in params.layers:
                cos_sim = torch.einsum("bj,kj->bk", q, F.normalize(method.e_keys[str(layer)], dim=1))
                if train:
                    loss = loss + (1.0 - cos_sim[:, task_id]).sum()
                    ek, ev = split(method.e_prompts[str(layer)][task_id].unsqueeze(0).expand(batch, -1, -1))
                else:
                    ek, ev = split(method.e_prompts[str(layer)][cos_sim.argmax(dim=1)])
                keys.append(ek)
                values.append(ev)
            if layer in params.g_layers:
                gk, gv = split(method.g_prompts[str(layer)].expand(batch, -1, -1))
                keys.append(gk)
                values.append(gv)
            prefixes[layer] = (torch.cat(keys, dim=1), torch.cat(values, dim=1))
    else:
        raise ValueError(f"no reference for prompt method {method.name!r}")
    return prefixes, loss


KD_METHODS = ("cdl_prompt", "kd")


class OfficialStyleStep:
    """The CDL-Prompt or logit-KD student step (sequential schedule, frozen teacher) of a run, computed the official
    way."""

    def __init__(self, run: ContinualRun) -> None:
        if run.teacher is None or run.student.kd is None or run.student.kd.name not in KD_METHODS:
            raise ValueError(f"the reference step is one of {KD_METHODS}: give a run with a teacher and one of those distill.method")
        self.kd = run.student.kd.name
        self.cfg = run.cfg
        self.teacher = copy.deepcopy(run.teacher)
        self.student = copy.deepcopy(run.student)
        self.query_vit = copy.deepcopy(run.student_backbone.vit)
        for vit in (self.teacher.backbone.vit, self.student.backbone.vit, self.query_vit):
            vit.requires_grad_(True)  # the official backbones are never frozen
        self.teacher.train()
        self.student.train()

    def losses(self, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses) -> torch.Tensor:
        with torch.no_grad():  # the teacher's and the student's query passes, one each
            teacher_query = vit_cls_feature(self.query_vit, images, {})
            student_query = vit_cls_feature(self.query_vit, images, {})
        # teacher: autograd on, its prompts and weights requiring grad; only the outputs are used, detached
        teacher_prefixes, _ = prompts(self.teacher, teacher_query, t, train=False)
        teacher_feature = vit_cls_feature(self.teacher.backbone.vit, images, teacher_prefixes, correlations=tuple(range(len(self.teacher.backbone.vit.blocks))))
        teacher_logits = self.teacher.head(teacher_feature)

        own, prompt_loss = prompts(self.student, student_query, t, train=True)
        current = slice(classes.past, classes.seen)
        temperature, alpha = self.cfg.distill.temperature, self.cfg.distill.alpha
        if self.kd == "kd":  # on the main head; the student's forward builds no correlations
            logits = self.masked_logits(vit_cls_feature(self.student.backbone.vit, images, own), classes)
            return (1 - alpha) * F.cross_entropy(logits, targets) + alpha * self.kl(logits[:, current], teacher_logits[:, current]) + prompt_loss
        mapping = self.student.kd.mapping
        prefixes = dict(own)
        for layer, (tk, tv) in teacher_prefixes.items():
            q_t = torch.cat((tk, tv), dim=1).detach().mean(dim=1)
            k, a, p = (store[str(layer)][: mapping.active] for store in (mapping.keys, mapping.attention, mapping.components))
            mk, mv = split(coda_attend(q_t, k, a, p))
            if layer in prefixes:
                ok, ov = prefixes[layer]
                mk, mv = torch.cat((ok.expand(len(images), -1, -1), mk), dim=1), torch.cat((ov.expand(len(images), -1, -1), mv), dim=1)
            prefixes[layer] = (mk, mv)
        feature = vit_cls_feature(self.student.backbone.vit, images, prefixes, correlations=tuple(teacher_prefixes))
        ce = F.cross_entropy(self.masked_logits(feature, classes), targets)
        kl = self.kl(self.student.kd.kd_head(feature)[:, current], teacher_logits[:, current])
        return (1 - alpha) * ce + alpha * kl + prompt_loss

    def masked_logits(self, feature: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        logits = self.student.head(feature)[:, : classes.seen].clone()
        logits[:, : classes.past] = float("-inf")  # past tasks' classes masked
        return logits

    def kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        temperature = self.cfg.distill.temperature
        return nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(student / temperature, dim=1), F.softmax(teacher.detach() / temperature, dim=1)
        ) * temperature * temperature

    def optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        trainable = [p for name, p in self.student.named_parameters() if not name.startswith("backbone.")]
        return torch.optim.Adam(trainable, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)

    def step(self, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        loss = self.losses(images, targets, t, classes)
        self.student.zero_grad(set_to_none=True)
        self.teacher.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss


def check_same_step(run: ContinualRun, reference: OfficialStyleStep, images: torch.Tensor, targets: torch.Tensor,
                    t: int, classes: TaskClasses, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Assert that the product's student step and the reference give the same loss and the same gradient on
    every trainable student parameter; returns the largest absolute gradient difference."""
    (ours,) = run.losses("student", images, targets, t, classes)
    run.student.zero_grad(set_to_none=True)
    ours.backward()
    theirs = reference.losses(images, targets, t, classes)
    reference.student.zero_grad(set_to_none=True)
    theirs.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=rtol, atol=atol)
    reference_params = dict(reference.student.named_parameters())
    largest = 0.0
    for name, param in run.student.named_parameters():
        if name.startswith("backbone."):
            continue
        want = reference_params[name].grad
        if param.grad is None or want is None:
            assert param.grad is None and (want is None or not want.any()), f"{name}: gradient in one implementation only"
            continue
        torch.testing.assert_close(param.grad, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        largest = max(largest, (param.grad - want).abs().max().item())
    run.student.zero_grad(set_to_none=True)
    return largest
