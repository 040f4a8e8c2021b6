"""The C4 box head of the transfer protocol: Detectron2's res5 head followed by one more norm.

With BN fine-tuned in the backbone, the res5 features reaching the box predictor are normalised
once more (the same norm type as the backbone), as the self-supervised transfer work does.
``detection.detectron2_engine`` registers it as ``MODEL.ROI_HEADS.NAME: Res5ROIHeadsExtraNorm``.
"""
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import Res5ROIHeads


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels
