"""The distillation teacher's logits, sharing the student's forward through the unrouted prefix.

The teacher is the frozen base model: the same model with routing off. Its layers before the first routed
layer are the student's own, unchanged, with identical inputs (the embeddings of the same tokens), so their
outputs are identical too: the hidden state entering the first routed layer is the same tensor in both
forwards. `student_and_teacher` therefore runs the student once, keeps the input of its first routed layer
(hidden state, mask, rotary tables: a forward pre-hook), and runs only the remaining layers, the final norm
and the LM head for the teacher, without autograd and with routing off. Same numbers as `full_teacher_logits`
(tests/test_teacher.py checks losses and gradients); on SmolLM2 (layers 15..29 routed) the teacher does 15
layers instead of 30 (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..flexidepth.inject import decoder_layers, set_routing


def full_teacher_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, T, V] of the model with routing off (the frozen base), without autograd: every layer."""
    set_routing(model, False)
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        set_routing(model, True)


@contextlib.contextmanager
def capture_layer_input(layer: torch.nn.Module) -> Iterator[dict]:
    """Within the block, the first call of `layer` stores its positional args and kwargs in the yielded dict
    (keys "args", "kwargs"); later calls (a gradient-checkpoint recompute) leave them as they are."""
    store: dict = {}

    def hook(module, args, kwargs):
        if "args" not in store:
            store["args"], store["kwargs"] = tuple(args), dict(kwargs)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def teacher_from_layer(model, start: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """Teacher logits [B, T, V] from the input (`args`, `kwargs` as captured) of decoder layer `start`:
    layers start..L-1 with routing off, the final norm, the LM head; without autograd."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = args[1:]
    layers = decoder_layers(model)
    inner = getattr(model, "model", model)
    set_routing(model, False)
    try:
        with torch.no_grad():
            for layer in layers[start:]:
                hidden = layer(hidden, *rest, **kwargs)
                if isinstance(hidden, tuple):  # older transformers: (hidden_states, ...)
                    hidden = hidden[0]
            return model.lm_head(inner.norm(hidden))
    finally:
        set_routing(model, True)


def student_and_teacher(model, student: Callable[[], object]) -> tuple[object, torch.Tensor]:
    """Run `student()` (a routed forward of `model`), then the teacher from the student's first routed layer.

    Returns (what `student()` returned, teacher logits [B, T, V] without autograd). Raises RuntimeError if the
    student forward never reached that layer.
    """
    start = model.flexidepth.layer_indices[0]
    with capture_layer_input(decoder_layers(model)[start]) as captured:
        out = student()
    if "args" not in captured:
        raise RuntimeError(f"the student forward did not run decoder layer {start}: no input to share")
    return out, teacher_from_layer(model, start, captured["args"], captured["kwargs"])


__all__ = ["capture_layer_input", "full_teacher_logits", "student_and_teacher", "teacher_from_layer"]
