"""Python face of the compiled ops (kernels/): torch.library custom ops in the ``dpface``
namespace with fake (meta) implementations and registered autograd, the PyTorch reference
each op must match (:mod:`dpface.ops.reference`), and the build report.

    python -m dpface.ops     # or: dpface kernels — what is built (CPU / CUDA / missing)
"""
from dpface.ops.build import available, report, warn_missing
from dpface.ops.contract import FusedMargin, MarginSoftmaxOut
from dpface.ops.margin_softmax import margin_softmax
from dpface.ops.range_loss import range_loss_terms

__all__ = ["available", "report", "warn_missing", "FusedMargin", "MarginSoftmaxOut",
           "margin_softmax", "range_loss_terms"]
