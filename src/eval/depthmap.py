"""DepthMap: per-token layer-usage records of an evaluation, stored as a `datasets` Dataset (parquet).

One row per token of every evaluated example (prompt and generated tokens; for a multiple-choice task, the
prompt and the correct choice's tokens):

    model        "flexidepth" | "base"
    task, example_id, segment ("prompt" | "generated" | "choice"), position (0-based in prompt + completion)
    token_id, token (the tokenizer's token string), text (the token decoded to text)
    layers_used  decoder layers this token's forward ran (unrouted layers + routed layers run)
    gates        [R] router gate per routed layer (empty when routing is off)
    run          [R] the layer was run (g > tau)
    base_entropy the base model's predictive entropy at the distribution that predicted this token,
                 H(p_base(. | x_<t)) in nats; null at position 0 and when the base is not recoverable (LaCo)
    base_loss    -log p_base(x_t | x_<t) in nats (same nulls); src/eval/uncertainty.py

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
            "base_entropy": Value("float32"),
            "base_loss": Value("float32"),
        }
    )


def to_dataset(records: list[dict], layer_indices: list[int] | None = None, num_layers: int | None = None):
    from datasets import Dataset, DatasetInfo

    feats = features()
    optional = ("base_entropy", "base_loss")  # absent from records made before they were recorded
    columns = {name: [r.get(name) if name in optional else r[name] for r in records] for name in feats}
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
    """Load a DepthMap parquet file back as a datasets.Dataset (with the DepthMap features). A file written
    before base_entropy / base_loss were recorded loads with those columns null. Raises FileNotFoundError."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DepthMap file at {path}")
    import pyarrow.parquet as pq

    names = pq.read_schema(str(path)).names
    missing = [name for name in features() if name not in names]
    if not missing:
        return Dataset.from_parquet(str(path), features=features())
    ds = Dataset.from_parquet(str(path))
    for name in missing:
        ds = ds.add_column(name, [None] * len(ds))
    return ds.cast(features())


__all__ = ["features", "load_depthmap", "to_dataset", "write_depthmap"]
