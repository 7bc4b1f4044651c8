"""Digests of kdcli output files that ignore what differs from run to run by design.

Usage: python benchmarks/fixed_digest.py FILE...  (prints ``digest  name`` lines)

A model file or transfer set records when it was made (``created``) and how long training
took (``seconds``); files that name other files record their SHA-256, which then differs
too. So each safetensors file is digested as its tensor bytes plus its metadata with those
fields removed and every SHA-256 value replaced by a placeholder; an ONNX file as its graph
and opset without metadata_props (the file's, and the exporter's per-node source
locations and class paths, which name kdcli's own modules); an index as its JSON the same
way. Everything else (every weight, logit, input, label, option and class name) must be
bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from pathlib import Path

_VOLATILE = {"created", "seconds"}
_SHA = re.compile(r"\b[0-9a-f]{64}\b")


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if k not in _VOLATILE}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, str):
        try:
            inner = json.loads(v)
        except ValueError:
            return _SHA.sub("<sha256>", v)
        if isinstance(inner, (dict, list)):
            return _clean(inner)
        return _SHA.sub("<sha256>", v)
    return v


def digest(path: Path) -> str:
    h = hashlib.sha256()
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        meta = _clean(header.pop("__metadata__", {}))
        h.update(json.dumps([header, meta], sort_keys=True).encode())
        h.update(raw[8 + n:])
    elif path.suffix == ".onnx":
        import onnx

        m = onnx.load(str(path))
        del m.metadata_props[:]
        for node in m.graph.node:  # the exporter's source locations and class names
            del node.metadata_props[:]
            node.doc_string = ""
        h.update(m.SerializeToString(deterministic=True))
    elif path.suffix == ".json":
        h.update(json.dumps(_clean(json.loads(raw)), sort_keys=True).encode())
    else:
        h.update(raw)
    return h.hexdigest()


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{digest(Path(name))}  {name}")
