"""Edges (relp.edges): the graph, edge attribution against exact edge patching and transformer_lens, the
identities that tie edge scores to node scores, the edge-replacement engine, edge circuits and their
evaluation.

Oracles:
* a model that is linear in every edge (norms made affine by an epsilon that dwarfs the variance, GELU
  held in its linear region, queries zeroed so that every attention pattern is uniform): there AtP and
  RelP of every edge must equal exact edge patching;
* transformer_lens.tools.analysis.attribution_patching.attribution_patch (edge granularity, plain
  gradients; multi-head attention only): the same edge AtP, written independently;
* node-level AtP/RelP (relp.attribution_patching / relevance_patching): a sender's outgoing edge scores
  sum to its node score; the edges crossing the stream at layer l sum to resid_pre's score there;
* hand-made interventions (a replaced value vector at hook_v, a shifted final stream) for single edges;
* plain runs of the clean and corrupted prompts for the full and the empty edge circuit.
"""

from __future__ import annotations

import pytest
import torch

import relp
from _prompt_pairs import changed_at_2_and_4
from relp.edges import (
    EdgeCircuit,
    EdgeCircuitEvaluator,
    EdgeGraph,
    edge_attribution,
    edge_cpr_cmd,
    edge_patching,
    edge_random_baseline,
    prune,
    run_edges,
    select_edges,
    sender_values,
)
from relp.testing import tiny_model


# ----------------------------------------------------------------------------------------------
# Graph


def test_graph_counts_match_a_hand_count():
    """2 layers, 4 heads. Layer 0's 12 q/k/v receivers read only the input; its MLP the input and the 4
    heads (5); layer 1's q/k/v read input, 4 heads, m0 (6 each, 72); its MLP 6 + 4 = 10; the logits all
    11 senders: 12 + 5 + 72 + 10 + 11 = 110. With 2 key/value heads there are 8 q/k/v receivers a layer:
    8 + 5 + 48 + 10 + 11 = 82. Parallel blocks: the MLPs lose their own layer's heads: 110 - 8 = 102."""
    assert EdgeGraph(2, 4).n_edges == 110
    assert EdgeGraph(2, 4, 2).n_edges == 82
    assert EdgeGraph(2, 4, parallel_attn_mlp=True).n_edges == 102
    graph = EdgeGraph(2, 4, 2)
    assert graph.senders[:6] == ("input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0")
    assert [r.name for r in graph.receivers[:9]] == [
        "a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0",
    ]
    assert graph.receivers[-1].name == "logits"
    names = graph.edge_names()
    assert len(names) == len(set(names)) == 82
    assert "a0.h3->m0" in names and "m1->logits" in names and "a1.h0->m0" not in names
    assert graph.edge_index("m0->a1.h1<v>") == (5, graph.receiver_index["a1.h1<v>"])


def test_graph_refuses_bad_names_and_post_ln_models():
    graph = EdgeGraph(2, 4)
    with pytest.raises(ValueError, match="not an edge"):
        graph.edge_index("m1->a0.h0<q>")
    with pytest.raises(ValueError, match="unknown edge"):
        graph.edge_index("a9.h0->logits")
    with pytest.raises(ValueError, match="must divide"):
        EdgeGraph(2, 4, 3)
    with pytest.raises(ValueError, match="post-LN"):
        EdgeGraph.from_model(tiny_model("bert"))


# ----------------------------------------------------------------------------------------------
# A model linear in every edge


def _linear_model(architecture: str):
    """A float64 tiny model in which every edge acts linearly on the metric (see the module docstring).

    Norms: epsilon 1e12 and weights 1e6, so norm(x) = (x - mean) (LayerNorm) or x (RMSNorm) up to
    var/eps ~ 1e-12. GPT-2's MLP input bias is raised by 100: GELU(100 + t) = 100 + t to float64
    precision. Llama's gated MLP (a product) is switched off (output projection zero). Queries are zero,
    so every score is 0 and every pattern uniform: keys do nothing, values act linearly."""
    model = tiny_model(architecture, dtype=torch.float64, n_layers=2)
    with torch.no_grad():
        norms = [model.ln_final] + [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks]
        for bridge in norms:
            module = bridge.original_component
            setattr(module, "eps" if hasattr(module, "eps") else "variance_epsilon", 1e12)
            module.weight.mul_(1e6)
            bridge.config.eps = 1e12
        for block in model.blocks:
            for parameter in block.attn.q.original_component.parameters():
                parameter.zero_()
            if architecture == "gpt2":
                block.mlp.original_component.c_fc.bias.add_(100.0)
                block.attn.original_component.c_attn.weight[:, : model.cfg.d_model] = 0
                block.attn.original_component.c_attn.bias[: model.cfg.d_model] = 0
            else:
                block.mlp.original_component.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["atp", "two_point", "ig_inputs"])
