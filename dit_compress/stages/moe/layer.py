"""A diffusers FeedForward restructured as a mixture of experts, executed sparsely.

The FFN's hidden neurons are partitioned: a shared expert (always runs) and equally sized
routed experts, of which a linear router picks `top_k` per token. Only the chosen experts
run, on two execution paths that compute the same function:

- the reference (`_forward_reference`): tokens scattered into per-expert slabs padded to the
  busiest expert's load, one batched matmul, gathered back — no dense evaluation under a mask,
  in PyTorch and in the exported ONNX graph alike (TopK / ScatterElements / Gather). It runs on
  the CPU, in fp32, under autocast and in every export.
- the grouped path (`_forward_grouped`), taken for CUDA bf16 on Hopper or newer: (token, choice)
  pairs sorted by expert, each expert's rows multiplied by its own weights in one grouped GEMM
  (`torch.nn.functional.grouped_mm`) with the group offsets left on the device, so nothing waits
  for the host; the shared expert and the router share one GEMM over the tokens, and the steps
  between the GEMMs (bias, GELU, gate; putting rows back and summing over choices) run eagerly
  by default: compiled into single kernels (`FUSE_ON_CUDA = True`) they measured slower on the
  H200 (FFN 1.149 vs 0.929 ms, SD3-medium 82.2 vs 72.7 ms; benchmarks/results/moe-gpu.md).
  It trains too (grouped_mm has a backward).

`shared_only` (set while the paper's first training stage runs, never saved) runs the shared
expert alone.

Gates are top_k * softmax over the chosen logits, so with similar logits every chosen
expert gets weight ~1 and the sum of all experts reproduces the dense FFN exactly.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSE_ON_CUDA = False  # True: the grouped path's elementwise steps compiled into single kernels (measured slower)
_fused: dict = {}


def takes_grouped_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Grouped GEMMs where torch runs them as one CUTLASS kernel: CUDA bf16 on Hopper or newer (on
    older GPUs torch loops over the groups with a host sync), with 16-byte aligned rows. Device
    properties, not capability: torch.compile folds them to a constant instead of breaking the graph."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and x.shape[-1] % 8 == 0 and weight.shape[-1] % 8 == 0
            and torch.cuda.get_device_properties(x.device).major >= 9)


def _hidden_epilogue(h: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor, gates: torch.Tensor,
                     order: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(h + the row's expert bias) * the row's gate, rows in expert order."""
    gate = gates.t().reshape(-1).index_select(0, order).unsqueeze(1).to(h.dtype)
    return F.gelu(h + bias.index_select(0, keys.int()), approximate=approximate) * gate


def _combine(y: torch.Tensor, slot: torch.Tensor, top_k: int, shared: torch.Tensor | None) -> torch.Tensor:
    """Each token's chosen experts' rows summed (slots choice-major), plus the shared expert's output."""
    out = y.index_select(0, slot).view(top_k, -1, y.shape[-1]).sum(0)
    return out if shared is None else shared + out


