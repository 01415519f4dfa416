"""DepthMap: per-token layer-usage records of an evaluation, stored as a `datasets` Dataset (parquet).

One row per token of every evaluated example (prompt and generated tokens; for a multiple-choice task, the
prompt and the correct choice's tokens):

    model        "flexidepth" | "base"
    task, example_id, segment ("prompt" | "generated" | "choice"), position (0-based in prompt + completion)
    token_id, token (the tokenizer's token string), text (the token decoded to text)
    layers_used  decoder layers this token's forward ran (unrouted layers + routed layers run)
    gates        [R] router gate per routed layer (empty when routing is off)
    run          [R] the layer was run (g > tau)

Prompt tokens carry the routes of their own prefill position; generated token i carries the routes of the
forward that produced it (the last prompt token for i = 0, then token i - 1), the paper's "layers used to
generate a token". Routed layer indices are in the dataset's `info.description` (json) and in results.json.

    write_depthmap(records, path, layer_indices)  ->  load_depthmap(path)  (a datasets.Dataset)
"""

from __future__ import annotations

import json
from pathlib import Path


def features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "model": Value("string"),
            "task": Value("string"),
            "example_id": Value("string"),
            "segment": Value("string"),
            "position": Value("int32"),
            "token_id": Value("int64"),
            "token": Value("string"),
            "text": Value("string"),
            "layers_used": Value("int32"),
            "gates": Sequence(Value("float32")),
            "run": Sequence(Value("bool")),
        }
    )


def to_dataset(records: list[dict], layer_indices: list[int] | None = None, num_layers: int | None = None):
    from datasets import Dataset, DatasetInfo

    feats = features()
    columns = {name: [r[name] for r in records] for name in feats}
    meta = {
        "format": "flexidepth-depthmap",
        "routed_layers": list(layer_indices or []),
        "num_layers": num_layers,
    }
    return Dataset.from_dict(
        columns, features=feats, info=DatasetInfo(description=json.dumps(meta), features=feats)
    )


def write_depthmap(
    records: list[dict],
    path: str | Path,
    layer_indices: list[int] | None = None,
    num_layers: int | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_dataset(records, layer_indices, num_layers).to_parquet(str(path))
    return path


def load_depthmap(path: str | Path):
    """Load a DepthMap parquet file back as a datasets.Dataset (with the DepthMap features)."""
    from datasets import Dataset

    return Dataset.from_parquet(str(path), features=features())


__all__ = ["features", "load_depthmap", "to_dataset", "write_depthmap"]
