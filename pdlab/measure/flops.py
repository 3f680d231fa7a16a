"""FLOPs: what a rank really computes in a step, and what the model needs (for MFU).

``FlopCounter`` counts with torch's own formulas (``torch.utils.flop_counter``: matmuls,
convolutions, attention; elementwise ops count 0), on the tensors this rank holds. Unlike
torch's ``FlopCounterMode`` it counts a DTensor op on the local shards it turns into, not on
the DTensor's global shape (which would count tensor parallelism's matmuls ``tp`` times),
and skips the ops DTensor runs on FakeTensors to infer shapes.
CPU attention (``_scaled_dot_product_flash_attention_for_cpu``), which torch's table lacks,
counts as its matmuls do: 4·b·h·s_q·s_k·d forward and 10·b·h·s_q·s_k·d backward (the
scores recomputed, then four products), as torch counts its GPU flash kernels.

``pdlab.training.loop.run_on_rank`` counts the first step of a run on every rank (a counted
step runs every op through Python: ~1.5x slower); ``pdlab.cost.predictor.model_flops`` counts
a model's forward and backward on the meta device with it (MFU's FLOPs).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from pdlab import compat
from pdlab.compat import TorchDispatchMode
from pdlab.measure.comm import COMM_NAMESPACES

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensors holding data (others: shapes only)
_ASYNC_COLLECTIVE_TENSOR = compat.async_collective_tensor()
# Ops without a CompositeImplicitAutograd kernel, found by a first ``decompose``: asking the
# dispatcher again costs ~80 us an op (it looks the op up by name), ~0.14 s of a counted
# tensor-parallel gpt step at world 4.
_DOES_NOT_DECOMPOSE: set = set()


def _attention_products(query: torch.Tensor, key: torch.Tensor) -> int:
    """FLOPs of one b·h·s_q·s_k·d matmul, times 2 (multiply and add)."""
    *batch, s_q, d = query.shape
    return 2 * batch[0] * batch[1] * s_q * key.shape[-2] * d


def _cpu_attention(query, key, value, *args, out_val=None, **kwargs) -> int:
    return 2 * _attention_products(query, key)  # scores, then scores @ values


def _cpu_attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return 5 * _attention_products(query, key)


def formulas() -> dict:
    aten = torch.ops.aten
    return {
        **compat.flop_formulas(),
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
    }


class FlopCounter(TorchDispatchMode):
    """``with FlopCounter() as counter: ...``; then ``counter.flops`` and ``counter.kernels``,
    the ops that would each launch a kernel on a GPU (all but views and communication)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.kernels = 0
        self._formulas = formulas()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # DTensor turns its ops into ops on local shards (counted then), a functional
        # collective's result waits and unwraps into a plain tensor.
        if DTensor in types or _ASYNC_COLLECTIVE_TENSOR in types:
            return NotImplemented
        if any(t not in _PLAIN for t in types):  # FakeTensors: DTensor inferring shapes
            return func(*args, **kwargs)
        formula = self._formulas.get(compat.op_packet(func))
        if formula is None and func not in _DOES_NOT_DECOMPOSE:
            # A composite op (sdpa's math path) may decompose into counted ones.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            _DOES_NOT_DECOMPOSE.add(func)
        out = func(*args, **kwargs)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if not func.is_view and func.namespace not in COMM_NAMESPACES:
            self.kernels += 1
        return out
