"""PARO (PAROAttention): the method, which runs calibrated per-head axis orders and static block
plans (:mod:`.method`), and the offline calibration that writes those plans (:mod:`.calibrate`,
:func:`fastdit.calibrate`, ``fastdit calibrate``)."""

from .method import PARO, PLAN_FORMAT, PLAN_FORMAT_VERSION, ParoPlan, layout_to_json

__all__ = ["PARO", "ParoPlan", "PLAN_FORMAT", "PLAN_FORMAT_VERSION", "layout_to_json"]
