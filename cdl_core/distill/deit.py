"""`deit`: a DeiT-style distillation token, as the official v2 code computes it — one zero-initialised token in
the student's sequence from block 0 on (no position embedding, no per-layer prefixes), its output read by
`kd_last`; loss and prediction as `dcdl` (`cdl_core.distill.kd_token`)."""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.catalog.distill import DeiTParams
from cdl_core.config import DistillConfig
from cdl_core.distill.base import KDContext, register_kd_method
from cdl_core.distill.kd_token import KDTokenMethod


@register_kd_method
class DeiTToken(KDTokenMethod):
    name = "deit"
    Params = DeiTParams

    def __init__(self, cfg: DistillConfig, params: DeiTParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        self.token = nn.Parameter(torch.zeros(1, 1, ctx.student_dim))
