"""Several GPUs: fastdit's processors under diffusers' Ulysses context parallelism.

diffusers runs one transformer on ``N`` GPUs with
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: hooks from the
model's ``_cp_plan`` shard the token sequence over the ``N`` ranks before the first block and
gather it after the last, so every per-token op (projections, norms, FFN) runs on ``S / N``
tokens; inside attention its Ulysses template (``attention_dispatch.TemplatedUlyssesAttention``)
all-to-alls Q/K/V from sequence shards ``(B, S/N, H, D)`` to head shards ``(B, S, H/N, D)``, so
each rank attends over the whole sequence for its own heads, and all-to-alls the output back.

fastdit's processors do the same all-to-all themselves (:class:`Ulysses`), so a method sees what
it sees in one process, restricted to a contiguous range of heads:

* the latent grid and the plan come from the transformer's unsharded input (the fastdit hook
  reads the 5-D latents, which no ``_cp_plan`` splits), and the plan covers the full sequence;
* Q/K/V arrive sequence-sharded, after projections, QK norm and the rank's slice of RoPE; one
  all-to-all (Q, K and V in one buffer) gives the rank the full sequence of its heads;
* GNA's tile-major permutation is applied per call to that full sequence (the once-per-forward
  block hooks stay off: the blocks see only a shard);
* a static plan with per-head entries is sliced to the local heads; a method that plans per call
  (``attend``) gets :class:`HeadShard` in ``AttentionCall.heads`` and must treat heads
  independently or use it for rules that span heads (AdaSpa's budget tiers rank all heads; PARO's
  calibrated orders and masks are per head). Methods declare this with ``head_parallel = True``;
  a method with ``attend`` that does not is refused, never run on a subset of heads silently;
* per-call runtime state (AdaSpa's LSE cache, VMoBA's selections) lives in each rank's process,
  for that rank's heads;
* the output all-to-all returns the rank's tokens for all heads, then the output projection.

What is refused (at ``fastdit.apply`` when the parallel config is already there, at the first
forward otherwise: ``enable_parallelism`` can come after ``apply`` and fastdit does not patch it),
never computed some other way: ring attention (``ring_degree > 1``; a block-sparse plan over
sequence shards of keys is not what fastdit's kernels run, so use Ulysses), tensor parallelism,
model families whose adapter has no context-parallel support, methods that are not
``head_parallel``, and a head count that ``ulysses_degree`` does not divide unless
``ulysses_anything=True`` (diffusers' own dense steps need it).

Nothing here runs in one process: every entry point returns ``None`` or does nothing when the
transformer has no context-parallel config.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "HeadShard", "ProcessGroupRun", "Ulysses", "check_model", "context_parallel_config", "enable", "launch",
    "split_sizes", "ulysses_for",
]


def context_parallel_config(model):
    """The model's diffusers ``ContextParallelConfig`` after ``enable_parallelism``, else ``None``."""
    parallel_config = getattr(model, "_parallel_config", None)
    return getattr(parallel_config, "context_parallel_config", None)


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(total), parts)``: the first ``total % parts`` get one more.

    diffusers shards with ``chunk`` (``total % parts == 0`` asserted, the same sizes) or, with
    ``ulysses_anything``, with ``tensor_split``.
    """
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def _refuse(model, reason: str) -> ValueError:
    name = type(model).__name__
    return ValueError(f"fastdit cannot run this {name} under diffusers' parallelism: {reason}")


def check_model(model, adapter, method) -> None:
    """Raise unless fastdit can run ``method`` exactly on ``model`` under its parallel config.

    Nothing to check (returns) when the model has no parallel config.
    """
    parallel_config = getattr(model, "_parallel_config", None)
    if parallel_config is None:
        return
    if getattr(parallel_config, "tensor_parallel_config", None) is not None:
        raise _refuse(
            model,
            "tensor parallelism (TensorParallelConfig) is not supported; use Ulysses context "
            "parallelism: enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))",
        )
    cp = parallel_config.context_parallel_config
    if cp is None:
        return
    if cp.ring_degree > 1:
        raise _refuse(
            model,
            f"ring attention (ring_degree={cp.ring_degree}) is not supported: a block-sparse plan "
            "needs every key of a head on one rank. Use Ulysses instead: "
            f"ContextParallelConfig(ulysses_degree={cp.ring_degree * cp.ulysses_degree})",
        )
    if not adapter.supports_context_parallel:
        family = type(adapter).__module__.rsplit(".", 1)[-1]
        raise _refuse(model, f"fastdit's {family} adapter has no context-parallel support")
    if method is not None and method.plans_per_call and not method.head_parallel:
        raise _refuse(
            model,
            f"{type(method).__name__} plans per call and does not declare head_parallel=True (that "
            "it runs correctly on a subset of the heads, see fastdit.parallel); run it in one process",
        )
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(heads, int) and heads % cp.ulysses_degree and not cp.ulysses_anything:
        raise _refuse(
            model,
            f"ulysses_degree must divide the head count (diffusers' Ulysses attention splits heads "
            f"evenly), got {heads} heads for ulysses_degree={cp.ulysses_degree}; use a divisor of "
            f"{heads} or ContextParallelConfig(ulysses_degree={cp.ulysses_degree}, ulysses_anything=True)",
        )
    adapter.check_context_parallel(model, cp)


def ulysses_for(model, adapter, method, previous: Ulysses | None = None) -> Ulysses | None:
    """The :class:`Ulysses` group of ``model``'s current parallel config (checked), or ``None``.

    Called before every forward; ``previous`` is returned as it is when the config did not change.
    """
    parallel_config = getattr(model, "_parallel_config", None)
    if parallel_config is None:
        return None
    if previous is not None and previous.config is parallel_config:
        return previous
    check_model(model, adapter, method)
    if parallel_config.context_parallel_config is None:
        return None
    return Ulysses(parallel_config)


@dataclass(eq=False)
class Ulysses:
    """The all-to-alls of Ulysses attention over the ``ulysses`` mesh of a diffusers ``ParallelConfig``.

    Sequence shards and head shards follow ``tensor_split`` sizes (:func:`split_sizes`), so
    ``ulysses_anything`` configurations with uneven lengths or head counts work too; with
    ``chunk``-divisible sizes they are diffusers' equal shards.
    """

    config: object  # diffusers ParallelConfig
    degree: int = field(init=False)
    rank: int = field(init=False)
    group: object = field(init=False)
    # This rank's share of the heads of the last layer it attended (weights per-rank densities).
    head_share: float = field(init=False)
    _sliced_plans: weakref.WeakKeyDictionary = field(init=False, default_factory=weakref.WeakKeyDictionary)

    def __post_init__(self) -> None:
        cp = self.config.context_parallel_config
        self.degree = cp.ulysses_degree
        self.rank = cp._ulysses_local_rank
        self.group = cp._ulysses_mesh.get_group()
        self.head_share = 1.0 / self.degree

    # ------------------------------------------------------------------ shards
    def heads(self, total: int) -> HeadShard:
        """This rank's heads of a layer with ``total`` heads."""
        sizes = split_sizes(total, self.degree)
        if min(sizes) < 1:
            raise ValueError(
                f"Ulysses attention needs at least one head per rank, got {total} heads for "
                f"ulysses_degree={self.degree}"
            )
        self.head_share = sizes[self.rank] / total
        return HeadShard(sum(sizes[: self.rank]), sizes[self.rank], total, self)

    def _check_local(self, name: str, local: int, total: int) -> list[int]:
        sizes = split_sizes(total, self.degree)
        if local != sizes[self.rank]:
            raise ValueError(
                f"rank {self.rank} of {self.degree} holds {local} {name}, but a sequence of {total} "
                f"tokens splits into {sizes} (diffusers' _cp_plan shards the sequence evenly, in "
                "rank order); the model's _cp_plan does not shard this attention as fastdit expects"
            )
        return sizes

    # ------------------------------------------------------------------ all-to-alls
    def to_heads(self, tensors: Sequence[torch.Tensor], seq_len: int) -> list[torch.Tensor]:
        """Sequence shards ``[B, S_r, H, D]`` -> the full sequence of this rank's heads ``[B, S, H_r, D]``.

        All tensors (Q, K, V) share one all-to-all. ``seq_len`` is the full sequence length ``S``.
        """
        import torch.distributed as dist

        first = tensors[0]
        batch, local, heads, head_dim = first.shape
        for x in tensors[1:]:
            if x.shape != first.shape or x.dtype != first.dtype:
                shapes = [(tuple(t.shape), t.dtype) for t in tensors]
                raise ValueError(f"to_heads needs equal shapes and dtypes, got {shapes}")
        seq_sizes = self._check_local("tokens", local, seq_len)
        head_sizes = split_sizes(heads, self.degree)
        count = len(tensors)
        # Destination-major send buffer: for rank j, every tensor's slice of j's heads (one copy).
        send_sizes = [count * batch * local * size * head_dim for size in head_sizes]
        send = first.new_empty(sum(send_sizes))
        for part, start, size in zip(send.split(send_sizes), _offsets(head_sizes), head_sizes):
            slots = part.view(count, batch, local, size, head_dim)
            for slot, x in zip(slots, tensors):
                slot.copy_(x[:, :, start : start + size])
        local_heads = head_sizes[self.rank]
        recv_sizes = [count * batch * size * local_heads * head_dim for size in seq_sizes]
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        pieces = [
            part.view(count, batch, size, local_heads, head_dim)
            for part, size in zip(recv.split(recv_sizes), seq_sizes)
        ]
        gathered = torch.cat(pieces, dim=2)  # [count, B, S, H_r, D]
        return list(gathered.unbind(0))

    def to_sequence(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """Inverse of :meth:`to_heads` for one tensor: ``[B, S, H_r, D]`` -> ``[B, S_r, H, D]``."""
        import torch.distributed as dist

        batch, seq_len, local_heads, head_dim = x.shape
        head_sizes = split_sizes(heads, self.degree)
        if local_heads != head_sizes[self.rank]:
            raise ValueError(
                f"rank {self.rank} holds {local_heads} heads, expected {head_sizes[self.rank]} of {heads}"
            )
        seq_sizes = split_sizes(seq_len, self.degree)
        send_sizes = [batch * size * local_heads * head_dim for size in seq_sizes]
        send = x.new_empty(sum(send_sizes))
        for part, piece, size in zip(send.split(send_sizes), x.split(seq_sizes, dim=1), seq_sizes):
            part.view(batch, size, local_heads, head_dim).copy_(piece)
        local = seq_sizes[self.rank]
        recv_sizes = [batch * local * size * head_dim for size in head_sizes]
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        pieces = [
            part.view(batch, local, size, head_dim)
            for part, size in zip(recv.split(recv_sizes), head_sizes)
        ]
        return torch.cat(pieces, dim=2)

    def gather_heads(self, x: torch.Tensor, dim: int, total: int) -> torch.Tensor:
        """Every rank's head slice of ``x`` along ``dim`` -> all ``total`` heads, on every rank."""
        import torch.distributed as dist

        dim = dim % x.dim()
        sizes = split_sizes(total, self.degree)
        if x.shape[dim] != sizes[self.rank]:
            raise ValueError(
                f"rank {self.rank} holds {x.shape[dim]} heads on dim {dim}, expected "
                f"{sizes[self.rank]} of {total}"
            )
        widest = max(sizes)
        padded = x
        if x.shape[dim] < widest:
            pad_shape = list(x.shape)
            pad_shape[dim] = widest - x.shape[dim]
            padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(padded) for _ in range(self.degree)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)

    def mean_over_ranks(self, values: dict, weight: float | None = None) -> dict:
        """Weighted mean of per-rank ``{key: float}`` dicts (keys missing on a rank are skipped),
        on every rank (a collective); ``weight`` is this rank's share, by default its share of
        the heads (per-layer attention densities averaged over all heads, as in one process)."""
        weight = self.head_share if weight is None else weight
        import torch.distributed as dist

        gathered: list = [None] * self.degree
        dist.all_gather_object(gathered, (dict(values), float(weight)), group=self.group)
        sums: dict = {}
        for rank_values, rank_weight in gathered:
            for key, value in rank_values.items():
                total, weights = sums.get(key, (0.0, 0.0))
                sums[key] = (total + value * rank_weight, weights + rank_weight)
        return {key: total / weights for key, (total, weights) in sums.items() if weights > 0}

    # ------------------------------------------------------------------ plans
    def slice_plan(self, sparsity, shard: HeadShard):
        """A plan's entries for ``shard``'s heads (per-head plans; broadcast plans as they are).

        Sliced plans are cached per plan object, so a static plan is sliced once per rank.
        """
        heads = sparsity.kv_counts.shape[1]
        if heads == 1:
            return sparsity
        if heads != shard.total:
            raise ValueError(f"plan has {heads} heads, the layer {shard.total}")

        def make():
            from .kernels import BlockSparsity

            window = slice(shard.start, shard.start + shard.count)
            return BlockSparsity(
                sparsity.kv_counts[:, window].contiguous(), sparsity.kv_indices[:, window].contiguous(),
                sparsity.q_block_size, sparsity.kv_block_size, sparsity.num_kv_blocks,
            )

        return self._cached(sparsity, shard, make)

    def slice_window(self, window_mask, shard: HeadShard):
        """A :class:`~fastdit.kernels.WindowMask` with its partial blocks sliced to ``shard``
        (cached like plans: the kernel checks a mask against its plan once per pair)."""
        if window_mask is None:
            return None
        partial = self.slice_plan(window_mask.partial, shard)
        if partial is window_mask.partial:
            return window_mask
        return self._cached(window_mask, shard, lambda: dataclasses.replace(window_mask, partial=partial))

    def _cached(self, source, shard: HeadShard, make):
        cached = self._sliced_plans.get(source)
        if cached is None or cached[0] != (shard.start, shard.count):
            cached = ((shard.start, shard.count), make())
            self._sliced_plans[source] = cached
        return cached[1]


