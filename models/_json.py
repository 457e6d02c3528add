"""Reading a checkpoint's JSON files with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(file, *, error: type[Exception] = ValueError, expected: str = "a JSON object") -> dict:
    """The JSON object in ``file``. Not UTF-8, not JSON, or not an object: ``error`` naming
    the file and what was expected."""
    try:
        data = json.loads(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{file}: not valid UTF-8 text ({e}); expected {expected}") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON ({e}); expected {expected}") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected {expected}, got {type(data).__name__}")
    return data
