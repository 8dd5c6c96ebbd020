"""Checks on the real embedded model (SmolLM2-135M-Instruct). Slow: run with `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch

import relp
from relp.tasks import make_ioi_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return relp.load_model()


@pytest.fixture(scope="module")
def ioi_batch(smollm):
    # the IOI experiment's default protocol: S2 replaced by the IO name (the answer flips)
    data = make_ioi_dataset(smollm, 6, corruption="s2_io_flip", templates=["baba_00"], seed=1)
    (batch,) = list(data.batches())
    return batch


def test_rules_are_live_and_forward_invariant_on_the_embedded_model(smollm, ioi_batch):
    tokens = ioi_batch.clean_tokens
    with torch.no_grad():
        plain = smollm(tokens)
        with relp.lrp_rules(smollm, "relp") as rules:
            ruled = smollm(tokens)
    assert rules.active == ("ln", "identity", "half")
    assert torch.equal(plain, ruled)


def test_relevance_patching_tracks_activation_patching_better_than_attribution_patching(smollm, ioi_batch):
    """The paper's claim on residual streams and MLP outputs, on a handful of IOI prompts."""
    clean, corrupted = ioi_batch.clean_tokens, ioi_batch.corrupted_tokens
    metric = relp.NormalizedLogitDiff.from_runs(
        smollm, clean, corrupted, ioi_batch.answer_tokens, ioi_batch.wrong_tokens
    )
    assert metric.clean_value > 0  # the model does IOI on these prompts
    components = ["resid_pre", "mlp_out"]
    ap = relp.activation_patching(smollm, clean, corrupted, metric, components, progress=False)
    atp = relp.attribution_patching(smollm, clean, corrupted, metric, components)
    rp = relp.relevance_patching(smollm, clean, corrupted, metric, components)
    atp_agreement, rp_agreement = relp.agreement(atp, ap), relp.agreement(rp, ap)
    print("\nAtP vs AP\n", atp_agreement, "\nRelP vs AP\n", rp_agreement)
    for component in components:
        assert rp_agreement.loc[component, "pearson"] > atp_agreement.loc[component, "pearson"], component
