"""What every fastdit attention processor shares, whatever the model family.

A processor holds a method (which plans the block sparsity), its dense schedule, and the
:class:`~fastdit.integration.DenoisingState` that fastdit's hooks fill in before each transformer
forward (latent grid, denoising step, layer indices, the active plan). It declares
``_attention_backend`` and ``_parallel_config`` like diffusers' own processors and passes them on
to the stock processors it delegates to.

Under diffusers' Ulysses context parallelism the parallel config that counts is the
transformer's (``transformer._parallel_config``, read by fastdit's hook before every forward into
``state.parallel``), not the processor's attribute: ``enable_parallelism`` sets the attribute only
on the processors installed at that time, so a processor installed later would otherwise attend
within its shard. See :mod:`fastdit.parallel`.
"""

from __future__ import annotations

import torch

from ..kernels import block_sparse_attention, dense_attention, fastest_dense_backend
from ..layout import SequenceLayout
from ..methods.base import AttentionCall, MethodPlan
from ..methods.dense import Dense
from ..schedule import Schedule


class FastditAttnProcessor:
    """Base of the per-model processors in ``fastdit.pipelines``."""

    _attention_backend = None
    _parallel_config = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Under torch.compile (regional: ``compile_repeated_blocks``, ``fastdit generate
        # --compile``) a processor call runs eagerly between the block's compiled graphs: its
        # bookkeeping (step, layer, schedule, density records, per-call plans) would otherwise be
        # guarded per step and per layer and recompile until dynamo's recompile limit, after
        # which the frame runs eagerly anyway, with every timing before it paying compilations.
        if "__call__" in cls.__dict__:
            cls.__call__ = torch.compiler.disable(cls.__call__)

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        self.method = method
        self.schedule = schedule if schedule is not None else Schedule.from_method(method)
        self.state = None  # a fastdit.integration.DenoisingState, bound by apply/attach

    def _unbound_error(self) -> RuntimeError:
        name = type(self).__name__
        return RuntimeError(
            f"{name} needs the latent grid, layer index and denoising step, which fastdit learns "
            f"through hooks on the transformer: after set_attn_processor({name}(...)) call "
            "fastdit.attach(pipe) once, or install with fastdit.apply(pipe, method)"
        )

    @property
    def _ulysses(self):
        """The transformer's :class:`~fastdit.parallel.Ulysses` group for this forward, or ``None``."""
        return self.state.parallel if self.state is not None else None

    def _current_parallel_config(self):
        """The transformer's diffusers ``ParallelConfig`` (context parallel), else ``None``."""
        ulysses = self._ulysses
        return ulysses.config if ulysses is not None else None

    def _call_stock(self, stock, *args):
        """Run a stock diffusers processor with this processor's backend and the transformer's
        parallel config."""
        stock._attention_backend = self._attention_backend
        stock._parallel_config = self._current_parallel_config()
        return stock(*args)

    def _dense_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Dense self-attention of a dense step or layer, ``[B, S, H, D]``.

        FA4's dense kernel when fastdit can run it and diffusers has no backend or context
        parallelism selected for this processor (it beats SDPA's cuDNN and FA2 kernels on
        Hopper); otherwise diffusers' own dispatch, as the stock processor would do.
        """
        parallel_config = self._current_parallel_config()
        if (
            self._attention_backend is None
            and parallel_config is None
            and fastest_dense_backend(query.device, query.dtype, query.shape[-1]) == "flash4"
        ):
            return dense_attention(query, key, value)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=parallel_config,
        )

    def _layer_runs_sparse(self, attn, layout: SequenceLayout | None = None) -> tuple[int, bool]:
        """(layer index, whether this layer runs the method's plan at the current step).

        ``Dense`` always runs fastdit's kernel; other methods follow their schedule, and a layer
        that runs dense is recorded at density 1. A method with ``runs_on(layout, downsample)``
        (Agent) can also send a call to the stock path: ``layout`` is this layer's sequence (the
        forward's by default), ``downsample`` its spatial downsampling relative to the model's
        highest-resolution self-attention (UNets; 1 for DiTs).
        """
        state = self.state
        layer = state.layer_index[id(attn)]
        sparse = isinstance(self.method, Dense) or not self.schedule.is_dense(
            state.step, state.num_steps, layer, state.num_layers[id(attn)]
        )
        runs_on = getattr(self.method, "runs_on", None)
        if sparse and runs_on is not None:
            layout = layout if layout is not None else state.active_plan.layout
            sparse = runs_on(layout, state.layer_downsample.get(id(attn), 1))
        if not sparse:
            state.record_density(layer, 1.0)
        return layer, sparse

    def _record(self, layer: int, plan: MethodPlan) -> None:
        self.state.record_density(layer, plan.density)

    def _attend(
        self,
        attn,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        plan: MethodPlan | None = None,
        heads=None,
    ) -> torch.Tensor:
        """Sparse self-attention of one layer, Q/K/V ``[B, S, H, D]`` in the plan's token order.

        Static methods run their plan on the kernel; methods with ``attend`` plan per call (from
        Q and K, the step and their runtime state) and compose kernel calls themselves. ``plan``
        is the forward's active plan unless the layer has its own sequence (UNet resolutions).
        ``heads``: under Ulysses, the :class:`~fastdit.parallel.HeadShard` Q/K/V hold (per-head
        plans are sliced to it; per-call methods get it as ``call.heads``).
        """
        state = self.state
        plan = plan if plan is not None else state.active_plan
        attend = getattr(self.method, "attend", None)
        if attend is None:
            sparsity, window_mask = plan.sparsity, plan.window_mask
            if heads is not None:
                sparsity, window_mask = heads.slice_plan(sparsity), heads.ulysses.slice_window(window_mask, heads)
            out = block_sparse_attention(
                query, key, value, sparsity, key_padding=key_padding, window_mask=window_mask,
                quantize=state.quantize,
            )
            self._record(layer, plan)
            return out
        call = AttentionCall(
            plan=plan,
            layer=layer,
            num_layers=state.num_layers[id(attn)],
            transformer=state.transformer_index.get(id(attn), 0),
            step=state.step,
            num_steps=state.num_steps,
            context=state.context,
            generation=state.generation,
            runtime=state.runtime,
            key_padding=key_padding,
            quantize=state.quantize,
            heads=heads,
        )
        out, density = attend(query, key, value, call)
        state.record_density(layer, density)  # a device tensor stays one: no sync here
        return out