def test_edge_scores_equal_exact_edge_patching_on_a_linear_model(architecture, method):
    """(RelP is not run here: on this model its rules change nothing, and relp refuses rules that are not
    live. Its edge scores are tied to node-level RelP by test_edge_sums_equal_node_scores.)"""
    model = _linear_model(architecture)
    clean, corrupted, small = changed_at_2_and_4(model)
    metric = lambda logits: 1e4 * small(logits)  # noqa: E731 (random weights are small: an O(1) metric)
    pattern = relp.interventions.cache_activations(model, clean, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
    causal = torch.tril(torch.ones(7, 7, dtype=torch.float64)) / torch.arange(1, 8, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(pattern[0, 0].double(), causal)  # the precondition: uniform attention
    exact = edge_patching(model, clean, corrupted, metric)
    estimate = edge_attribution(model, clean, corrupted, metric, method=method, steps=2)
    assert exact.flat().abs().max() > 1e-2  # the edges do move the metric
    # gpt2: float64 throughout, var/eps ~ 1e-12 relative; HF's LlamaRMSNorm computes in float32
    atol = 1e-9 if architecture == "gpt2" else 1e-5
    torch.testing.assert_close(estimate.flat().double(), exact.flat(), rtol=1e-6, atol=atol)
    # ...and per position: each edge at each position patched alone
    exact_positions = edge_patching(model, clean, corrupted, metric, per_position=True, edges=["input->logits", "a0.h1->m1"])
    per_position = edge_attribution(model, clean, corrupted, metric, method=method, per_position=True, steps=2)
    for name in ["input->logits", "a0.h1->m1"]:
        s, r = exact.graph.edge_index(name)
        torch.testing.assert_close(per_position.scores[:, s, r].double(), exact_positions.scores[:, s, r], rtol=1e-6, atol=atol)


def test_attribution_is_only_an_estimate_on_a_real_nonlinear_model():
    model = tiny_model("gpt2", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    exact = edge_patching(model, clean, corrupted, metric)
    atp = edge_attribution(model, clean, corrupted, metric, method="atp")
    assert not torch.allclose(atp.flat().double(), exact.flat(), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Against transformer_lens and node-level scores


def test_edge_atp_equals_transformer_lens_edge_attribution():
    """transformer_lens 4.x scores each prompt pair with its own metric and averages over pairs, per
    position; relp's metric is the batch mean, summed over positions: the same numbers."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    model = tiny_model("gpt2", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model, n_prompts=2)
    answer, wrong = metric.answer, metric.wrong
    ours = edge_attribution(model, clean, corrupted, metric, method="atp")
    theirs = attribution_patch(
        model, clean, corrupted, lambda logits: (logits[..., -1, answer[0]] - logits[..., -1, wrong[0]]).sum(),
        EdgeAttributionConfig(granularity="edge"),
    ) if bool((answer == answer[0]).all() and (wrong == wrong[0]).all()) else None
    if theirs is None:  # per-pair answers: score each pair with its own metric, as transformer_lens does
        expected = torch.zeros_like(ours.scores, dtype=torch.float64)
        for i in range(2):
            result = attribution_patch(
                model, clean[i : i + 1], corrupted[i : i + 1],
                lambda logits, i=i: (logits[..., -1, answer[i]] - logits[..., -1, wrong[i]]).sum(),
                EdgeAttributionConfig(granularity="edge"),
            )
            expected += _tl_matrix(ours.graph, result.edge_scores) / 2
    else:
        expected = _tl_matrix(ours.graph, theirs.edge_scores)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(ours.scores.double(), expected, rtol=1e-9, atol=1e-12)


def _tl_matrix(graph: EdgeGraph, edge_scores) -> torch.Tensor:
    """transformer_lens's per-position (writer, reader) scores summed over positions, on relp's [sender, receiver]."""
    out = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    for (writer, reader), value in edge_scores.items():
        sender = {"embed": "input", "attn_head_out": f"a{writer.layer}.h{writer.head}", "mlp_out": f"m{writer.layer}"}[writer.kind]
        receiver = {
            "q_input": f"a{reader.layer}.h{reader.head}<q>", "k_input": f"a{reader.layer}.h{reader.head}<k>",
            "v_input": f"a{reader.layer}.h{reader.head}<v>", "mlp_in": f"m{reader.layer}", "logits": "logits",
        }[reader.kind]
        out[graph.sender_index[sender], graph.receiver_index[receiver]] += value
    return out


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["atp", "relp", "gim"])
def test_edge_sums_equal_node_scores(architecture, method):
    """Outgoing edges of a sender sum to its node score (mlp_out, head); the edges from senders before
    layer l into receivers at or after l sum to resid_pre's score at l; the logits' incoming edges to the
    last resid_post's score."""
    model = tiny_model(architecture)
    clean, corrupted, metric = changed_at_2_and_4(model)
    edges = edge_attribution(model, clean, corrupted, metric, method=method)
    node_method = relp.methods.get_method(method)  # gim: relevance patching with the GIM rules (attnlrp scales q, k, v)
    nodes = node_method(model, clean, corrupted, metric, ["mlp_out", "head", "resid_pre", "resid_post"])
    graph, summed = edges.graph, edges.scores.double()
    totals = edges.sender_totals()
    for layer in range(2):
        assert totals[f"m{layer}"] == pytest.approx(nodes["mlp_out"][layer].sum().item(), rel=1e-4, abs=1e-7)
        for head in range(4):
            assert totals[f"a{layer}.h{head}"] == pytest.approx(nodes["head"][layer, head].sum().item(), rel=1e-4, abs=1e-7)
        before = graph.sender_layer < layer
        after = torch.tensor([r.layer >= layer for r in graph.receivers])
        crossing = summed[before][:, after].sum().item()
        assert crossing == pytest.approx(nodes["resid_pre"][layer].sum().item(), rel=1e-4, abs=1e-7)
    assert edges.receiver_totals()["logits"] == pytest.approx(nodes["resid_post"][1].sum().item(), rel=1e-4, abs=1e-7)
    assert abs(nodes["mlp_out"]).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Exact edge patching against hand-made interventions


def test_edge_patching_of_a_value_edge_equals_a_hand_patch_under_grouped_query_attention():
    """m0 -> a1.h1<v> on a model with 2 key/value heads for 4 query heads: the value vector of key/value
    head 1 recomputed from the corrupted stream plus m0's clean-minus-corrupted output, put in place at
    hook_v by hand (heads 2 and 3 share it)."""
    model = tiny_model("llama", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    graph = EdgeGraph.from_model(model)
    exact = edge_patching(model, clean, corrupted, metric, edges=["m0->a1.h1<v>"])
    names = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    clean_cache = relp.interventions.cache_activations(model, clean, names)
    corrupted_cache = relp.interventions.cache_activations(model, corrupted, names)
    stream = corrupted_cache["blocks.1.hook_resid_pre"] + clean_cache["blocks.0.hook_mlp_out"] - corrupted_cache["blocks.0.hook_mlp_out"]
    block = model.blocks[1]
    normed = block.ln1.original_component(stream)
    value = block.attn.v.original_component(normed).reshape(*stream.shape[:2], 2, -1)

    def patch(v, hook):
        v = v.clone()
        v[:, :, 1] = value[:, :, 1]
        return v

    with torch.no_grad():
        base = metric(model(corrupted)).item()
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_v", patch)]):
            patched = metric(model(corrupted)).item()
    s, r = graph.edge_index("m0->a1.h1<v>")
    assert exact.scores[s, r].item() == pytest.approx(patched - base, rel=1e-9, abs=1e-12)
    assert abs(patched - base) > 1e-6
    assert torch.isnan(exact.flat()).sum() == graph.n_edges - 1  # edges not asked for are NaN


def test_edge_patching_into_the_logits_shifts_only_the_final_stream():
    model = tiny_model("gpt2", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    exact = edge_patching(model, clean, corrupted, metric, edges=["a0.h2->logits"], direction="noising")
    names = ["blocks.0.attn.hook_z"]
    z_clean = relp.interventions.cache_activations(model, clean, names)[names[0]]
    z_corrupted = relp.interventions.cache_activations(model, corrupted, names)[names[0]]
    shift = torch.einsum("bpe,ed->bpd", z_corrupted[:, :, 2] - z_clean[:, :, 2], model.blocks[0].attn.W_O[2])
    with torch.no_grad():
        base = metric(model(clean)).item()
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x + shift)]):
            patched = metric(model(clean)).item()
    s, r = exact.graph.edge_index("a0.h2->logits")
    assert exact.scores[s, r].item() == pytest.approx(patched - base, rel=1e-9, abs=1e-12)


def test_split_inputs_are_restored_also_after_an_error():
    model = tiny_model("gpt2")
    clean, corrupted, _ = changed_at_2_and_4(model)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        edge_patching(model, clean, corrupted, broken, edges=["input->logits"])
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result and not model.cfg.use_hook_mlp_in
    assert all(not hook_point._forward_hooks for hook_point in model.hook_dict.values())


# ----------------------------------------------------------------------------------------------
# Circuits


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_full_and_empty_edge_circuits_are_the_clean_and_the_corrupted_run(architecture):
    model = tiny_model(architecture, dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    scores = edge_attribution(model, clean, corrupted, metric, method="atp")
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, metric)
    template = select_edges(scores, count=0)
    full, empty = evaluator.values([template.full(), template.empty()]).tolist()
    with torch.no_grad():
        assert full == pytest.approx(metric(model(clean)).item(), rel=1e-10, abs=1e-12)
        assert empty == pytest.approx(metric(model(corrupted)).item(), rel=1e-10, abs=1e-12)
    result = evaluator.evaluate(select_edges(scores, percent=20))
    assert result.n_nodes == int(0.2 * scores.graph.n_edges)
    assert result.full == full and result.empty == empty


def test_edge_circuit_values_equal_transformer_lens_faithfulness():
    """transformer_lens ablates the edges outside a per-position circuit on one prompt pair; relp's
    engine must give the same metric (recovered fraction) for the same random circuit."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch, faithfulness

    model = tiny_model("gpt2", dtype=torch.float64)
    clean, corrupted, _ = changed_at_2_and_4(model, n_prompts=1)
    tl_metric = lambda logits: logits[..., -1, 10].sum() - logits[..., -1, 11].sum()  # noqa: E731
    metric = relp.LogitDiff(torch.tensor([10]), torch.tensor([11]))
    tl_edges = list(attribution_patch(model, clean, corrupted, tl_metric, EdgeAttributionConfig(granularity="edge")).edge_scores)
    keep = [edge for i, edge in enumerate(tl_edges) if (i * 7919) % 3 == 0]
    theirs = faithfulness(model, clean, corrupted, tl_metric, keep)
    graph = EdgeGraph.from_model(model)
    mask = torch.zeros(7, *graph.allowed.shape, dtype=torch.bool)
    for writer, reader in keep:
        one = _tl_matrix(graph, {(writer, reader): 1.0}).bool()
        mask[writer.position] |= one
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, metric)
    value = evaluator.values([EdgeCircuit(graph, mask)])[0].item()
    recovered = (value - theirs.corrupt_metric) / (theirs.full_metric - theirs.corrupt_metric)
    assert recovered == pytest.approx(theirs.recovered, rel=1e-8, abs=1e-10)
    assert 0.01 < abs(theirs.recovered - 1) and mask.sum() == len(keep)


def test_every_ablation_runs_and_mean_ablation_of_one_prompt_is_its_own_value():
    model = tiny_model("llama", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    scores = edge_attribution(model, clean, corrupted, metric, method="relp")
    circuit = select_edges(scores, percent=30, absolute=True)
    for ablation in ("corrupt", "mean", "mean_positional", "zero"):
        result = EdgeCircuitEvaluator(model, clean, corrupted, metric, ablation=ablation).evaluate(circuit)
        assert result.full != result.empty
    # positional mean over one reference prompt equal to every clean prompt = the clean run itself
    same = clean[:1].repeat(3, 1)
    evaluator = EdgeCircuitEvaluator(model, same, corrupted, metric, ablation="mean_positional", reference=same[:1])
    empty, full = evaluator.values([circuit.empty(), circuit.full()]).tolist()
    assert empty == pytest.approx(full, rel=1e-10)


def test_curves_and_random_baseline_cover_the_edge_space():
    model = tiny_model("gpt2")
    clean, corrupted, metric = changed_at_2_and_4(model)
    scores = edge_attribution(model, clean, corrupted, metric, method="relp")
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, metric)
    summary = edge_cpr_cmd(evaluator, scores)
    assert summary.signed.n_total == scores.graph.n_edges
    assert summary.signed.faithfulness[-1] == pytest.approx(1.0)  # k = 100%: every edge
    assert summary.signed.n_nodes[-1] == scores.graph.n_edges
    baseline = edge_random_baseline(evaluator, scores, seeds=2)
    assert len(baseline.curves) == 2 and baseline.curves[0].faithfulness[-1] == pytest.approx(1.0)


def test_selection_counts_threshold_and_greedy():
    graph = EdgeGraph(2, 4)
    values = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    flat = torch.linspace(-1, 1, graph.n_edges, dtype=torch.float64)
    values[graph.allowed] = flat
    scores = relp.edges.EdgeScores(graph, values, method="atp")
    assert select_edges(scores, count=7).n_edges == 7
    assert select_edges(scores, percent=10).n_edges == 11  # int(0.1 * 110)
    assert select_edges(scores, threshold=0.5).n_edges == int((flat >= 0.5).sum())
    top = select_edges(scores, count=3)
    assert set(top.edge_names()) == {graph.edge_names()[i] for i in (107, 108, 109)}
    absolute = select_edges(scores, count=2, absolute=True)
    assert set(absolute.edge_names()) == {graph.edge_names()[0], graph.edge_names()[109]}
    # a strong edge into a head that sends nothing strong: top-n takes it, greedy cannot reach it
    values[graph.edge_index("input->a1.h0<q>")] = 10.0
    values[graph.edge_index("a1.h0->logits")] = values[graph.edge_index("a1.h0->m1")] = -10.0
    scores = relp.edges.EdgeScores(graph, values, method="atp")
    greedy = select_edges(scores, count=30, greedy=True)
    # every edge of a greedy circuit feeds the logits or a node that sends an edge of the circuit
    assert greedy.n_edges == 30
    chosen = greedy.edge_names()
    senders = {name.split("->")[0] for name in chosen}
    for name in chosen:
        receiver = graph.parse_receiver(name.split("->")[1])
        assert receiver.kind == "logits" or receiver.node in senders, name
    assert "input->a1.h0<q>" in select_edges(scores, count=30).edge_names()
    assert "input->a1.h0<q>" not in chosen
    with pytest.raises(ValueError, match="exactly one"):
        select_edges(scores, count=3, percent=5)
    with pytest.raises(ValueError, match="count must be"):
        select_edges(scores, count=111)


def test_pruning_keeps_only_paths_from_the_input_to_the_logits():
    """Hand-made: input -> a0.h1<q> -> (a0.h1 -> m0) -> (m0 -> logits) is a path; a0.h2 -> logits has no
    edge into a0.h2 (dropped); input -> a1.h0<v> leads to a1.h0, which sends nothing (dropped); a1.h3 ->
    logits is fed by a0.h2 -> a1.h3<k>, which is fed by nothing (both dropped)."""
    graph = EdgeGraph(2, 4)
    kept = ["input->a0.h1<q>", "a0.h1->m0", "m0->logits"]
    dropped = ["a0.h2->logits", "input->a1.h0<v>", "a0.h2->a1.h3<k>", "a1.h3->logits"]
    mask = torch.zeros(graph.allowed.shape, dtype=torch.bool)
    for name in kept + dropped:
        mask[graph.edge_index(name)] = True
    pruned = EdgeCircuit(graph, prune(graph, mask))
    assert sorted(pruned.edge_names()) == sorted(kept)
    assert pruned.nodes() == ["input", "a0.h1", "m0", "logits"]


def test_bad_inputs_give_clear_errors():
    model = tiny_model("gpt2")
    clean, corrupted, metric = changed_at_2_and_4(model)
    with pytest.raises(ValueError, match="unknown edge method"):
        edge_attribution(model, clean, corrupted, metric, method="ap")
    with pytest.raises(ValueError, match="plain gradients"):
        edge_attribution(model, clean, corrupted, metric, method="atp", rules="relp")
    with pytest.raises(ValueError, match="steps must be"):
        edge_attribution(model, clean, corrupted, metric, method="ig_inputs", steps=0)
    with pytest.raises(ValueError, match="not an edge"):
        edge_patching(model, clean, corrupted, metric, edges=["m1->a0.h0<q>"])
    graph = EdgeGraph.from_model(model)
    with pytest.raises(ValueError, match="are not edges"):
        EdgeCircuit(graph, torch.ones(graph.allowed.shape, dtype=torch.bool))
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="graph"):
        evaluator.values([EdgeCircuit(EdgeGraph(3, 4), torch.zeros(EdgeGraph(3, 4).allowed.shape, dtype=torch.bool))])
    with pytest.raises(TypeError, match="EdgeCircuit"):
        evaluator.evaluate(relp.select_circuit(relp.attribution_patching(model, clean, corrupted, metric, ["head"]), count=2))
    exact = edge_patching(model, clean, corrupted, metric, edges=["input->logits"])
    with pytest.raises(ValueError, match="NaN"):
        select_edges(exact, count=1)


def test_verify_replaces_the_top_estimates_by_exact_edge_patching_and_pooling_weights_prompts():
    model = tiny_model("llama", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    exact = relp.edges.score_edges(model, clean, corrupted, metric, "ap")
    atp = relp.edges.score_edges(model, clean, corrupted, metric, "atp")
    verified = relp.edges.score_edges(model, clean, corrupted, metric, "atp_verify", k=0.1)
    mask = verified.metadata["verified"]
    assert int(mask.sum()) == round(0.1 * atp.graph.n_edges)
    top = torch.sort(atp.flat().abs(), descending=True).indices[: int(mask.sum())]
    assert bool(atp.graph.flat(mask)[top].all())  # the verified edges are AtP's top |score|
    torch.testing.assert_close(verified.scores[mask].double(), exact.scores[mask], rtol=0, atol=1e-15)
    torch.testing.assert_close(verified.scores[~mask], atp.scores[~mask], rtol=0, atol=0)
    assert verified.metadata["forward_equivalents"] == 4 + int(mask.sum()) + 3
    one = relp.LogitDiff(metric.answer[:1], metric.wrong[:1])
    single = relp.edges.score_edges(model, clean[:1], corrupted[:1], one, "atp")
    pooled = relp.edges.pool_edge_scores([atp, single])
    assert pooled.metadata["n_prompts"] == 4
    torch.testing.assert_close(pooled.scores, (3 * atp.scores.double() + single.scores.double()) / 4)


def test_nodes_of_a_grouped_key_receiver_are_the_query_heads_of_its_group():
    """4 query heads, 2 key/value heads: key/value head 1 serves query heads 2 and 3."""
    graph = EdgeGraph(2, 4, 2)
    mask = torch.zeros(graph.allowed.shape, dtype=torch.bool)
    mask[graph.edge_index("input->a0.h1<k>")] = True
    assert EdgeCircuit(graph, mask).nodes() == ["input", "a0.h2", "a0.h3"]


def test_edges_of_a_decoder_used_as_an_embedder():
    """A metric that reads a pooled sentence embedding (readout) instead of logits: the logits receiver is
    then the final stream feeding the readout; sums and the full/empty circuits hold as for logits."""
    model = tiny_model("llama", dtype=torch.float64)
    clean, corrupted, _ = changed_at_2_and_4(model)
    anchors = changed_at_2_and_4(model, seed=1)[0]
    metric = relp.SimilarityDifference.from_runs(model, anchors, clean, corrupted, relp.SentenceEmbedding("mean"))
    edges = edge_attribution(model, clean, corrupted, metric, method="atp")
    nodes = relp.attribution_patching(model, clean, corrupted, metric, ["mlp_out"])
    # HF's LlamaRMSNorm computes in float32 even in a float64 model: float32 rounding
    assert edges.sender_totals()["m0"] == pytest.approx(nodes["mlp_out"][0].sum().item(), rel=1e-5)
    evaluator = EdgeCircuitEvaluator(model, clean, corrupted, metric)
    template = select_edges(edges, count=0)
    assert evaluator.values([template.full(), template.empty()]).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_pooled_edge_evaluators_are_the_prompt_weighted_mean():
    model = tiny_model("llama", dtype=torch.float64)
    clean, corrupted, metric = changed_at_2_and_4(model)
    scores = edge_attribution(model, clean, corrupted, metric, method="atp")
    circuit = select_edges(scores, percent=20)
    one = relp.LogitDiff(metric.answer[:1], metric.wrong[:1])
    two = relp.LogitDiff(metric.answer[1:], metric.wrong[1:])
    first = EdgeCircuitEvaluator(model, clean[:1], corrupted[:1], one)
    rest = EdgeCircuitEvaluator(model, clean[1:], corrupted[1:], two)
    pooled = relp.faithfulness.PooledEvaluator([first, rest])
    expected = (first.values([circuit]) + 2 * rest.values([circuit])) / 3
    torch.testing.assert_close(pooled.values(circuit), expected)
    assert pooled.evaluate(circuit).n_nodes == circuit.n_edges
