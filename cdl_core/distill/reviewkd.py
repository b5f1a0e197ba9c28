"""`reviewkd`: ReviewKD's attention-based fusion (ABF) chain plus logit KD, as the official code computes it for
ViTs. The student's last n blocks' output tokens (before the final norm) run through one ABF each, deepest
first: x = LN1(W1 f); every step but the deepest fuses the residual r of the deeper step, x = LN2(x * z0 + r * z1)
with z0 = LN_z(W_z x), z1 = LN_z(W_z r) (full maps, no sigmoid); each step outputs W2 x (D_s -> D_t) and passes
x on as the shallower step's r. Output i is matched to the teacher's block (teacher_depth - n + i) by MSE:
loss = `kd`'s loss + feature_weight * mean over the n pairs. The ABFs are training-only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.catalog.distill import ReviewKDParams
from cdl_core.config import DistillConfig
from cdl_core.distill.base import KDContext, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.kd import LogitKD


class ABF(nn.Module):
    """One fusion step over (B, N, D_s) tokens; `fuse=False` for the deepest block, which has no residual."""

    def __init__(self, student_dim: int, teacher_dim: int, fuse: bool) -> None:
        super().__init__()
        self.proj1, self.norm1 = nn.Linear(student_dim, student_dim), nn.LayerNorm(student_dim)
        self.proj2 = nn.Linear(student_dim, teacher_dim)
        # The official ABF also builds norm2 for the unfused step but never applies it: left out here.
        self.fuse = nn.Sequential(nn.Linear(student_dim, student_dim), nn.LayerNorm(student_dim)) if fuse else None
        self.norm2 = nn.LayerNorm(student_dim) if fuse else None

    def forward(self, features: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output in the teacher's width, the residual for the next shallower step)."""
        x = self.norm1(self.proj1(features))
        if self.fuse is not None:
            # The same W_z, LN_z map each of the two, giving one gate per input.
            x = self.norm2(x * self.fuse(x) + residual * self.fuse(residual))
        return self.proj2(x), x


@register_kd_method
class ReviewKD(LogitKD):
    name = "reviewkd"
    Params = ReviewKDParams

    def __init__(self, cfg: DistillConfig, params: ReviewKDParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        self.n_blocks = params.n_blocks(ctx.student_depth)
        # abfs[i] serves the i-th of the tapped student blocks, shallow to deep; only the deepest does not fuse.
        self.abfs = nn.ModuleList(ABF(ctx.student_dim, ctx.teacher_dim, fuse=i < self.n_blocks - 1) for i in range(self.n_blocks))

    @property
    def student_blocks(self) -> list[int]:
        return list(range(self.ctx.student_depth - self.n_blocks, self.ctx.student_depth))

    @property
    def teacher_taps(self) -> frozenset[int]:
        return frozenset(range(self.ctx.teacher_depth - self.n_blocks, self.ctx.teacher_depth))

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        return Attachment(taps=frozenset(self.student_blocks)) if train else Attachment()

    def review(self, taps: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The chain's outputs, one per tapped student block, shallow to deep."""
        outputs, residual = [], None
        for block, abf in zip(reversed(self.student_blocks), reversed(self.abfs)):
            output, residual = abf(taps[block], residual)
            outputs.append(output)
        return outputs[::-1]

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        teacher_blocks = sorted(self.teacher_taps)
        pairs = zip(self.review(out.taps), teacher_blocks)
        feature = torch.stack([F.mse_loss(output, teacher.taps[block]) for output, block in pairs]).mean()
        return super().loss(out, teacher, targets, classes) + self.params.feature_weight * feature
