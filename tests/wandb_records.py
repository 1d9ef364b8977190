"""Read back what an offline W&B run recorded, from its run-<id>.wandb file.

wandb 0.31 keeps an offline run's history only in that file (files/ holds no summary), and
no longer ships a reader. The format: a 7-byte header (b":W&B", magic 0xBEE1 little-endian,
version 0), then a LevelDB-style log of 32 KiB blocks whose chunks carry a 7-byte header
(crc32, length u16 LE, type: 1 full, 2 first, 3 middle, 4 last); each reassembled record is a
wandb_internal_pb2.Record."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> list[dict]:
    """Each logged step as {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's configuration: given to wandb.init (in the run record) or set later."""
    values = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            values[item.key] = json.loads(item.value_json)
    return values


def run_file(output_dir: Path) -> Path:
    """The single offline run's .wandb file under OUTPUT_DIR/wandb/."""
    found = sorted(Path(output_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise AssertionError(f"expected one offline W&B run under {output_dir}, found {found}")
    return found[0]


def summary(path: Path) -> dict:
    values = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def run_info(path: Path) -> dict:
    """The run record: display name, notes, group, tags, run id."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"run_id": run.run_id, "display_name": run.display_name, "notes": run.notes,
                    "group": run.run_group, "tags": list(run.tags)}
    raise AssertionError(f"{path}: no run record")
