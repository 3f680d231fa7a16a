"""Every private or version-dependent torch API pdlab touches, and only here.

pdlab runs on torch >= 2.6 and is tested on 2.13 (CPU). Each shim below says which torch
versions it covers; when an upgrade breaks one, this is the file to change. The rest of
pdlab uses public APIs only, some of them since a version it already requires: the
``group_src``/``group_dst`` keywords of send/recv/isend (2.6), ``torch.distributed.fsdp.
fully_shard`` (2.6), the ``forward_one_chunk``/``backward_one_chunk`` methods of a
pipelining stage, which take the micro-batch index first (2.6 to 2.13).

Imports stay cheap (``runtime`` imports this module on every rank): anything heavy is
imported inside the function that needs it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

# torch 1.13 to 2.13: the dispatch-mode base class and pytree live in private modules (torch
# itself imports both, so this costs nothing).
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = [
    "FUNCTIONAL_OPS",
    "PROCESS_GROUP_OPS",
    "TorchDispatchMode",
    "all_gather",
    "async_collective_tensor",
    "flop_formulas",
    "functional_collectives",
    "initialize_pipeline_stage",
    "is_wait_tensor",
    "op_arguments",
    "op_name",
    "op_packet",
    "parallelize_in_place",
    "process_group",
    "process_groups",
    "queue_backward_callback",
    "reduce_scatter",
    "replicate",
    "rowwise_parallel_waiting",
    "sequence_number",
    "sequence_numbers",
    "tree_flatten",
    "tree_map_only",
    "unbox_work",
    "work_completion",
    "work_from_future",
]

# torch 2.12 renamed these two (the old names warn from 2.13 on); before 2.12 only the old
# names exist.
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# ---- the dispatcher's view of c10d ops (pdlab.measure.comm) -----------------------------------------


def op_name(func: Any) -> str:
    """An op's name without its namespace (``allreduce_``), from its schema (2.0 to 2.13)."""
    return func._schema.name.split("::")[1]


def op_arguments(func: Any) -> list[str]:
    """The names of an op's positional arguments, from its schema (2.0 to 2.13)."""
    return [a.name for a in func._schema.arguments]


def op_packet(func: Any) -> Any:
    """The overload packet of an op (``aten.mm`` for ``aten.mm.default``; 1.13 to 2.13)."""
    return func._overloadpacket


def flop_formulas() -> dict:
    """torch's FLOP formula for each op it counts, keyed by overload packet: the table
    ``FlopCounterMode`` builds (its ``flop_registry``, 2.1 to 2.13)."""
    from torch.utils.flop_counter import FlopCounterMode

    return dict(FlopCounterMode(display=False).flop_registry)


def is_wait_tensor(func: Any) -> bool:
    """Whether ``func`` is the functional collectives' ``wait_tensor`` (2.3 to 2.13)."""
    return func is torch.ops._c10d_functional.wait_tensor.default


