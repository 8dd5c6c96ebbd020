"""relp: relevance patching, attribution patching and activation patching for circuit discovery.

>>> import relp
>>> model = relp.load_model()                     # the embedded SmolLM2-135M-Instruct, offline
>>> metric = relp.LogitDiff(answer, wrong)        # any callable logits -> scalar
>>> ap = relp.activation_patching(model, clean, corrupted, metric)
>>> rp = relp.relevance_patching(model, clean, corrupted, metric)
>>> relp.agreement(rp, ap)

Embedding models (sentence encoders, or decoders used as embedders): the metric reads a pooled
sentence embedding instead of logits::

    encoder = relp.load_model("sentence-transformers/all-MiniLM-L6-v2")   # offline, from its package
    embedding = relp.SentenceEmbedding.from_model(encoder)                 # mean pooling, normalised
    metric = relp.SimilarityDifference.from_runs(encoder, anchors, clean, corrupted, embedding)
    rp = relp.relevance_patching(encoder, clean, corrupted, metric)
"""

from relp.checks import CostWarning
from relp.circuits import Circuit, node_scores, select_circuit
from relp.components import BLOCK_COMPONENTS, COMPONENTS
from relp.faithfulness import (
    ABLATIONS,
    MIB_PERCENTAGES,
    CircuitEvaluator,
    cpr_cmd,
    faithfulness_curve,
    random_baseline,
)
from relp.embeddings import SentenceEmbedding
from relp.metrics import (
    CosineSimilarity,
    EmbeddingDistance,
    KLToClean,
    LogitDiff,
    NormalizedLogitDiff,
    ProbDiff,
    SimilarityDifference,
    agreement,
)
from relp.integrated_gradients import integrated_gradients, integrated_gradients_inputs, two_point_patching
from relp.mib import from_mib_json, to_mib_json
from relp.loading import (
    EMBEDDED_ENCODER_NAME,
    EMBEDDED_MODEL_NAME,
    HubUnavailableError,
    default_cache_dir,
    load_model,
)
from relp.patching import activation_patching, attribution_patching, relevance_patching
from relp.atp_star import atp_star
from relp.results import PatchingResult, ResultFileError, pool_results
from relp.rules import PRESETS, RULES, RuleContextError, RuleNotLiveError, lrp_rules
from relp.similarity import InteractionResult, PairRelevance, interaction_patching, pair_relevance
from relp.tokens import to_tokens
from relp.verification import estimate_then_verify, verify
from relp.ap_cache import cached_activation_patching
from relp import edges
from relp.edges import EdgeCircuit, EdgeCircuitEvaluator, EdgeGraph, EdgeScores, edge_attribution, edge_patching, select_edges

__all__ = [
    "EdgeCircuit",
    "EdgeCircuitEvaluator",
    "EdgeGraph",
    "EdgeScores",
    "edge_attribution",
    "edge_patching",
    "edges",
    "select_edges",
    "ABLATIONS",
    "Circuit",
    "CostWarning",
    "CircuitEvaluator",
    "MIB_PERCENTAGES",
    "cpr_cmd",
    "faithfulness_curve",
    "from_mib_json",
    "node_scores",
    "random_baseline",
    "select_circuit",
    "to_mib_json",
    "BLOCK_COMPONENTS",
    "CosineSimilarity",
    "EMBEDDED_ENCODER_NAME",
    "EMBEDDED_MODEL_NAME",
    "EmbeddingDistance",
    "SentenceEmbedding",
    "SimilarityDifference",
    "HubUnavailableError",
    "InteractionResult",
    "PairRelevance",
    "default_cache_dir",
    "load_model",
    "pool_results",
    "COMPONENTS",
    "KLToClean",
    "LogitDiff",
    "NormalizedLogitDiff",
    "PRESETS",
    "PatchingResult",
    "ResultFileError",
    "ProbDiff",
    "RULES",
    "RuleContextError",
    "RuleNotLiveError",
    "activation_patching",
    "agreement",
    "atp_star",
    "attribution_patching",
    "cached_activation_patching",
    "estimate_then_verify",
    "integrated_gradients",
    "integrated_gradients_inputs",
    "interaction_patching",
    "lrp_rules",
    "pair_relevance",
    "relevance_patching",
    "to_tokens",
    "two_point_patching",
    "verify",
]
__version__ = "0.1.0"