def _run_fused(fn, *args):
    """`fn(*args)`, on CUDA compiled once (dynamic shapes) into one kernel in place of the several
    eager PyTorch launches for it (in the H200 profile of the first grouped path, gpu-checks.md,
    such gathers, elementwise steps and the sum over choices took longer than both grouped GEMMs).
    Inside a caller's own torch.compile, and where compiling fails (warned once), it runs eagerly."""
    if not (FUSE_ON_CUDA and args[0].is_cuda) or torch.compiler.is_compiling():
        return fn(*args)
    compiled = _fused.get(fn)
    if compiled is None:
        compiled = _fused[fn] = torch.compile(fn, dynamic=True)
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001  a missing compiler toolchain must not stop the model
        warnings.warn(f"MoE: compiling {fn.__name__} failed ({type(e).__name__}: {e}); running it eagerly")
        _fused[fn] = fn
        return fn(*args)


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, shared: int, experts: int, expert_size: int, top_k: int,
                 approximate: str = "tanh"):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({experts})")
        self.top_k, self.approximate = top_k, approximate
        self.shared_up = nn.Linear(dim, shared)
        self.shared_down = nn.Linear(shared, dim)  # carries the dense FFN's output bias
        # Stored (in, out) per expert: the layout of both the batched and the grouped matmul.
        self.up_weight = nn.Parameter(torch.zeros(experts, dim, expert_size))
        self.up_bias = nn.Parameter(torch.zeros(experts, 1, expert_size))
        self.down_weight = nn.Parameter(torch.zeros(experts, expert_size, dim))
        self.router = nn.Linear(dim, experts)
        self.track = False  # training / analysis: keep router statistics of the last call
        self.shared_only = False  # the paper's first training stage: the shared expert alone runs
        self.last_probs: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.up_weight.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, chosen expert ids, gates) for tokens x (N, dim)."""
        logits = self.router(x)
        return (logits, *self._choose(logits))

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = logits.topk(self.top_k, dim=-1)
        return idx, self.top_k * top.softmax(dim=-1)

    def _keep_statistics(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        if self.track:  # counts by comparison: bincount would wait for the GPU to learn its size
            self.last_probs = logits.softmax(dim=-1)
            self.last_counts = (idx.reshape(-1, 1) == torch.arange(self.num_experts, device=idx.device)).sum(0)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.shared_only:
            return self.shared_down(F.gelu(self.shared_up(x), approximate=self.approximate)).reshape(shape)
        path = self._forward_grouped if takes_grouped_path(x, self.up_weight) else self._forward_reference
        return path(x).reshape(shape)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared_down(F.gelu(self.shared_up(x), approximate=self.approximate))
        logits, idx, gates = self.route(x)
        self._keep_statistics(logits, idx)
        return out + self._experts(x, idx, gates)

    def _forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        shared_h, logits = self._shared_up_and_logits(x)
        idx, gates = self._choose(logits)
        self._keep_statistics(logits, idx)
        return self._experts_grouped(x, idx, gates, self.shared_down(F.gelu(shared_h, approximate=self.approximate)))

    def _shared_up_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared expert's up-projection and the router's logits from one GEMM over the tokens,
        its width padded to a multiple of 8 (the router alone, 7 columns wide, took a slow unaligned
        kernel on an H200)."""
        shared, experts = self.shared_up.out_features, self.num_experts
        pad = -(shared + experts) % 8
        weight = torch.cat([self.shared_up.weight, self.router.weight, x.new_zeros(pad, x.shape[-1])])
        bias = torch.cat([self.shared_up.bias, self.router.bias, x.new_zeros(pad)])
        both = F.linear(x, weight, bias)
        return both[:, :shared], both[:, shared:shared + experts]

    def _experts_grouped(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
                         shared: torch.Tensor | None = None) -> torch.Tensor:
        """`_experts` (plus `shared`, the shared expert's output, where given) as two grouped GEMMs
        over the (token, choice) pairs sorted by expert.

        Pairs are numbered choice-major (j * tokens + t), so that putting the rows back is one
        Gather and the sum over choices a reduction over the leading axis (in the H200 profile of
        the first grouped path, reducing the middle axis of a token-major layout took 56 us a call,
        and an index_add_ combination with bf16 atomics 0.20 ms). Expert ids are sorted as bytes (one radix pass), the group
        ends are counted by comparison (no bincount, which syncs), and the gate scales the hidden
        activations before the down-projection (half the width of its output)."""
        tokens, experts = x.shape[0], self.num_experts
        keys = idx.t().to(torch.uint8 if experts <= 256 else torch.int32, memory_format=torch.contiguous_format)
        keys = keys.view(-1)  # expert of each pair, choice-major
        ends = (keys.unsqueeze(1) <= torch.arange(experts, device=x.device, dtype=keys.dtype)).sum(0, dtype=torch.int32)
        keys, order = keys.sort(stable=True)
        h = F.grouped_mm(x.index_select(0, order % tokens), self.up_weight, offs=ends)
        h = _run_fused(_hidden_epilogue, h, self.up_bias[:, 0], keys, gates, order, self.approximate)
        y = F.grouped_mm(h, self.down_weight, offs=ends)
        slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        return _run_fused(_combine, y, slot, self.top_k, shared)

    def _experts(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of gate * expert(token), all experts in one batched matmul.

        Each (token, choice) pair gets a row in its expert's slab; slabs are as long as the busiest
        expert's load, so with balanced routing little is padding, and one bmm replaces a loop of
        small per-expert matmuls. Rows move by flat Scatter / Gather along dim 0 (advanced indexing
        would export as GatherND / ScatterND wrapped in copies): at small token counts the graph's
        node count, not its arithmetic, decides latency."""
        tokens, experts, dim = x.shape[0], self.num_experts, x.shape[-1]
        e = idx.reshape(-1)  # pairs in token-major order
        ranks = (e.unsqueeze(1) == torch.arange(experts, device=x.device)).long().cumsum(0)
        load = ranks[-1].max().item()
        torch._check(load >= 0)  # a size to torch.export, which cannot know it before running
        slot = e * load + ranks.gather(1, e.unsqueeze(1)).squeeze(1) - 1  # row in the flat slabs
        # Which token fills each slab row (padding rows read an appended zero row): a scatter of
        # ints, then one row Gather — a row-wise scatter of the activations is far slower in ORT.
        token = torch.arange(tokens, device=x.device).unsqueeze(1).expand(tokens, self.top_k).reshape(-1)
        source = torch.full((experts * load,), tokens, device=x.device).scatter(0, slot, token)
        slab = torch.cat([x, x.new_zeros(1, dim)]).index_select(0, source)
        h = F.gelu(torch.baddbmm(self.up_bias, slab.view(experts, load, dim), self.up_weight),
                   approximate=self.approximate)
        y = torch.bmm(h, self.down_weight).reshape(experts * load, dim).index_select(0, slot)
        return (y * gates.reshape(-1, 1)).view(tokens, self.top_k, dim).sum(1).to(x.dtype)

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer load balancing: E * sum_e (token share of e) * (mean router prob of e)."""
        share = self.last_counts.float() / self.last_counts.sum()
        return self.num_experts * (share * self.last_probs.mean(dim=0)).sum()

    def activated_parameters(self) -> int:
        """FFN parameters one token uses: shared expert, router, top_k routed experts."""
        per_expert = self.up_weight[0].numel() + self.up_bias[0].numel() + self.down_weight[0].numel()
        return sum(p.numel() for p in (*self.shared_up.parameters(), *self.shared_down.parameters(),
                                       *self.router.parameters())) + self.top_k * per_expert
