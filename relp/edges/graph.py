"""The edge graph of a model: who writes into the residual stream, who reads from it, and which pairs are edges.

In a pre-norm transformer the residual stream at any point is a sum of the outputs written before it:
the input embedding, every attention head's output (``z_h W_O^h``, ``attn.hook_result``) and every MLP's
output. A *sender* is one of those writers; a *receiver* is one input that reads the stream:

============================  ============================================  ======================================
receiver                      what it reads                                 hook (TransformerLens 4.x bridge)
============================  ============================================  ======================================
``a{l}.h{h}<q>``              the stream entering query head h's norm       ``blocks.{l}.attn.hook_q_input`` [.., h, :]
``a{l}.h{g}<k>``, ``<v>``     the stream entering key/value head g's norm   ``blocks.{l}.attn.hook_k_input`` / ``v``
``m{l}``                      the stream entering the MLP's norm            ``blocks.{l}.hook_mlp_in``
``logits``                    the final stream (entering the final norm)    ``blocks.{L-1}.hook_resid_post``
============================  ============================================  ======================================

An *edge* ``u -> v`` is one sender's output into one receiver: it exists when u writes before v reads
(u at an earlier layer, or u a head of layer l and v the MLP of layer l in sequential blocks; the input
feeds every receiver, every sender feeds the logits). Names follow MIB (``input``, ``a{l}.h{h}``,
``m{l}``, ``logits``; an edge ``a0.h1->a2.h3<q>``, ``m0->logits``).

Grouped-query attention: the key and value inputs are those of the model's key/value heads (a key head
is one computation, shared by the query heads of its group; patching its input changes every query head
of the group). relp's graph therefore has one ``<k>`` and one ``<v>`` receiver per key/value head
``g``, named ``a{l}.h{g}<k>`` with ``g`` < ``n_key_value_heads``; for multi-head attention these are
exactly MIB's per-head receivers. (:mod:`relp.mib` expands them to MIB's per-query-head names.)

Per position: the stream is position-wise, so an edge at position p is ``u@p -> v@p``; a graph with
``per_position=True`` scores each edge at each position (attention moves information between
positions inside a head, behind its ``<k>``/``<v>`` receivers).

Only blocks whose stream is a plain running sum have such a graph: post-LN encoders (BERT, RoBERTa)
renormalise the stream after every sublayer, so a receiver's input is not a sum of sender outputs, and
:class:`EdgeGraph` refuses them with a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from relp.architectures import architecture_of


@dataclass(frozen=True)
class Receiver:
    """One receiver: its kind (``q``, ``k``, ``v``, ``mlp``, ``logits``), layer and head (None for MLPs/logits)."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind in "qkv":
            return f"a{self.layer}.h{self.head}<{self.kind}>"
        return f"m{self.layer}" if self.kind == "mlp" else "logits"

    @property
    def node(self) -> str:
        """The node this receiver belongs to (a head, an MLP, the logits). A key/value receiver of a grouped
        graph is named by its key/value head: it feeds every query head of its group (see
        :func:`relp.edges.circuits.prune`)."""
        if self.kind in "qkv":
            return f"a{self.layer}.h{self.head}"
        return self.name


_RECEIVER = re.compile(r"^a(?P<l>\d+)\.h(?P<h>\d+)<(?P<k>[qkv])>$|^m(?P<ml>\d+)$|^logits$")


