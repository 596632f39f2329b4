"""The device contract (device_contract.json), read once: names, limits, the manifest schema.

The JSON file is the single definition; the Python learner checks manifests with
`manifest_problems` here and the JS learner with the same rules in export/js/contract.mjs,
whose embedded copy of the JSON a test compares with this file (and a fuzz test feeds both
checkers the same manifests). Adding a manifest field means one entry in the JSON (type,
`since`, `required`) plus the reader's dataclass field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CONTRACT_PATH = Path(__file__).with_name("device_contract.json")
CONTRACT: dict[str, Any] = json.loads(CONTRACT_PATH.read_text(encoding="utf-8"))

FILES: dict[str, Any] = CONTRACT["files"]
TENSORS: dict[str, str] = CONTRACT["tensors"]
LIMITS: dict[str, int] = CONTRACT["limits"]
MANIFEST_FIELDS: dict[str, dict[str, Any]] = CONTRACT["manifest"]
PLAIN_NAME = re.compile(FILES["plain_name_pattern"])
_HEX = re.compile(r"^[0-9a-f]*$")


def _is_int(v: Any, low: int, high: int) -> bool:
    return type(v) is int and low <= v <= high


def _plain(v: Any) -> bool:
    return isinstance(v, str) and bool(PLAIN_NAME.match(v)) and v not in (".", "..")


def _hex(v: Any, length: int) -> bool:
    return isinstance(v, str) and len(v) == length and bool(_HEX.match(v))


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _shape(v: Any, dynamic: bool = False) -> bool:
    dim = LIMITS["max_dim"]
    return (
        isinstance(v, list)
        and len(v) <= LIMITS["max_rank"]
        and all((dynamic and d is None) or _is_int(d, 0, dim) for d in v)
    )


def _input(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and set(v) == {"name", "dtype", "shape"}
        and isinstance(v["name"], str)
        and v["dtype"] in CONTRACT["input_dtypes"]
        and _shape(v["shape"], dynamic=True)
    )


def _valid(v: Any, spec: dict[str, Any]) -> bool:
    kind = spec["type"]
    if kind == "int":
        return _is_int(v, spec["min"], spec["max"])
    if kind == "int_list":
        return isinstance(v, list) and all(_is_int(x, spec["min"], spec["max"]) for x in v)
    if kind == "number":
        return type(v) in (int, float) and spec["min"] <= v < float("inf")
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "enum":
        return isinstance(v, str) and v in spec["values"]
    if kind == "hex":
        return _hex(v, spec["length"])
    if kind == "plain_name":
        return _plain(v)
    if kind == "str_list":
        return _str_list(v)
    if kind == "str_map":
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    if kind == "hex_map":
        return isinstance(v, dict) and all(
            _plain(k) and _hex(h, spec["length"]) for k, h in v.items()
        )
    if kind == "shape_map":
        return isinstance(v, dict) and all(_shape(s) for s in v.values())
    if kind == "inputs":
        return isinstance(v, list) and bool(v) and all(_input(s) for s in v)
    raise ValueError(f"device_contract.json: unknown field type {kind!r}")


def _empty(v: Any) -> bool:
    return v in ("", 0) or v == [] or v == {}


def manifest_problems(raw: dict[str, Any]) -> list[str]:
    """Type and range problems of a raw manifest's fields, one line each (empty: it fits).

    Missing required fields, unknown fields and values outside their declared type. A field
    whose `since` is newer than the manifest's format may hold its empty default.
    """
    version = raw.get("format_version")
    problems = [
        f"missing {k!r}" for k, s in MANIFEST_FIELDS.items() if s.get("required") and k not in raw
    ]
    problems += [f"unknown field {k!r}" for k in sorted(set(raw) - set(MANIFEST_FIELDS))]
    for key, spec in MANIFEST_FIELDS.items():
        if key not in raw or _valid(raw[key], spec):
            continue
        old = type(version) is int and version < spec.get("since", 0)
        if old and _empty(raw[key]):
            continue
        detail = ""
        if spec["type"] == "plain_name":
            detail = f": the manifest names {raw[key]!r}: only plain file names inside the artifacts folder"
        elif spec["type"] == "enum":
            detail = f": {raw[key]!r} not in {tuple(spec['values'])}"
        problems.append(f"bad {key!r}{detail}")
    return problems


def generation_file(prefix_key: str, generation: int, suffix: str = "") -> str:
    """`checkpoint-000007` / `importance_history-000007.npz`: a generation's file name."""
    return f"{FILES[prefix_key]}{generation:0{FILES['generation_digits']}d}{suffix}"


def js_module() -> str:
    """export/js/contract.mjs: the contract as an ES module (the JS learner's only copy).

    Regenerate with `python -m softmask_format.contract > export/js/contract.mjs`; a test
    fails when the committed file differs from this text.
    """
    body = json.dumps(CONTRACT, indent=2, sort_keys=True)
    return (
        "// Generated from export/softmask_format/device_contract.json by\n"
        "// `python -m softmask_format.contract > export/js/contract.mjs`: do not edit.\n"
        f"export const CONTRACT = Object.freeze({body});\n"
    )


if __name__ == "__main__":
    print(js_module(), end="")
