"""Print generated text as it is produced, each token followed by the number of layers it used.

    streamer = LayerStreamer(tokenizer, num_layers=model.config.num_hidden_layers)
    generate(model, tokenizer, ids, mask, max_new_tokens=64, streamer=streamer)
    # The[30/30] answer[27/30] is[22/30] 4[30/30]2[29/30].[18/30]

With one prompt the text is printed live; with a batch each row is buffered and printed at `end()` (rows
would interleave otherwise). With `color=True` (default: when the output is a terminal and NO_COLOR is
unset) each piece gets the depth map's background colour (`src.render.html.layer_colour`) and a dim count.

Text is decoded incrementally from all of a row's tokens, so multi-token characters (UTF-8 pieces) and
tokenizers that merge spaces come out right: a piece is printed once its text is stable (it does not end
in the replacement character), annotated with the layers of every token that went into it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

import torch

from .html import layer_colour

RESET = "\x1b[0m"


@dataclass
class _Row:
    """One sequence's state: every token received, and what has been turned into text so far."""

    tokens: list[int] = field(default_factory=list)  # every token put() delivered (also after EOS)
    layers: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # valid tokens only: what is decoded
    printed_chars: int = 0  # characters of decode(ids) already emitted
    pending_layers: list[int] = field(default_factory=list)  # layers of tokens not yet emitted
    out: list[str] = field(default_factory=list)  # emitted, annotated pieces


class LayerStreamer:
    """A `generate(..., streamer=...)` streamer that prints `piece[used/total]` for every new token.

    Args:
        tokenizer: decodes the token ids (special tokens are shown, e.g. the EOS token).
        num_layers: the model's decoder layers (the `total` of each annotation).
        file: where to print (default sys.stdout).
        color: ANSI background colours by layers used; None: only when `file` is a terminal.
        min_layers: layers used when every routed layer is skipped (the pale end of the colour scale);
            default 0.
    """

    def __init__(
        self,
        tokenizer,
        num_layers: int,
        file: TextIO | None = None,
        color: bool | None = None,
        min_layers: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_layers = int(num_layers)
        self.min_layers = int(min_layers)
        self.file = file if file is not None else sys.stdout
        if color is None:
            color = bool(getattr(self.file, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        self.color = color
        self.rows: list[_Row] = []
        self.ended = False

    # ------------------------------------------------------------------------------------ protocol
    def put(self, tokens: torch.Tensor, layers_used: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One decoding step: tokens [B], layers_used [B], valid [B] (False: the row had finished)."""
        tokens_l = [int(t) for t in tokens.reshape(-1).tolist()]
        layers_l = [int(u) for u in layers_used.reshape(-1).tolist()]
        valid_l = [True] * len(tokens_l) if valid is None else [bool(v) for v in valid.reshape(-1).tolist()]
        if not self.rows:
            self.rows = [_Row() for _ in tokens_l]
        if len(tokens_l) != len(self.rows):
            raise ValueError(f"put() got {len(tokens_l)} rows, earlier steps had {len(self.rows)}")
        live = len(self.rows) == 1
        for row, tok, used, ok in zip(self.rows, tokens_l, layers_l, valid_l):
            row.tokens.append(tok)
            row.layers.append(used)
            row.valid.append(ok)
            if not ok:
                continue
            row.ids.append(tok)
            row.pending_layers.append(used)
            piece = self._next_piece(row, final=False)
            if piece and live:
                self.file.write(piece)
                self.file.flush()

    def end(self) -> None:
        """Flush what is still pending; print buffered rows of a batch; a summary line per row."""
        for b, row in enumerate(self.rows):
            piece = self._next_piece(row, final=True)
            if len(self.rows) == 1:
                if piece:
                    self.file.write(piece)
                self.file.write("\n")
            else:
                self.file.write(f"[row {b}] {''.join(row.out)}\n")
            self.file.write(self.summary(b) + "\n")
        self.file.flush()
        self.ended = True

    # ------------------------------------------------------------------------------------ results
    def text(self, row: int = 0) -> str:
        """The annotated text of one row so far (what was printed, without the summary)."""
        return "".join(self.rows[row].out)

    def summary(self, row: int = 0) -> str:
        """'n tokens, mean layers used x / total' over the row's valid tokens."""
        r = self.rows[row]
        used = [u for u, ok in zip(r.layers, r.valid) if ok]
        mean = sum(used) / len(used) if used else float("nan")
        return f"-- {len(used)} tokens, mean layers used {mean:.2f} / {self.num_layers}"

    # ------------------------------------------------------------------------------------ internals
    def _next_piece(self, row: _Row, final: bool) -> str:
        """Emit the stable new text of `row` (all of it when `final`), annotated; '' when nothing is due."""
        if not row.pending_layers:
            return ""
        text = self.tokenizer.decode(row.ids, skip_special_tokens=False)
        new = text[row.printed_chars :]
        if not final and (new == "" or new.endswith("\ufffd")):
            return ""  # an incomplete character: wait for the next token
        row.printed_chars = len(text)
        piece = self._annotate(new, row.pending_layers)
        row.pending_layers = []
        row.out.append(piece)
        return piece

    def _annotate(self, new: str, layers: list[int]) -> str:
        """`text[used/total]`, with trailing newlines after the annotation (a lone newline shows as '↵')."""
        body = new.rstrip("\n")
        tail = new[len(body) :]
        if body == "" and tail:
            body = "↵"
        count = ",".join(map(str, layers))
        if not self.color:
            return f"{body}[{count}/{self.num_layers}]{tail}"
        r, g, b = layer_colour(sum(layers) / len(layers), self.num_layers, self.min_layers)
        return f"\x1b[48;2;{r};{g};{b}m\x1b[30m{body}{RESET}\x1b[2m{count}{RESET}{tail}"


__all__ = ["LayerStreamer"]
