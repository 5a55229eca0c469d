"""Read an offline W&B run (``wandb/offline-run-*/run-<id>.wandb``) back, for tests: the records wandb wrote,
parsed with wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``).

wandb >= 0.2x writes the file from its Go core and ships no Python reader any more; the framing is LevelDB's log
format as wandb's former ``wandb/sdk/internal/datastore.py`` read it: a 7-byte file header (``:W&B``, magic
0xBEE1, version 0), 32 KiB blocks, each record chunk behind a 7-byte header (CRC-32, length, type FULL/FIRST/
MIDDLE/LAST), a block's last < 7 bytes zero padding.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B transaction log"
    out, pos, chunks = [], HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        if length == 0 and kind == 0:  # zero padding at the end of the file
            break
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"{path}: bad CRC at {pos}"
        pos += HEADER + length
        chunks.append(payload)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            out.append(record)
            chunks = []
    return out


@dataclass
class OfflineRun:
    """What one offline run holds: its run record's id, group and job type, its config, summary, history rows and
    the files of the tables and images it logged."""

    path: Path
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def history_keys(self) -> set[str]:
        """The keys logged with ``run.log``; a table or an image (``<key>/_type``, ``<key>/path``...) as ``<key>``."""
        return {_media(k) for row in self.history for k in row if not k.startswith("_")}

    @property
    def summary_keys(self) -> set[str]:
        return {_media(k) for k in self.summary if not k.startswith("_")}

    def table(self, key: str) -> dict[str, Any]:
        """The last table logged under ``key`` (its JSON: columns, data), found by the summary's path."""
        return json.loads((self.path / "files" / self.summary[f"{key}/path"]).read_text())

    def image(self, key: str) -> Path:
        """The file of the last image logged under ``key``."""
        return self.path / "files" / self.summary[f"{key}/path"]


def _media(key: str) -> str:
    head, _, tail = key.rpartition("/")
    media_fields = ("_type", "path", "sha256", "size", "format", "width", "height", "nrows", "ncols", "log_mode",
                    "artifact_path", "_latest_artifact_path")  # fmt: skip
    return head if head and tail in media_fields else key


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir: Path) -> OfflineRun:
    (file,) = run_dir.glob("*.wandb")
    run = OfflineRun(run_dir)
    for r in records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.job_type = r.run.run_id, r.run.run_group, r.run.job_type
            for item in r.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for item in r.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
    return run


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline W&B run under ``root``."""
    return [read_run(p) for p in sorted(root.rglob("offline-run-*")) if p.is_dir()]
