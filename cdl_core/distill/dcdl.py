"""`dcdl`: D-CDL (KDP in arXiv v3), as the official code computes it — KD prompts in layers 0..n-1 of the student
(n = `layers`, capped at its depth), all U[0, 1) initialised: at layer 0 one vector that becomes the KD token
(read by `kd_last`), at layers 1..n-1 `length` tokens split into key and value halves, prefixes of that layer's
attention. They are ordinary parameters of the student: they persist across tasks, never reset or frozen, and
apply at evaluation too (no teacher at test time). Loss and prediction: `cdl_core.distill.kd_token`."""
from __future__ import annotations

from torch import nn

from cdl_core.attach import Attachment
from cdl_core.catalog.distill import DCDLParams
from cdl_core.config import DistillConfig
from cdl_core.distill.base import KDContext, TeacherSignal, register_kd_method
from cdl_core.distill.kd_token import KDTokenMethod
from cdl_core.prompts.base import split_prefix, uniform_parameter


@register_kd_method
class DecoupledCDL(KDTokenMethod):
    name = "dcdl"
    Params = DCDLParams

    def __init__(self, cfg: DistillConfig, params: DCDLParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        self.n_layers = params.in_effect(ctx.student_depth).layers
        self.token = uniform_parameter(1, 1, ctx.student_dim)  # layer 0's KD prompt
        # prefixes[i] belongs to layer i + 1
        self.prefixes = nn.ParameterList(uniform_parameter(1, params.length, ctx.student_dim) for _ in range(1, self.n_layers))

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        prefixes = {layer: split_prefix(prompt) for layer, prompt in enumerate(self.prefixes, start=1)}
        return Attachment(prefixes=prefixes, tokens=self.token)
