"""The bulk CLI's output: one row per image, as JSON Lines or CSV (docs/client.md).

Keys, in this order: path, label (the top-1), probability, unsure, model, version, top_k
(highest first: label, class_index, probability); a failed image's row has them too (null in
JSON, empty in CSV) and then `error`. JSON Lines has nothing but rows; CSV starts with a header
and always has the `error` column, its top_k cell holding the JSON list.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Protocol

from serving.client.results import Result

ROW_KEYS = ("path", "label", "probability", "unsure", "model", "version", "top_k")
ERROR_KEY = "error"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def probability(value: float) -> float:
    """float32 probabilities, to the 6 significant digits they mean (0.912345, not 0.9123449921607971)."""
    return float(f"{value:.6g}")


def row_of(path: str, result: Result) -> dict:
    classification = result.classification
    if classification is None:
        return {**dict.fromkeys(ROW_KEYS), "path": path, ERROR_KEY: str(result.error)}
    return {
        "path": path, "label": classification.label, "probability": probability(classification.probability),
        "unsure": classification.unsure, "model": classification.model, "version": classification.version,
        "top_k": [{"label": p.label, "class_index": p.class_index, "probability": probability(p.probability)}
                  for p in classification.predictions],
    }


class RowWriter(Protocol):
    def write(self, row: dict) -> None: ...
    def close(self) -> None: ...


class JsonLinesWriter:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, row: dict) -> None:
        self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.stream.close()


class CsvWriter:
    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.writer = csv.writer(stream)
        self.writer.writerow((*ROW_KEYS, ERROR_KEY))

    @staticmethod
    def cell(value) -> str | int | float:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return value

    def write(self, row: dict) -> None:
        self.writer.writerow([self.cell(row.get(key)) for key in (*ROW_KEYS, ERROR_KEY)])

    def close(self) -> None:
        self.stream.close()


def format_of(path: Path) -> str:
    """"jsonl" or "csv" by the file's extension; ValueError for any other."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: the output's extension says its format: "
                         f"{', '.join(FORMATS)} (not {path.suffix or 'none'})") from None


def open_rows(path: Path) -> RowWriter:
    kind = format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "w", encoding="utf-8", newline="" if kind == "csv" else None)
    return CsvWriter(stream) if kind == "csv" else JsonLinesWriter(stream)
