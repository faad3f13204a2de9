"""Head scores and circuit discovery find the planted heads of a hand-built induction model."""

import numpy as np
import pytest
import torch
from handbuilt_induction import A, B, COPY, hooks_left

from neuronmap.errors import ConfigError
from neuronmap.interventions import AttributionPatching, HeadStatistics, repeated_tokens

HEAD_A, HEAD_B = f"blocks.{A[0]}.attn.heads.{A[1]}", f"blocks.{B[0]}.attn.heads.{B[1]}"
CLEAN = "a b c d e f g h a b c d"  # the induction head predicts "e"
CORRUPT = "a b c p e f g h a b c d"  # "d" never occurred before: nothing to copy


def test_head_scores_find_the_planted_heads(induction):
    result = HeadStatistics(induction).attribute(seq_len=8, n_sequences=4, importance="zero")
    assert result.layers == ["blocks.0", "blocks.1"] and result.n_heads == 2
    assert np.unravel_index(np.argmax(result.prev_token), result.prev_token.shape) == A
    assert np.unravel_index(np.argmax(result.induction), result.induction.shape) == B
    assert result.prev_token[A] > 0.99 and result.induction[B] > 0.9
    assert result.prev_token[B] < 0.2 and result.induction[A] < 0.01
    # the zero-weight heads attend uniformly: entropy of a uniform causal prefix, the maximum
    assert result.entropy[A] < 1e-3 and result.entropy[0, 0] > result.entropy[B] > result.entropy[A]
    # only the two circuit heads matter for the loss on the repeated half; the others write nothing
    assert result.importance[A] > 1 and result.importance[B] > 1
    assert result.importance[0, 0] == 0 and result.importance[1, 1] == 0
    assert {row["head"] for row in result.top("importance", 2)} == {HEAD_A, HEAD_B}
    assert hooks_left(induction.model) == 0


def test_circuit_discovery_finds_the_edge_from_the_previous_token_head_to_the_induction_head(induction):
    result = AttributionPatching(induction).attribute(CLEAN, baselines=CORRUPT, target=("e", "p"))
    assert result.clean_metric == pytest.approx(COPY, abs=1e-3) and abs(result.corrupted_metric) < 1e-3
    top = [(e["source"], e["target"]) for e in result.edges(3)]
    assert (HEAD_A, HEAD_B) in top and (HEAD_B, "logits") in top
    # hand calculation: B's key at the "e" position moves by SHARP (=30) logits, B attends uniformly over 12
    # positions in the corrupted run, each copying COPY (=10): 30 * 10 / 12 = 25
    edge = result.edge_scores[result.sources.index(HEAD_A), result.targets.index(HEAD_B)]
    assert edge == pytest.approx(25.0, rel=1e-4)
    # every reader of the residual stream is a node, so outgoing edges sum to the node's score
    valid = np.where(np.isfinite(result.edge_scores), result.edge_scores, 0.0)
    np.testing.assert_allclose(valid.sum(axis=1), result.node_scores[:-1], rtol=1e-5, atol=1e-6)
    # a later node never feeds an earlier one
    assert np.isnan(result.edge_scores[result.sources.index(HEAD_B), result.targets.index(HEAD_A)])
    graph = result.graph(max_edges=5)
    assert {n["id"] for n in graph["nodes"]} == set(result.nodes) and len(graph["edges"]) == 5
    labels = {n["id"]: n["label"] for n in graph["nodes"]}
    assert labels[HEAD_A] == "L0H1" and labels["blocks.1.mlp"] == "MLP1"
    assert hooks_left(induction.model) == 0