class EdgeGraph:
    """Senders, receivers and edges of a model (see the module docstring).

    ``senders`` are in MIB's order (``input``, then per layer its heads and its MLP); ``receivers`` per
    layer: the query heads, the key heads, the value heads, the MLP; then ``logits``. ``allowed`` is the
    bool matrix [sender, receiver] of the edges; edge scores and circuits are tensors of that shape
    (``[position, sender, receiver]`` per position), and an edge's *flat index* counts the allowed
    entries in C order.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, *, parallel_attn_mlp: bool = False,
                 model_name: str = ""):
        if n_layers < 1 or n_heads < 1:
            raise ValueError(f"an edge graph needs at least one layer and one head; got n_layers={n_layers}, n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_key_value_heads must divide n_heads; got {n_kv_heads} for {n_heads} heads")
        self.n_layers, self.n_heads, self.n_kv_heads = int(n_layers), int(n_heads), n_kv_heads
        self.parallel_attn_mlp = bool(parallel_attn_mlp)
        self.model_name = model_name
        senders, sender_layer = ["input"], [-1]
        receivers: list[Receiver] = []
        for layer in range(self.n_layers):
            receivers += [Receiver("q", layer, h) for h in range(self.n_heads)]
            receivers += [Receiver(kind, layer, g) for kind in "kv" for g in range(self.n_kv_heads)]
            receivers.append(Receiver("mlp", layer))
            senders += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
            sender_layer += [layer] * self.n_heads + [layer]
        receivers.append(Receiver("logits", self.n_layers))
        self.senders: tuple[str, ...] = tuple(senders)
        self.receivers: tuple[Receiver, ...] = tuple(receivers)
        self.sender_layer = torch.tensor(sender_layer)
        self.sender_index = {name: i for i, name in enumerate(self.senders)}
        self.receiver_index = {r.name: i for i, r in enumerate(self.receivers)}
        allowed = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
        for j, receiver in enumerate(receivers):
            allowed[:, j] = self.available(receiver)
        self.allowed = allowed

    @classmethod
    def from_model(cls, model) -> "EdgeGraph":
        """The graph of a TransformerLens bridge; post-LN encoders are refused (see the module docstring)."""
        cfg = model.cfg
        if not architecture_of(model).additive_stream:
            raise ValueError(
                f"{cfg.model_name} ({cfg.architecture}) has post-LN blocks: the residual stream is renormalised after "
                "every sublayer, so a component's input is not a sum of earlier outputs and there are no edges "
                "between them. Edge graphs need pre-norm blocks (GPT-2, Llama, Qwen, ...); use node-level methods here"
            )
        return cls(
            cfg.n_layers, cfg.n_heads, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)), model_name=str(cfg.model_name),
        )

    # --- structure ---
    def available(self, receiver: Receiver) -> torch.Tensor:
        """Bool [sender]: the senders that write before `receiver` reads."""
        if receiver.kind == "logits":
            return torch.ones(len(self.senders), dtype=torch.bool)
        before = self.sender_layer < receiver.layer
        if receiver.kind == "mlp" and not self.parallel_attn_mlp:
            heads = torch.tensor([name.startswith(f"a{receiver.layer}.") for name in self.senders])
            before = before | heads
        return before

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @cached_property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    def layer_receivers(self, layer: int) -> list[int]:
        """Indices of the receivers of one layer (the logits: layer ``n_layers``)."""
        return [j for j, r in enumerate(self.receivers) if r.layer == layer]

    def key(self) -> tuple:
        return (self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_attn_mlp)

    def __eq__(self, other) -> bool:
        return isinstance(other, EdgeGraph) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        kv = f", {self.n_kv_heads} key/value heads" if self.n_kv_heads != self.n_heads else ""
        return (f"EdgeGraph({self.n_layers} layers, {self.n_heads} heads{kv}: {self.n_senders} senders, "
                f"{self.n_receivers} receivers, {self.n_edges} edges)")

    # --- names ---
    @cached_property
    def edge_pairs(self) -> torch.Tensor:
        """[n_edges, 2] (sender, receiver) indices of the edges in flat order."""
        return self.allowed.nonzero()

    def edge_names(self) -> list[str]:
        return [f"{self.senders[s]}->{self.receivers[r].name}" for s, r in self.edge_pairs.tolist()]

    def edge_index(self, name: str) -> tuple[int, int]:
        """(sender, receiver) indices of an edge name such as ``a0.h1->a2.h3<q>``; a clear error otherwise."""
        sender, sep, receiver = name.partition("->")
        if not sep or sender not in self.sender_index or receiver not in self.receiver_index:
            raise ValueError(
                f"unknown edge {name!r} for {self!r}; expected 'sender->receiver' with senders such as 'input', "
                f"'a0.h0', 'm0' and receivers such as 'a1.h0<q>', 'm1', 'logits'"
            )
        s, r = self.sender_index[sender], self.receiver_index[receiver]
        if not self.allowed[s, r]:
            raise ValueError(f"{name!r} is not an edge: {sender} does not write before {receiver} reads")
        return s, r

    @staticmethod
    def parse_receiver(name: str) -> Receiver:
        match = _RECEIVER.match(name)
        if not match:
            raise ValueError(f"unrecognised receiver {name!r}; expected a{{l}}.h{{h}}<q|k|v>, m{{l}} or logits")
        if match["k"]:
            return Receiver(match["k"], int(match["l"]), int(match["h"]))
        if match["ml"]:
            return Receiver("mlp", int(match["ml"]))
        return Receiver("logits", -1)

    def flat(self, matrix: torch.Tensor) -> torch.Tensor:
        """The allowed entries of a [..., sender, receiver] tensor, flattened in edge order."""
        if tuple(matrix.shape[-2:]) != tuple(self.allowed.shape):
            raise ValueError(f"expected a tensor [..., {self.n_senders}, {self.n_receivers}]; got {tuple(matrix.shape)}")
        return matrix[..., self.allowed]

    def unflat(self, flat: torch.Tensor, fill=0) -> torch.Tensor:
        """Inverse of :meth:`flat`: [..., n_edges] -> [..., sender, receiver], `fill` off the edges."""
        out = torch.full((*flat.shape[:-1], *self.allowed.shape), fill, dtype=flat.dtype)
        out[..., self.allowed] = flat
        return out
