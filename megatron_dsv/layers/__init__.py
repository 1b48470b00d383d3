"""DSV layers: the core_attention modules, spec helpers, predictor, profiler, schedule, metrics."""

from .attention import DSVDotProductAttention, SDPADotProductAttention
from .metrics import append_jsonl, dsv_layers, dsv_metrics, log_dsv_metrics
from .spec import apply_dsv, get_dsv_layer_spec
from ..config import add_dsv_args

__all__ = [
    "DSVDotProductAttention",
    "SDPADotProductAttention",
    "apply_dsv",
    "get_dsv_layer_spec",
    "add_dsv_args",
    "dsv_layers",
    "dsv_metrics",
    "log_dsv_metrics",
    "append_jsonl",
]
