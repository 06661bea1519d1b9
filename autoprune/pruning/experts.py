"""Mixture-of-experts layers: the experts' neurons as a prunable group.

`transformers` 5 keeps a mixture-of-experts layer's experts in one module with 3-d parameters (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek, GLM-4 MoE, gpt-oss and ~40 more): `gate_up_proj` (every expert's gate and up projections) and
`down_proj`, called with `F.linear` or `@` on one expert's slice at a time. Neither is a layer Torch-Pruning's
dependency graph can cut (they are "unwrapped parameters" to it), so these models pruned their attention heads only,
while the experts hold most of their weights. Written by hand because neither Torch-Pruning nor transformers prunes
them.

A neuron of expert e is one channel of its gate, the same channel of its up projection and one input of its down
projection. The group's channels are every expert's neurons, expert by expert (channel e x I + j is neuron j of
expert e), and a plan removes the same number from each expert (the experts share one tensor, so one width), each
expert its own least important ones (`GroupInfo.blocks`). Two layouts exist: `rows` (Mixtral and most: gate_up
[E, 2I, H], down [E, H, I]) and `cols` (gpt-oss: gate_up [E, H, 2I], down [E, I, H], with biases); the gate and up
halves are either concatenated ([gate | up], `chunk(2)`) or interleaved (gate at even, up at odd channels). Which
one a model uses is not in its parameters: `PrunableModel._find_expert_groups` cuts half of every expert's neurons
under each candidate and keeps the candidate whose cut computes what silencing those neurons (their
down-projection inputs zeroed) computes.

Costs need no model of their own: every token goes through top-k experts whatever the routing, so the MACs of a
layer are tokens x k x 3 x H x I', linear in the neurons each expert keeps, and the cost model's fit of what its
layers do not model (`CostModel._fit_unmodelled`) counts them exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# int attributes an experts module may keep its intermediate size in (follow a cut)
SIZE_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim")


@dataclass(frozen=True)
class Experts:
    """One mixture-of-experts layer's parameter layout: `n` experts of `inter` neurons on `hidden` channels."""

    n: int
    inter: int
    hidden: int
    layout: str  # "rows": gate_up [E, 2I, H], down [E, H, I]; "cols": gate_up [E, H, 2I], down [E, I, H]
    interleaved: bool  # gate and up channels alternate (else [gate | up])

    @staticmethod
    def candidates(module: nn.Module) -> list["Experts"]:
        """The layouts `module`'s parameters allow (none when it is not an experts module)."""
        gu, dn = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
                and gu.shape[0] == dn.shape[0] and gu.shape[0] > 0):
            return []
        out = []
        e = gu.shape[0]
        if gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1] and dn.shape[2] > 1:
            out += [Experts(e, dn.shape[2], dn.shape[1], "rows", il) for il in (False, True)]
        if gu.shape[2] == 2 * dn.shape[1] and gu.shape[1] == dn.shape[2] and dn.shape[1] > 1 \
                and gu.shape[1] != gu.shape[2]:  # (square: the rows layout already covers it)
            out += [Experts(e, dn.shape[1], dn.shape[2], "cols", il) for il in (False, True)]
        return out

    def _gate_up(self, keep: torch.Tensor) -> torch.Tensor:
        """[E, 2 x kept] gate/up channel indices of the kept neurons `keep` [E, kept], in the layer's order."""
        if self.interleaved:
            return torch.stack((2 * keep, 2 * keep + 1), dim=-1).reshape(keep.shape[0], -1)
        return torch.cat((keep, keep + self.inter), dim=1)

    def keep_of(self, removed: list[int]) -> torch.Tensor:
        """[E, kept] neurons each expert keeps when the group loses flat channels `removed` (as many per expert)."""
        gone = torch.zeros(self.n * self.inter, dtype=torch.bool)
        gone[torch.as_tensor(list(removed), dtype=torch.long)] = True
        gone = gone.reshape(self.n, self.inter)
        kept = int((~gone[0]).sum())
        if not bool(((~gone).sum(1) == kept).all()):
            raise ValueError("an experts' cut must remove as many neurons from every expert")
        return torch.nonzero(~gone)[:, 1].reshape(self.n, kept)

    def cut(self, module: nn.Module, removed: list[int]) -> None:
        """Remove neurons `removed` (flat channels) from `module`, in place: new parameters of the kept slices."""
        keep = self.keep_of(removed)
        gu_idx = self._gate_up(keep)
        with torch.no_grad():
            for name, t in list(module._parameters.items()):
                if t is None:
                    continue
                if name == "gate_up_proj":
                    dim = 1 if self.layout == "rows" else 2
                    new = _take(t, dim, gu_idx)
                elif name == "down_proj":
                    dim = 2 if self.layout == "rows" else 1
                    new = _take(t, dim, keep)
                elif name == "gate_up_proj_bias" and t.dim() == 2 and t.shape[1] == 2 * self.inter:
                    new = _take(t, 1, gu_idx)
                else:
                    continue
                module._parameters[name] = nn.Parameter(new.contiguous(), requires_grad=t.requires_grad)
        for a in SIZE_ATTRIBUTES:
            if module.__dict__.get(a) == self.inter:
                module.__dict__[a] = int(keep.shape[1])

    def silence(self, module: nn.Module, removed: list[int]) -> None:
        """Zero the down-projection inputs of neurons `removed`, in place (what a right cut must compute)."""
        gone = torch.as_tensor(list(removed), dtype=torch.long)
        e, j = gone // self.inter, gone % self.inter
        with torch.no_grad():
            dn = module._parameters["down_proj"]
            if self.layout == "rows":
                dn[e, :, j] = 0
            else:
                dn[e, j, :] = 0

    def scores(self, module: nn.Module, criterion: str) -> torch.Tensor:
        """One score per flat channel: the magnitude of the neuron's gate and up channels and down input (L1 for
        the l1 criterion, random for random, L2 for any other: the experts have no Torch-Pruning group for the
        others)."""
        if criterion == "random":  # (drawn from torch's generator, which `PrunableModel.scores` seeds)
            return torch.rand(self.n * self.inter)
        gu = module._parameters["gate_up_proj"].detach().float()
        dn = module._parameters["down_proj"].detach().float()
        p = 1 if criterion == "l1" else 2
        if self.layout == "rows":
            gu_n = gu.abs().pow(p).sum(2)  # [E, 2I]
            dn_n = dn.abs().pow(p).sum(1)  # [E, I]
        else:
            gu_n = gu.abs().pow(p).sum(1)
            dn_n = dn.abs().pow(p).sum(2)
        if self.interleaved:
            g_n, u_n = gu_n[:, 0::2], gu_n[:, 1::2]
        else:
            g_n, u_n = gu_n[:, : self.inter], gu_n[:, self.inter:]
        return (g_n + u_n + dn_n).pow(1.0 / p).reshape(-1)


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """`t` [E, ...] with, for each expert e, the slices `idx[e]` along `dim` (per-expert index lists)."""
    shape = list(t.shape)
    shape[dim] = idx.shape[1]
    view = [idx.shape[0], 1, 1][: t.dim()]
    view[dim] = idx.shape[1]
    return torch.gather(t, dim, idx.to(t.device).reshape(view).expand(shape))


def find_experts(model: nn.Module, ignored: set[str]) -> dict[str, list[Experts]]:
    """Modules of `model` that hold experts' 3-d `gate_up_proj` / `down_proj`, with their candidate layouts."""
    out = {}
    for name, m in model.named_modules():
        if name and name not in ignored:
            cands = Experts.candidates(m)
            if cands:
                out[name] = cands
    return out