def async_collective_tensor() -> type[torch.Tensor]:
    """The tensor a functional collective returns in eager mode, which calls ``wait_tensor``
    when an op first uses it (a private module, 2.1 to 2.13; DTensor imports it anyway)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return AsyncCollectiveTensor


def process_group(arg: Any) -> dist.ProcessGroup:
    """The group an op was called with: functional ops pass its name (resolved by a private
    c10d function, 2.3 to 2.13), eager c10d ops a boxed ScriptObject (2.0 to 2.13)."""
    if isinstance(arg, str):
        return c10d._resolve_process_group(arg)
    if isinstance(arg, torch.ScriptObject):
        return dist.ProcessGroup.unbox(arg)
    return arg


def unbox_work(boxed: torch.ScriptObject) -> dist.Work:
    """The Work an eager c10d op returned, boxed for the dispatcher (``Work.unbox``: 2.0 to 2.13)."""
    return c10d.Work.unbox(boxed)


def work_completion(
    work: dist.Work, value: list[torch.Tensor], devices: list[torch.device] | None = None
) -> torch.futures.Future:
    """A future that completes when ``work`` does: its own, or for a Work that has none
    (gloo's send, recv and reduce-scatter: "getFuture not implemented"), one that a thread
    waiting on ``work`` completes with ``value`` (or with its error)."""
    with contextlib.suppress(RuntimeError):
        return work.get_future()
    future = torch.futures.Future(devices=devices)

    def wait() -> None:
        try:
            work.wait()
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(value)

    threading.Thread(target=wait, name="pdlab-work-wait", daemon=True).start()
    return future


def work_from_future(future: torch.futures.Future) -> torch.ScriptObject:
    """A boxed Work that completes when ``future`` does, to return from a dispatch mode in
    place of an op's own (pdlab.cost.emulation). ``_create_work_from_future`` is private (1.13 to
    2.13; torch's own Python process groups use it); ``Work.boxed`` is 2.0 to 2.13. The
    future's value is what ``Work.result()`` gives: a list of tensors."""
    from torch._C._distributed_c10d import _create_work_from_future

    return _create_work_from_future(future).boxed()


# ---- process groups (pdlab.control.runtime) ---------------------------------------------------------


def process_groups() -> dict[str, dist.ProcessGroup]:
    """This process's groups by name, from c10d's private registry (``_world``: 2.0 to 2.13)."""
    world = c10d._world
    return {world.pg_names[pg]: pg for pg in world.pg_map}


def sequence_number(pg: dist.ProcessGroup) -> int:
    """How many operations ``pg`` has issued: its private sequence counter (1.10 to 2.13)."""
    return pg._get_sequence_number_for_group()


def sequence_numbers() -> dict[str, int]:
    """How many operations each of this process's groups has issued, by group name."""
    return {name: sequence_number(pg) for name, pg in process_groups().items()}


# ---- where every collective and p2p op passes (pdlab.measure.flight) ------------------------------

# ProcessGroup method -> the op it issues. Every eager torch.distributed function (and DDP's
# comm hook, FSDP2, pipelining) ends in one of these methods of the public ProcessGroup class
# (2.0 to 2.13; ``_allgather_base``/``_reduce_scatter_base`` are private, the ``*_single``
# ones appeared in 2.12). Names the installed torch lacks are skipped.
PROCESS_GROUP_OPS = {
    "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "allgather": "all_gather",
    "_allgather_base": "all_gather",
    "allgather_coalesced": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather_single_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_single_coalesced": "reduce_scatter",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all",
    "all_to_all_single": "all_to_all",
    "gather": "gather",
    "scatter": "scatter",
    "send": "send",
    "recv": "recv",
    "recv_anysource": "recv",
    "barrier": "barrier",
    "monitored_barrier": "barrier",
}

# The functional collectives DTensor issues, in a private module (2.3 to 2.13): function ->
# op. Their result is waited on by the module's ``wait_tensor``.
FUNCTIONAL_OPS = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}


def functional_collectives() -> Any:
    """``torch.distributed._functional_collectives`` (private; 2.3 to 2.13)."""
    import torch.distributed._functional_collectives as funcol

    return funcol


# ---- autograd (pdlab.measure.trace) ----------------------------------------------------------------


