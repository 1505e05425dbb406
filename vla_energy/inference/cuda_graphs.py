"""refine replayed from CUDA graphs: the kernels of `refine`, launched as one graph instead of one by one.

At batch 1 the energy head's kernels are tiny and refine (1 + 2 x steps calls of the head, a backward in each step)
costs what launching them costs. A graph captured once per input shape replays them with one launch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import Tensor, nn

from vla_energy.inference.rerank import REFINE_STEP_SIZES, Bound, Descent, descend, prepare_refine
from vla_energy.modeling.modeling_energy_head import EncodedContext

__all__ = ["GraphedRefine"]


def _bound_key(bound: Bound) -> Hashable:
    """A bound as part of a graph's key: its value (a graph holds numbers and tensor bounds as they were captured)."""
    return tuple(bound.flatten().tolist()) if isinstance(bound, Tensor) else bound


class GraphedRefine:
    """A drop-in for `refine` on CUDA that captures one graph per input shape and options, then replays it.

    The results are refine's: the same kernels run on the same inputs. Not supported: action masks (checking them
    waits for the device). The graph reads the head's weights where they were at capture: update them in place (e.g.
    load_state_dict), or start a new GraphedRefine. Keeps up to `max_graphs` graphs, the least recently used go first.
    """

    def __init__(self, max_graphs: int = 8) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, Descent, tuple[Tensor, Tensor]]] = \
            OrderedDict()

    def __call__(
        self,
        head: nn.Module,
        context: Union[Tensor, EncodedContext],
        actions: Tensor,
        steps: int = 10,
        step_sizes: Sequence[float] = REFINE_STEP_SIZES,
        context_mask: Optional[Tensor] = None,
        action_mask: Optional[Tensor] = None,
        low: Bound = -1.0,
        high: Bound = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """refine(head, context, actions, ...) from a graph: (refined actions, energies [steps+1, B(,K)])."""
        if actions.device.type != "cuda":
            raise ValueError(f"GraphedRefine runs on CUDA, the actions are on {actions.device}: use refine")
        if action_mask is not None:
            raise ValueError("GraphedRefine takes no action_mask (checking it waits for the device): use refine")
        d = prepare_refine(head, context, actions, steps, step_sizes, context_mask, None, low, high)
        keep = d.context.keep
        key = (id(head), tuple(d.chunks.shape), d.chunks.dtype, tuple(d.context.kv[0][0].shape),
               d.context.kv[0][0].dtype, None if keep is None else tuple(keep.shape), steps,
               tuple(float(s) for s in step_sizes), _bound_key(low), _bound_key(high))
        if key not in self._graphs:
            self._graphs[key] = self._capture(head, d, steps)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static, (out, trace) = self._graphs[key]
        for (k, v), (k_new, v_new) in zip(static.context.kv, d.context.kv):
            k.copy_(k_new)
            v.copy_(v_new)
        if keep is not None:
            static.context.keep.copy_(keep)
        static.chunks.copy_(d.chunks)
        graph.replay()
        out, trace = out.clone(), trace.clone()
        return (out[:, 0], trace[..., 0]) if d.single else (out, trace)

    @staticmethod
    def _capture(head: nn.Module, d: Descent, steps: int
                 ) -> tuple[torch.cuda.CUDAGraph, Descent, tuple[Tensor, Tensor]]:
        """Warm up on a side stream (as CUDA graph capture requires), then capture descend on static copies."""
        context = EncodedContext(tuple((k.clone(), v.clone()) for k, v in d.context.kv),
                                 None if d.context.keep is None else d.context.keep.clone(), d.context.batch_size)
        static = replace(d, context=context, chunks=d.chunks.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                descend(head, static, steps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = descend(head, static, steps)
        return graph, static, outputs
