"""JSON files with errors that name what was being read."""

import json
from pathlib import Path


def read_json(path, what: str) -> dict:
    """A JSON file's content; a missing file or bad JSON is an error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def write_json(path, data) -> Path:
    """Write `data` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