def _offsets(sizes: list[int]) -> list[int]:
    starts, position = [], 0
    for size in sizes:
        starts.append(position)
        position += size
    return starts


@dataclass(frozen=True, eq=False)
class HeadShard:
    """The heads one rank attends over after the all-to-all: ``[start, start + count)`` of ``total``.

    Given to per-call methods as ``AttentionCall.heads`` (``None`` in one process). A rule that
    spans heads gathers what it needs with :meth:`gather` and keeps its own slice with :meth:`local`.
    """

    start: int
    count: int
    total: int
    ulysses: Ulysses = field(repr=False)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's ``count`` heads of ``x`` along ``dim`` -> all ``total`` heads (a collective:
        every rank of the group must call it, in the same order)."""
        return self.ulysses.gather_heads(x, dim, self.total)

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of an all-heads tensor ``x`` along ``dim``."""
        return x.narrow(dim, self.start, self.count)

    def slice_plan(self, sparsity):
        """A per-head plan of all heads -> its local heads (a broadcast plan stays as it is)."""
        return self.ulysses.slice_plan(sparsity, self)


# --------------------------------------------------------------------------- torchrun launches
@dataclass
class ProcessGroupRun:
    """This process's place in a ``torchrun --nproc-per-node N`` launch with Ulysses degree ``N``."""

    degree: int
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owned: bool = True  # whether launch() initialised the process group (close() destroys it then)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order, on every rank (a collective)."""
        import torch.distributed as dist

        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        """Destroy the process group if :func:`launch` created it (not one the caller set up)."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def launch(degree: int, device: str | torch.device | None = None) -> ProcessGroupRun:
    """Join the process group of a ``torchrun --nproc-per-node degree`` launch.

    Checks that the launch has ``degree`` processes and an accelerator per process (diffusers'
    ``enable_parallelism`` builds its device mesh on ``torch.accelerator``), selects
    ``cuda:LOCAL_RANK`` and initialises NCCL (gloo off CUDA). Raises ``ValueError`` naming what
    is missing.
    """
    import os

    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if "RANK" not in os.environ or world is None or int(world) != degree:
        raise ValueError(
            f"--ulysses {degree} runs as {degree} processes started by torchrun: torchrun "
            f"--nproc-per-node {degree} -m fastdit ... --ulysses {degree} (this process has "
            f"WORLD_SIZE={world or 'unset'})"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    accelerator = torch.accelerator.current_accelerator()
    device_type = accelerator.type if accelerator is not None else "cpu"
    if device is not None and torch.device(device).type != device_type:
        raise ValueError(
            f"--ulysses runs on this machine's {device_type} devices (diffusers builds its device "
            f"mesh there), got --device {device}"
        )
    count = torch.accelerator.device_count()
    if count == 0:
        raise ValueError(
            "--ulysses needs an accelerator: diffusers' enable_parallelism places rank r on device "
            "r % torch.accelerator.device_count(), which is 0 on this CPU-only torch"
        )
    if device_type == "cuda":
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        run_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        run_device, backend = torch.device(device_type), "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend)
    return ProcessGroupRun(degree, rank, int(world), local_rank, run_device, dist.get_backend(), owned)


def enable(pipe_or_model, degree: int) -> None:
    """``enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))`` on every
    transformer of a pipeline (or on one model), with the adapter's ``_cp_plan`` where diffusers
    has none. Refuses models fastdit cannot run under context parallelism, before any changes."""
    from diffusers import ContextParallelConfig

    from .pipelines.base import adapter_for, denoising_models

    models = denoising_models(pipe_or_model)
    plans = []
    for model in models:
        adapter = adapter_for(model)
        if not adapter.supports_context_parallel:
            raise ValueError(f"fastdit has no context-parallel support for {type(model).__name__}")
        plan = adapter.context_parallel_plan(model)
        if plan is None and getattr(model, "_cp_plan", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no context-parallel plan (_cp_plan) in this diffusers"
            )
        plans.append(plan)
    for model, plan in zip(models, plans):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=plan)
