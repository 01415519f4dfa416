"""The tokenizer of a `model` config node, its padding policy and its chat prompt, decided once here.

Padding policy: a tokenizer without a pad token pads with its EOS token (`load_tokenizer` sets it, so
`tokenizer.pad_token_id` is never None afterwards); `pad_token_id` gives the id every batching site writes
into padding positions (pad, else EOS, else 0). Padding positions are always masked out by the attention
mask and labels, so the id only has to be a valid token id.
"""

from __future__ import annotations

from .config import ModelConfig


def load_tokenizer(model: ModelConfig):
    """The tokenizer of the base model `model` (`ModelConfig.tokenizer_path`), with the pad policy applied
    (pad token = EOS when it has none).

    Raises OSError from transformers when the folder / hub id cannot be read."""
    return open_tokenizer(model.tokenizer_path())


def open_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained` of a folder, hub id or the embedded model's name, with the pad policy
    applied (pad token = EOS when it has none)."""
    from transformers import AutoTokenizer

    from .embedded import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def pad_token_id(tokenizer) -> int:
    """The id written into padding positions: the tokenizer's pad id, else its EOS id (the first of a list),
    else 0. Padding is masked out, so any valid id serves."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
    return 0 if pad is None else int(pad)


def chat_prompt(tokenizer, user: str) -> str:
    """The user turn in the tokenizer's chat template (generation prompt added, returned as text, special
    tokens included); `user` plus a newline for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return user + "\n"


__all__ = ["chat_prompt", "load_tokenizer", "open_tokenizer", "pad_token_id"]
