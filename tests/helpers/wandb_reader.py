"""Read history rows back from an offline `.wandb` file (LevelDB-log framing of protobuf Records)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B" + magic + version
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32c (4) + length (2, little-endian) + kind (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a .wandb file")
    pos, parts = HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += CHUNK_HEADER
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def history_rows(path: str | Path) -> list[dict]:
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def find_run_file(root: str | Path) -> Path:
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {root}")
    return files[-1]