def queue_backward_callback(callback: Any) -> None:
    """Run ``callback()`` when the backward pass now running ends, before callbacks queued
    later (DDP queues its gradient wait when its last bucket launches). Called from inside
    backward (a hook). The engine's ``queue_callback`` is private; DDP and FSDP2 use it
    (1.x to 2.13)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


# ---- pipelining and FSDP2 (pdlab.training.parallel) --------------------------------------------------


def initialize_pipeline_stage(schedule: Any) -> None:
    """Run a schedule's one-time shape handshake now, not in its first step.

    ``PipelineScheduleSingle._initialize_stage(args, kwargs)`` and, for the looped schedules
    (``ScheduleInterleavedZeroBubble``), ``PipelineScheduleMulti._initialize_stages`` are
    private; 2.6 to 2.13 take those two arguments first (2.13 adds optional ``target``,
    ``loss_kwargs``). With static shapes given to the stage, the handshake is one int32 vote
    each way per boundary.
    """
    single = getattr(schedule, "_initialize_stage", None)
    (single or schedule._initialize_stages)((), {})


def replicate(module: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2's ``replicate``: DDP rebuilt on FSDP2, which takes DTensor parameters (classic
    DDP refuses them). A private module, in torch 2.9 to 2.13."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate as fsdp_replicate
    except ImportError as exc:
        raise NotImplementedError(
            f"impl='torch' hybrids need torch >= 2.9 (FSDP2's replicate); this is torch "
            f"{torch.__version__}: use impl='scratch'"
        ) from exc
    return fsdp_replicate(module, mesh=mesh)


def parallelize_in_place(module: torch.nn.Module, mesh: Any, plan: dict) -> torch.nn.Module:
    """``parallelize_module`` with every rank sharding the parameters it holds: each rank
    built the same model from the same seed, so scattering rank 0's copy (the default: one
    collective a parameter, 40 for the GPT, ~0.35 s at 4 ranks here) moves equal bytes.
    ``src_data_rank=None`` says so since torch 2.7; older torch scatters."""
    from torch.distributed.tensor.parallel import parallelize_module

    if parallelizes_in_place():
        return parallelize_module(module, mesh, plan, src_data_rank=None)
    return parallelize_module(module, mesh, plan)


def parallelizes_in_place() -> bool:
    """Whether ``parallelize_in_place`` sends nothing (``src_data_rank``: torch 2.7 and later)."""
    from torch.distributed.tensor.parallel import parallelize_module

    return "src_data_rank" in inspect.signature(parallelize_module).parameters


def rowwise_parallel_waiting(**kwargs: Any) -> Any:
    """``RowwiseParallel(**kwargs)`` whose output redistribution (a reduce-scatter to a
    ``Shard`` output) completes where it is issued, and so its backward all-gather: torch
    issues both async, and on a run's last step that all-gather was waited for where
    ``CommMeter`` doesn't see it (tp-sp torch: 2 of 7 ops a step; an emulated link then can't
    delay it). Overrides the private ``_prepare_output_fn`` (its signature in 2.2 to 2.13)."""
    from torch.distributed.tensor.parallel import RowwiseParallel

    class RowwiseWaiting(RowwiseParallel):
        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            if outputs.placements != output_layouts:
                outputs = outputs.redistribute(placements=output_layouts, async_op=False)
            return outputs.to_local() if use_local_output else outputs

    return RowwiseWaiting(**kwargs)


def print_options() -> dict[str, Any]:
    """torch's tensor print options, live (``torch.set_printoptions`` has no getter; the
    dict is ``torch._tensor_str.PRINT_OPTS``'s own, 2.0 to 2.13): a script's changes are
    read and put back through it."""
    return vars(torch._tensor_str.PRINT_OPTS)


def mesh_without_groups(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    """A DeviceMesh equal to ``init_device_mesh(device_type, shape, mesh_dim_names=names)``,
    made without a collective (no process group is created: any thread may build it, any
    time), for a warm-up under FakeTensorMode (``pdlab.training.loop._first_dtensor_step``).

    Torch keys DTensor's caches by a mesh's ranks, shape and names, and the specs it caches
    carry the mesh they were made on into later runs: so each dim must name the group the
    real mesh's has. A dim spanning the world has the default group (init_device_mesh reuses
    it, 2.6 to 2.13: ``tests/test_prestart.py`` compares); a dim of one rank names none, so a
    collective over it raises. Private: ``_init_backend`` and ``_dim_group_names`` (2.4 to 2.13).
    """
    from torch.distributed.device_mesh import DeviceMesh

    world = dist.get_world_size()
    if any(size not in (1, world) for size in shape) or shape.count(world) != 1:
        raise ValueError(f"one dim must span the {world} ranks, the others be 1: {shape}")
    mesh = DeviceMesh(
        device_type, torch.arange(world).reshape(shape), mesh_dim_names=names, _init_backend=False
    )
    mesh._dim_group_names = [
        dist.group.WORLD.group_name if size == world else "no group: a warm-up's mesh"
        for size in shape
    ]
    return mesh


def fake_tensors() -> Any:
    """A FakeTensorMode (private module, 2.0 to 2.13) for a warm-up step: ops on real tensors
    are faked too (the model's weights), and ``.item()`` gives a symbol, not an error (a
    ShapeEnv), so a whole training step runs without computing or sending anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
