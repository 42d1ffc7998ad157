"""Upcycling a LoopLM by layer duplication: L layers -> k x L (Ouro-2.6B came from 1.4B so).

``interleave`` repeats each layer in place (0,0,1,1,...); ``stack`` repeats the whole stack
(0,1,...,L-1,0,1,...). Embeddings, the final norm, the exit gate and the LM head are kept as
they are. ``scripts/upcycle.py`` is the command line.
"""

from __future__ import annotations

from looplm.modeling import LoopLMForCausalLM

ORDERS = ("interleave", "stack")


def layer_sources(num_layers: int, factor: int, order: str) -> list[int]:
    """For each layer of the upcycled model, the original layer it copies."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if order == "interleave":
        return [i for i in range(num_layers) for _ in range(factor)]
    return [i for _ in range(factor) for i in range(num_layers)]


def upcycle(model: LoopLMForCausalLM, factor: int, order: str) -> LoopLMForCausalLM:
    """A new model whose layers are copies of ``model``'s, in the given order."""
    config = model.config
    sources = layer_sources(config.num_hidden_layers, factor, order)
    bigger = LoopLMForCausalLM(
        config.replace(num_hidden_layers=len(sources)), model.attn_implementation
    ).to(next(model.parameters()).dtype)
    state = model.state_dict()
    new_state = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for target, source in enumerate(sources):
        prefix = f"model.layers.{source}."
        for name, tensor in state.items():
            if name.startswith(prefix):
                new_state[f"model.layers.{target}.{name[len(prefix) :]}"] = tensor.clone()
    bigger.load_state_dict(new_state, strict=True)
    return bigger
