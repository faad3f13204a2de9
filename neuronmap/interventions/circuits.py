"""Circuit discovery by attribution patching: node and edge scores from one forward and a few backwards.

Activation patching asks "how much of the clean behaviour comes back if I put this activation back into the
corrupted run?", one forward per activation. Attribution patching (Nanda 2023) answers it to first order for
all of them at once: ``score(a) = (a_clean - a_corrupted) . dM/da`` with the gradient taken on the corrupted
run. Edge attribution patching (Syed et al. 2023) does the same per *edge* of the residual graph: node u
writes ``c_u`` into the residual stream, node v reads the residual at its input, and

    score(u -> v) = (c_u,clean - c_u,corrupted) . dM/d(input of v, through v only)

Nodes: ``embed`` (the input to the first block), every attention head (its contribution is its slice of the
output projection's input times that projection), every MLP, and ``logits`` (the final residual). The
gradient "through v only" is ``J_v^T dM/d(out_v)`` — one vector-Jacobian product of v's own output with
respect to the residual tensor it reads (the block input for heads; the residual before the MLP's norm, or
the block input in parallel-attention blocks, for MLPs). Because every reader of the residual is a node, a
node's outgoing edge scores sum to its own score (a check the tests use).

Metric: ``logit[answer] - logit[wrong]`` at the last token, mean over prompt pairs. Pre-norm decoder models
only (`MLP_INPUT`): the contributions must add into the residual stream unnormalised.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ..models.adapter import LayerRef, select_first, select_hidden_input
from ..models.architectures import get_path
from ._common import (Progress, as_prompts, check_batch_size, check_stack, edit_activation, make_batch, run_logits,
                      same_lengths, target_pair, tokenize)
from .components import head_site

# The norm in front of each block's MLP, whose input is the residual the MLP reads. None: parallel block
# (attention and MLP read the block input).
MLP_INPUT = {"gpt2": "ln_2", "gpt_neo": "ln_2", "llama": "post_attention_layernorm",
             "mistral": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
             "gpt_neox": "post_attention_layernorm", "phi": None, "opt": "final_layer_norm"}
_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.|$)")


def short_name(node: str) -> str:
    """``blocks.3.attn.heads.5`` -> ``L3H5``, ``blocks.3.mlp`` -> ``MLP3``; embed, logits unchanged."""
    match = re.match(r"^blocks\.(\d+)\.attn\.heads\.(\d+)$", node)
    if match:
        return f"L{match.group(1)}H{match.group(2)}"
    match = re.match(r"^blocks\.(\d+)\.mlp$", node)
    return f"MLP{match.group(1)}" if match else node


@dataclass
class CircuitResult:
    """Attribution-patching scores of one set of clean / corrupted prompt pairs.

    nodes : list of str
        ``embed``, ``blocks.L.attn.heads.H``, ``blocks.L.mlp``, ``logits`` in execution order.
    node_scores : ndarray of shape (n_nodes,)
        First-order estimate of the metric change when the node's clean value is patched into the corrupted
        run (``logits`` gets the sum of its incoming edges).
    sources, targets : list of str
        Rows and columns of `edge_scores` (sources: every node but logits; targets: every node but embed).
    edge_scores : ndarray of shape (n_sources, n_targets)
        ``score(u -> v)``; NaN where u is not upstream of v.
    """

    nodes: list[str]
    node_scores: np.ndarray
    sources: list[str]
    targets: list[str]
    edge_scores: np.ndarray
    clean_metric: float
    corrupted_metric: float
    n_pairs: int
    answer: list[int]
    wrong: list[int]

    def edges(self, max_edges: int | None = None, min_abs: float = 0.0) -> list[dict[str, Any]]:
        """Valid edges by decreasing |score| (at most `max_edges`, |score| >= `min_abs`)."""
        if max_edges is not None and (isinstance(max_edges, bool) or not isinstance(max_edges, (int, np.integer))
                                      or max_edges < 1):
            raise ConfigError(f"max_edges={max_edges!r} must be an integer >= 1, or None for every edge")
        rows, cols = np.nonzero(np.isfinite(self.edge_scores))
        scores = self.edge_scores[rows, cols]
        order = np.argsort(-np.abs(scores), kind="stable")
        out = []
        for k in order:
            if abs(scores[k]) < min_abs or (max_edges is not None and len(out) >= max_edges):
                break
            out.append({"source": self.sources[rows[k]], "target": self.targets[cols[k]], "score": float(scores[k])})
        return out

    def graph(self, max_edges: int = 50, min_abs: float = 0.0) -> dict[str, Any]:
        """JSON-able graph: nodes (id, label, kind, layer, head, score) and the strongest edges."""
        nodes = []
        for name, score in zip(self.nodes, self.node_scores):
            head = re.match(r"^blocks\.(\d+)\.attn\.heads\.(\d+)$", name)
            mlp = re.match(r"^blocks\.(\d+)\.mlp$", name)
            kind = "head" if head else "mlp" if mlp else name
            layer = int((head or mlp).group(1)) if (head or mlp) else (-1 if name == "embed" else None)
            nodes.append({"id": name, "label": short_name(name), "kind": kind, "layer": layer,
                          "head": int(head.group(2)) if head else None, "score": float(score)})
        last = max((n["layer"] for n in nodes if n["layer"] is not None), default=-1)
        for node in nodes:
            if node["kind"] == "logits":
                node["layer"] = last + 1
        return {"metric": "logit_diff", "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
                "n_pairs": self.n_pairs, "nodes": nodes, "edges": self.edges(max_edges, min_abs)}

    def summary(self) -> dict[str, Any]:
        order = np.argsort(-np.abs(self.node_scores), kind="stable")[:10]
        return {"clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric, "n_pairs": self.n_pairs,
                "n_nodes": len(self.nodes), "n_edges": int(np.isfinite(self.edge_scores).sum()),
                "top_nodes": [{"node": self.nodes[i], "score": float(self.node_scores[i])} for i in order],
                "top_edges": self.edges(10)}


class AttributionPatching:
    """Node and edge attribution patching on a pre-norm decoder model loaded with ``head=True``.

    Parameters
    ----------
    loaded : LoadedModel
    batch_size : int
        Prompt pairs per forward/backward.
    """

    def __init__(self, loaded: Any, batch_size: int = 8) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def attribute(self, inputs: str | Sequence[str], baselines: str | Sequence[str], target: Any,
                  layers: str | Sequence[str] = "blocks.*", progress: Progress | None = None) -> CircuitResult:
        """Score every node and edge of the blocks in `layers`.

        Parameters
        ----------
        inputs : str or list of str
            Clean prompts.
        baselines : str or list of str
            Corrupted prompts, one per clean prompt, each of the same token length as its clean prompt.
        target : (answer, wrong) or list of such pairs (one per prompt)
            Tokens of the logit difference at the last token.
        layers : str or list of str
            Blocks whose heads and MLPs are nodes (``blocks.*``, ``blocks.0-5``).
        """
        check_stack(self.loaded, "attribution patching")
        batch_size = check_batch_size(self.batch_size)
        adapter = self.loaded.adapter
        family = adapter.family
        if family not in MLP_INPUT:
            raise ConfigError(f"attribution patching needs a pre-norm decoder whose heads and MLPs add into the "
                              f"residual stream; family {family!r} is not one of {', '.join(sorted(MLP_INPUT))}")
        if family == "opt" and not getattr(self.loaded.model.config, "do_layer_norm_before", True):
            raise ConfigError("attribution patching needs a pre-norm decoder; this OPT model normalises after each "
                              "block (do_layer_norm_before=False, as OPT-350m does): use another OPT size")
        clean, corrupted = as_prompts(inputs), as_prompts(baselines, "baselines")
        if len(clean) != len(corrupted):
            raise ConfigError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted baselines: give one "
                              "corrupted prompt per clean prompt")
        same_lengths(self.loaded, clean, corrupted, "clean", "corrupted")
        answers, wrongs = self._targets(target, len(clean))
        blocks = sorted({int(m.group(1)) for m in (_BLOCK.match(r.name) for r in adapter.resolve(layers)) if m})
        if not blocks:
            raise ConfigError(f"layers={layers!r} names no block: use blocks.* or a range such as blocks.0-5")
        graph = _Graph(self.loaded, blocks)
        node_sums, edge_sums, metric_sums = 0.0, 0.0, np.zeros(2)
        n = len(clean)
        for start in range(0, n, batch_size):
            rows = list(range(start, min(start + batch_size, n)))
            nodes, edges, metrics = graph.scores(
                [clean[r] for r in rows], [corrupted[r] for r in rows], torch.as_tensor([answers[r] for r in rows]),
                torch.as_tensor([wrongs[r] for r in rows]))
            node_sums, edge_sums, metric_sums = node_sums + nodes, edge_sums + edges, metric_sums + metrics
            if progress is not None:
                progress(rows[-1] + 1, n)
        edge_scores = np.where(graph.valid, edge_sums / n, np.nan)
        node_scores = node_sums / n
        node_scores = np.append(node_scores, np.nansum(edge_scores[:, -1]))  # logits: all it receives
        return CircuitResult(graph.nodes, node_scores, graph.sources, graph.targets, edge_scores,
                             float(metric_sums[0] / n), float(metric_sums[1] / n), n, answers, wrongs)

    def _targets(self, target: Any, n: int) -> tuple[list[int], list[int]]:
        """One (answer, wrong) pair for every prompt, or a list with one pair per prompt."""
        if isinstance(target, (list, tuple)) and target and all(isinstance(t, (list, tuple)) for t in target):
            if len(target) != n:
                raise ConfigError(f"{len(target)} targets for {n} prompt pairs: give one (answer, wrong) pair, or one "
                                  "per prompt")
            pairs = [target_pair(self.loaded, t) for t in target]
        else:
            pairs = [target_pair(self.loaded, target)] * n
        return [a for a, _ in pairs], [w for _, w in pairs]


class _Graph:
    """The node/edge layout of the chosen blocks and the per-batch score computation."""

    def __init__(self, loaded: Any, blocks: list[int]) -> None:
        self.loaded = loaded
        adapter = loaded.adapter
        self.blocks = blocks
        self.sites = {b: head_site(adapter, f"blocks.{b}.attn") for b in blocks}
        self.n_heads = self.sites[blocks[0]].n_heads
        config = loaded.model.config
        rel = MLP_INPUT[adapter.family]
        if adapter.family == "gpt_neox" and getattr(config, "use_parallel_residual", True):
            rel = None
        self.block_refs = {b: adapter.resolve(f"blocks.{b}")[0] for b in range(adapter.n_blocks)}
        self.mlp_refs = {b: adapter.resolve(f"blocks.{b}.mlp")[0] for b in blocks}
        self.parallel = rel is None
        self.mid_refs = {}
        for b in blocks:
            if rel is None:
                continue
            module = get_path(self.block_refs[b].module, rel)
            if module is None:
                raise ConfigError(f"block {self.block_refs[b].module_path} has no {rel} (the norm before its MLP)")
            self.mid_refs[b] = LayerRef(f"blocks.{b}.mid", module, f"{self.block_refs[b].module_path}.{rel}", "input",
                                        select_hidden_input)
        self.input_refs = {b: LayerRef(f"blocks.{b}.input", self.block_refs[b].module, self.block_refs[b].module_path,
                                       "input", select_hidden_input) for b in set(blocks) | {0}}
        self.final_ref = LayerRef("final.input", self.block_refs[adapter.n_blocks - 1].module,
                                  self.block_refs[adapter.n_blocks - 1].module_path, "output", select_first)
        heads = lambda b: [f"blocks.{b}.attn.heads.{h}" for h in range(self.n_heads)]  # noqa: E731
        middle = [name for b in blocks for name in heads(b) + [f"blocks.{b}.mlp"]]
        self.nodes = ["embed"] + middle + ["logits"]
        self.sources = ["embed"] + middle
        self.targets = middle + ["logits"]
        self.valid = np.array([[self._upstream(u, v) for v in self.targets] for u in self.sources])

    @staticmethod
    def _where(node: str) -> tuple[float, int]:
        """(block, stage): stage 0 = attention, 1 = MLP; embed before everything, logits after."""
        if node == "embed":
            return -1, 1
        if node == "logits":
            return float("inf"), 0
        block = int(node.split(".")[1])
        return block, 1 if node.endswith(".mlp") else 0

    def _upstream(self, u: str, v: str) -> bool:
        (bu, su), (bv, sv) = self._where(u), self._where(v)
        if bu != bv:
            return bu < bv
        return (not self.parallel) and su == 0 and sv == 1  # a head feeds its own block's MLP (sequential blocks)

    def _refs(self) -> list[LayerRef]:
        refs = [self.input_refs[b] for b in sorted(self.input_refs)]
        for b in self.blocks:
            refs.append(self.sites[b].ref)
            if b in self.mid_refs:
                refs.append(self.mid_refs[b])
            refs.append(self.mlp_refs[b])
        refs.append(self.final_ref)
        return refs

    def scores(self, clean: list[str], corrupted: list[str], answers: torch.Tensor,
               wrongs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Summed node scores (n_nodes - 1,), edge scores (n_sources, n_targets) and metrics (clean, corrupted)."""
        loaded = self.loaded
        refs = self._refs()
        clean_batch = make_batch(loaded, [tokenize(loaded, p) for p in clean])
        corrupted_batch = make_batch(loaded, [tokenize(loaded, p) for p in corrupted])
        rows = torch.arange(len(clean))

        def metric(logits: torch.Tensor, batch) -> torch.Tensor:
            index = rows.to(logits.device)
            last = logits[index, batch.last.to(logits.device)]
            return last[index, answers.to(last.device)] - last[index, wrongs.to(last.device)]

        with torch.no_grad(), Capture(refs) as capture:
            clean_metric = metric(capture.run(run_logits, loaded, clean_batch), clean_batch).sum()
            clean_acts = dict(capture.outputs)
        with ExitStack() as stack, torch.enable_grad():
            # The graph starts at the first block's input, so no parameter gradient is ever needed.
            stack.enter_context(edit_activation(self.input_refs[0], lambda t: t.detach().requires_grad_(True)))
            capture = stack.enter_context(Capture(refs, detach=False))
            corrupted_metric = metric(capture.run(run_logits, loaded, corrupted_batch), corrupted_batch).sum()
            acts = capture.outputs
            wrt = {"embed": acts["blocks.0.input"], "final": acts["final.input"]}
            for b in self.blocks:
                wrt[f"z{b}"], wrt[f"mlp{b}"] = acts[self.sites[b].ref.name], acts[self.mlp_refs[b].name]
            names = list(wrt)
            grads = dict(zip(names, torch.autograd.grad(corrupted_metric, [wrt[k] for k in names], retain_graph=True)))
            node_scores, deltas, readers = [], [], []
            delta_embed = (clean_acts["blocks.0.input"] - acts["blocks.0.input"].detach()).float()
            node_scores.append(float((delta_embed * grads["embed"]).sum()))
            deltas.append(delta_embed.flatten())
            for b in self.blocks:
                site = self.sites[b]
                z, dz = acts[site.ref.name], clean_acts[site.ref.name] - acts[site.ref.name].detach()
                gz = grads[f"z{b}"]
                shape = (*z.shape[:2], site.n_heads, site.head_dim)
                node_scores.extend((dz * gz).reshape(shape).sum((0, 1, 3)).tolist())
                deltas.extend(self._head_contributions(site, dz))
                read = acts[self.input_refs[b].name] if b in self.input_refs else None
                if read is None:  # a block after the first chosen one that is not in input_refs cannot happen
                    raise RuntimeError(f"missing input of blocks.{b}")
                for h in range(site.n_heads):
                    mask = torch.zeros(site.n_heads, site.head_dim, dtype=gz.dtype, device=gz.device)
                    mask[h] = 1
                    out = (gz.reshape(shape) * mask).reshape(z.shape)
                    readers.append(torch.autograd.grad(z, read, grad_outputs=out, retain_graph=True)[0].flatten())
                mlp = acts[self.mlp_refs[b].name]
                dmlp = clean_acts[self.mlp_refs[b].name] - mlp.detach()
                node_scores.append(float((dmlp * grads[f"mlp{b}"]).sum()))
                deltas.append(dmlp.float().flatten())
                mid = acts[self.mid_refs[b].name] if b in self.mid_refs else read
                readers.append(torch.autograd.grad(mlp, mid, grad_outputs=grads[f"mlp{b}"],
                                                   retain_graph=True)[0].flatten())
            readers.append(grads["final"].flatten())
        delta = torch.stack([d.float() for d in deltas]).double()
        reader = torch.stack([r.float() for r in readers]).double()
        edges = (delta @ reader.T).cpu().numpy()
        return np.asarray(node_scores), edges, np.array([float(clean_metric), float(corrupted_metric.detach())])

    @staticmethod
    def _head_contributions(site: Any, dz: torch.Tensor) -> list[torch.Tensor]:
        """Each head's change of the residual: the output projection of its slice of `dz` (bias cancels)."""
        projection = site.projection
        out = []
        with torch.no_grad():
            zero = projection(torch.zeros_like(dz[:1, :1]))
            for h in range(site.n_heads):
                part = slice(h * site.head_dim, (h + 1) * site.head_dim)
                masked = torch.zeros_like(dz)
                masked[..., part] = dz[..., part]
                out.append((projection(masked) - zero).float().flatten())
        return out