def test_edge_scores_sum_to_node_scores_on_a_random_model(tiny_model):
    """The same identity on a random GPT-2, a parallel-residual GPT-NeoX and an OPT (its MLP is two bare
    Linear layers in the block), over two pairs in two batches."""
    for family in ("gpt2", "gpt_neox", "opt"):
        loaded = tiny_model(family, head=True)
        result = AttributionPatching(loaded, batch_size=1).attribute(
            ["a b c d e", "a b c d f"], baselines=["a b the d e", "a b the d f"], target=[(10, 11), (12, 13)])
        valid = np.where(np.isfinite(result.edge_scores), result.edge_scores, 0.0)
        np.testing.assert_allclose(valid.sum(axis=1), result.node_scores[:-1], rtol=1e-4, atol=1e-7)
        assert np.abs(result.node_scores).max() > 0
        parallel = family == "gpt_neox"
        feeds_own_mlp = result.edge_scores[result.sources.index("blocks.0.attn.heads.0"),
                                           result.targets.index("blocks.0.mlp")]
        assert np.isnan(feeds_own_mlp) == parallel
        assert hooks_left(loaded.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_mlp_node_score_is_the_directional_derivative_of_the_metric(tiny_model, family):
    """An MLP's node score, (a_clean - a_corrupted) . dM/da at the corrupted run, against a central
    finite difference of the logit difference with the MLP output moved along that delta (a float64
    model; the logits come back as float32, so the step is not tiny).
    OPT's MLP output is flat (batch * seq, d) rows: its gradient must reach the kept view."""
    from neuronmap.interventions._common import edit_activation, make_batch, run_logits, tokenize

    loaded = tiny_model(family, head=True)
    loaded.model.double()
    try:
        clean, corrupted, answer, wrong = "a b c d e", "a b the d e", 10, 11
        result = AttributionPatching(loaded, batch_size=1).attribute(clean, baselines=corrupted, target=(answer, wrong),
                                                                     layers="blocks.1")
        ref = loaded.adapter.resolve("blocks.1.mlp")[0]
        from neuronmap.capture import Capture

        batches = {text: make_batch(loaded, [tokenize(loaded, text)]) for text in (clean, corrupted)}
        with torch.no_grad(), Capture([ref]) as capture:
            capture.run(run_logits, loaded, batches[clean])
            delta = capture.outputs[ref.name].clone()
            capture.run(run_logits, loaded, batches[corrupted])
            delta -= capture.outputs[ref.name]

        def metric(eps: float) -> float:
            with torch.no_grad(), edit_activation(ref, lambda t: t + eps * delta):
                last = run_logits(loaded, batches[corrupted])[0, -1]
            return float(last[answer] - last[wrong])

        eps = 1e-2
        expected = (metric(eps) - metric(-eps)) / (2 * eps)
        got = result.node_scores[result.nodes.index("blocks.1.mlp")]
        assert abs(expected) > 1e-6
        np.testing.assert_allclose(got, expected, rtol=1e-3)
    finally:
        loaded.model.float()


def test_head_statistics_match_the_models_own_attention_weights(tiny_model):
    """Entropy, previous-token and induction scores recomputed from output_attentions (eager GPT-2)."""
    loaded = tiny_model("gpt2", head=True, attn_implementation="eager")
    result = HeadStatistics(loaded, batch_size=3).attribute(seq_len=5, n_sequences=4, seed=3)
    batch, offset = repeated_tokens(loaded, 5, 4, seed=3)
    assert offset == 1 and batch.ids.shape == (4, 11) and (batch.ids[:, 1:6] == batch.ids[:, 6:]).all()
    with torch.no_grad():
        attentions = loaded.model(input_ids=batch.ids, output_attentions=True).attentions
    for layer, p in enumerate(attentions):
        p = p.double()
        ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)[:, :, 1:].mean((0, 2))
        prev = torch.stack([p[:, :, q, q - 1] for q in range(1, 11)], -1).mean((0, 2))
        ind = torch.stack([p[:, :, q, q - 4] for q in range(6, 11)], -1).mean((0, 2))
        np.testing.assert_allclose(result.entropy[layer], ent.numpy(), atol=1e-6)
        np.testing.assert_allclose(result.prev_token[layer], prev.numpy(), atol=1e-6)
        np.testing.assert_allclose(result.induction[layer], ind.numpy(), atol=1e-6)


def test_bad_input(induction, tiny_model):
    with pytest.raises(ConfigError, match="clean prompt .* has 12 tokens but corrupted prompt .* has 11"):
        AttributionPatching(induction).attribute(CLEAN, baselines="a b c e f g h a b c d", target=("e", "p"))
    with pytest.raises(ConfigError, match="not one token"):
        AttributionPatching(induction).attribute(CLEAN, baselines=CORRUPT, target=("e f", "p"))
    with pytest.raises(ConfigError, match="family 'bert'"):
        AttributionPatching(tiny_model("bert", head=True)).attribute("a b", baselines="a c", target=(5, 6))
    with pytest.raises(ConfigError, match="exceeds the model's 48 positions"):
        HeadStatistics(induction).attribute(seq_len=30)
    with pytest.raises(ConfigError, match="importance=None"):
        HeadStatistics(tiny_model("bert", head=True)).attribute(seq_len=4, n_sequences=1, importance="zero")
    with pytest.raises(ConfigError, match="importance='nosuch' must be 'zero', 'mean' or None"):
        HeadStatistics(induction).attribute(seq_len=4, n_sequences=1, importance="nosuch")
    with pytest.raises(ConfigError, match="same token 'e'"):
        AttributionPatching(induction).attribute(CLEAN, baselines=CORRUPT, target=("e", "e"))
    result = AttributionPatching(induction).attribute(CLEAN, baselines=CORRUPT, target=("e", "p"))
    for bad in (-1, 0, 2.5):
        with pytest.raises(ConfigError, match=f"max_edges={bad!r} must be an integer >= 1"):
            result.graph(max_edges=bad)
    assert len(result.edges(None)) == np.isfinite(result.edge_scores).sum()
    assert hooks_left(induction.model) == 0


def test_no_hook_left_after_a_failing_backward(induction, monkeypatch):
    calls, forward = [], induction.model.lm_head.forward

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the corrupted forward, with the gradient graph and every hook in place
            raise RuntimeError("head failed")
        return forward(*args, **kwargs)

    monkeypatch.setattr(induction.model.lm_head, "forward", boom)
    with pytest.raises(RuntimeError, match="head failed"):
        AttributionPatching(induction).attribute(CLEAN, baselines=CORRUPT, target=("e", "p"))
    assert hooks_left(induction.model) == 0
    calls.clear()
    with pytest.raises(RuntimeError, match="head failed"):
        HeadStatistics(induction).attribute(seq_len=4, n_sequences=2, importance="zero")
    assert hooks_left(induction.model) == 0
