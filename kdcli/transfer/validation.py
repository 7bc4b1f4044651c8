"""The checks of a transfer set: its files, their metadata and every stored value.

A file is refused (FormatError, saying what is wrong) unless its header, tensors, shapes,
dtypes and metadata agree with docs/formats.md and with each other; its targets form
(:mod:`kdcli.transfer.targets`) checks its own tensors. With ``verify`` the checksums are
read too; :func:`check_values` checks every stored row.
"""

from __future__ import annotations

import codecs
import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

from kdcli.errors import FormatError
from kdcli.io.storage import DATA_SHA256, MappedFile, data_sha256
from kdcli.students.model_file import check_format
from kdcli.transfer.ensemble import COMBINE_RULES
from kdcli.transfer.layout import (
    COLUMNS_VERSION,
    TEXT_BYTES,
    TEXT_SPANS,
    TEXT_VERSION,
    TRANSFER_FORMAT,
    TRANSFER_FORMAT_VERSION,
    clip,
    row_count,
)
from kdcli.transfer.targets import FORMS, StoredSet, Targets, finite_rows, form_named


def check_file(p: Path, tensors: dict[str, torch.Tensor], raw_meta: dict[str, str]
               ) -> tuple[dict[str, Any], Targets]:
    """Validate one transfer-set file's metadata and tensor shapes; return the decoded
    metadata and the form of its targets."""
    check_format(raw_meta, p, TRANSFER_FORMAT, TRANSFER_FORMAT_VERSION)
    meta = decode_meta(p, raw_meta)
    form_type = form_named(p, meta.get("targets", "dense"))
    text = _check_kind(p, tensors, meta, raw_meta)
    inputs_keys = (TEXT_BYTES, TEXT_SPANS) if text else ("inputs",)
    missing = [k for k in (*inputs_keys, *form_type.required) if k not in tensors]
    if missing:
        raise FormatError(f"{p} lacks the tensor(s) {', '.join(missing)}",
                          "Regenerate it with kdcli soft-targets")
    form = form_type.from_file(p, tensors, meta)
    n = row_count(tensors)
    labels = tensors.get("labels")
    if labels is not None and labels.shape != (n,):
        raise FormatError(f"{p} has labels of shape {tuple(labels.shape)} for {n} inputs",
                          "Regenerate the file")
    if n == 0:
        raise FormatError(f"{p} holds no examples", "Regenerate it from non-empty data")
    _check_dtypes(p, tensors)
    if text:
        check_texts(p, tensors[TEXT_BYTES], tensors[TEXT_SPANS], meta)
    _check_meta_agrees(p, tensors, meta, form)
    _check_meta_describes(p, tensors, meta, form)
    return meta, form


def _check_kind(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                raw_meta: dict[str, str]) -> bool:
    """Whether the file holds texts: its metadata says ``inputs: text`` (from version 4
    on), and then it has text tensors and no ``inputs``; otherwise no text tensors."""
    kind = meta.get("inputs", "tensor")
    text_tensors = [k for k in (TEXT_BYTES, TEXT_SPANS) if k in tensors]
    if kind not in ("tensor", "text"):
        raise FormatError(f"{p} records inputs {clip(kind)!r}, not 'text' or 'tensor'",
                          "Regenerate it with kdcli soft-targets")
    if kind == "text" and int(raw_meta["format_version"]) < TEXT_VERSION:
        raise FormatError(f"{p} records text inputs, which {TRANSFER_FORMAT} has from version "
                          f"{TEXT_VERSION}, but is version {raw_meta['format_version']}",
                          "The file is damaged; regenerate it")
    if kind == "text" and "inputs" in tensors:
        raise FormatError(f"{p} records text inputs but holds an inputs tensor",
                          "Regenerate it with kdcli soft-targets")
    if kind == "tensor" and text_tensors:
        raise FormatError(f"{p} holds {', '.join(text_tensors)} but does not record text "
                          "inputs (inputs: text)", "Regenerate it with kdcli soft-targets")
    return kind == "text"


def check_texts(p: Path, buffer: torch.Tensor, spans: torch.Tensor, meta: dict[str, Any],
                chunk: int = 1 << 20) -> None:
    """A text set's promises (docs/formats.md): ``text_bytes`` is 1-D, ``text_spans``
    ``[N, P, 2]`` with P = 1 or 2 (as many as ``text_columns`` names); the spans tile the
    bytes (the first text starts at 0, each ends at or after its start, the next starts
    where it ends, the last ends at the end); the bytes are UTF-8 and no text starts inside
    a character. Read in chunks of ``chunk`` spans or bytes.

    Raises:
        FormatError: saying which promise fails, and at which row.
    """
    def bad(what: str) -> FormatError:
        return FormatError(f"{p} has malformed texts: {what}", "Regenerate it with kdcli "
                           "soft-targets")

    if buffer.dim() != 1:
        raise bad(f"text_bytes has shape {tuple(buffer.shape)}, not [bytes]")
    if spans.dim() != 3 or spans.shape[2] != 2 or spans.shape[1] not in (1, 2):
        raise bad(f"text_spans has shape {tuple(spans.shape)}, not [N, P, 2] with P 1 or 2")
    cols = meta.get("text_columns")
    if cols is not None and not (isinstance(cols, list) and len(cols) == spans.shape[1]
                                 and all(isinstance(c, str) for c in cols)):
        raise bad(f"text_columns {clip(cols)} does not name the {spans.shape[1]} texts of a row")
    width, end, size = int(spans.shape[1]), 0, len(buffer)
    flat = spans.reshape(-1, 2)
    for a in range(0, len(flat), chunk):
        part = flat[a:a + chunk]
        starts = torch.cat([torch.tensor([end]), part[:-1, 1]])
        bad_rows = ((part[:, 0] != starts) | (part[:, 1] < part[:, 0])).nonzero()
        if len(bad_rows):
            i = a + int(bad_rows[0, 0])
            raise bad(f"text {i % width + 1} of row {i // width} spans bytes "
                      f"{flat[i].tolist()}, which do not follow the text before it")
        inside = part[:, 0][part[:, 0] < size]
        cont = ((buffer[inside] & 0xC0) == 0x80).nonzero()
        if len(cont):
            i = a + int((part[:, 0] < size).nonzero()[int(cont[0, 0]), 0])
            raise bad(f"text {i % width + 1} of row {i // width} starts inside a UTF-8 "
                      "character")
        end = int(part[-1, 1])
    if end != size:
        raise bad(f"the texts end at byte {end:,}, but text_bytes holds {size:,}")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    for a in range(0, size, chunk * 16):
        try:
            decoder.decode(buffer[a:a + chunk * 16].numpy().tobytes(), final=a + chunk * 16 >= size)
        except UnicodeDecodeError as e:
            at = a + e.start
            row = int(torch.searchsorted(flat[:, 1].contiguous(), torch.tensor(at), right=True))
            raise bad(f"text_bytes is not UTF-8 at byte {at:,} (row {row // width})") from None


# The dtypes docs/formats.md allows for each tensor (inputs: any numeric dtype but bool).
_ALLOWED_DTYPES = {"labels": ("int64",), TEXT_BYTES: ("uint8",), TEXT_SPANS: ("int64",),
                   **{k: v for form in FORMS.values() for k, v in form.dtypes.items()}}


def _check_dtypes(p: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        allowed = _ALLOWED_DTYPES.get(name)
        got = str(t.dtype).removeprefix("torch.")
        if allowed and got not in allowed:
            raise FormatError(f"{p} stores {name} as {got}, not {' or '.join(allowed)}",
                              "Regenerate it with kdcli soft-targets")
        if name == "inputs" and got == "bool":
            raise FormatError(f"{p} stores inputs as bool", "Regenerate it")


def _check_meta_agrees(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       form: Targets) -> None:
    """Metadata that describes the tensors must agree with them."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{p} has metadata that contradicts its tensors: {what}",
                           "Regenerate it with kdcli soft-targets")

    try:
        c = int(meta["num_classes"]) if "num_classes" in meta else None
        k = int(meta["top_k"]) if "top_k" in meta else None
    except ValueError:
        raise bad(f"num_classes {meta.get('num_classes')!r}, top_k "
                  f"{meta.get('top_k')!r}") from None
    conflict = form.meta_conflict(c, k)
    if conflict:
        raise bad(conflict)
    combine = meta.get("combine")
    if combine is not None and combine not in COMBINE_RULES:
        raise FormatError(f"{p} records an unknown combine rule {clip(combine)!r}",
                          f"It must be one of {', '.join(COMBINE_RULES)}; regenerate the set")
    weights, teachers = meta.get("weights"), meta.get("teachers")
    if weights is not None:
        if not (isinstance(weights, list) and weights and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and
                math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0):
            raise bad(f"weights {clip(weights)} are not non-negative numbers")
        if abs(sum(weights) - 1) > 1e-6:
            raise bad(f"weights {clip(weights)} do not sum to 1")
    if teachers is not None and not (isinstance(teachers, list) and
                                     all(isinstance(t, dict) for t in teachers)):
        raise bad("teachers is not a list of records")
    members = tensors.get("member_logits")
    m = int(members.shape[0]) if members is not None else None
    counts = {"weights": len(weights) if isinstance(weights, list) else None,
              "teachers": len(teachers) if isinstance(teachers, list) else None,
              "member_logits": m}
    known = {name: v for name, v in counts.items() if v is not None}
    if len(set(known.values())) > 1:
        raise bad("different member counts: " +
                  ", ".join(f"{name} {v}" for name, v in known.items()))
    _check_feature_names(tensors, meta, bad)


def _check_feature_names(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                         bad: Any) -> None:
    """A table's ``feature_names`` name each column of ``inputs`` once."""
    names, inputs = meta.get("feature_names"), tensors.get("inputs")
    if names is not None and inputs is not None and inputs.dim() == 2:
        if len(names) != int(inputs.shape[1]):
            raise bad(f"{len(names)} feature_names for inputs of {int(inputs.shape[1])} "
                      "columns")
        if len(set(names)) != len(names):
            raise bad(f"feature_names name a column twice ({clip(names)})")


def _check_meta_describes(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          form: Targets) -> None:
    """The rest of what the metadata says about the tensors: at least two classes and as
    many class names, what the form checks (:meth:`Targets.meta_problem`), an ensemble's
    weights, and the teachers' input shapes."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{p} has metadata that contradicts its tensors: {what}",
                           "Regenerate it with kdcli soft-targets")

    c = form.num_classes
    if c < 2:
        raise bad(f"{c} class(es); a classifier's targets need at least 2")
    names = meta.get("class_names")
    if names is not None and len(names) != c:
        raise bad(f"{len(names)} class_names for {c} classes")
    problem = form.meta_problem(tensors, meta)
    if problem:
        raise bad(problem)
    teachers = meta.get("teachers")
    if isinstance(teachers, list) and len(teachers) > 1 and meta.get("weights") is None:
        raise bad(f"{len(teachers)} teachers but no weights")
    if "inputs" not in tensors:
        return  # texts: a teacher's inputs have no shape
    sample = list(tensors["inputs"].shape[1:])
    for t in teachers if isinstance(teachers, list) else []:
        shape, pre = t.get("input_shape"), t.get("preprocessing")
        if shape is None or (isinstance(pre, dict) and pre.get("size")):
            continue  # not recorded, or resized images (any input size)
        if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape) and
                math.prod(shape) == math.prod(sample)):
            raise bad(f"teacher {clip(t.get('file'))!r} has input_shape {clip(shape)}, "
                      f"but the inputs are {sample}")


def decode_meta(p: Path, raw: dict[str, str]) -> dict[str, Any]:
    """A file's metadata with its JSON fields parsed, refused unless T is positive and the
    names are lists of strings."""
    meta: dict[str, Any] = dict(raw)
    try:
        for k in ("weights", "teachers", "classes", "class_names", "feature_names",
                  "data_options", "text_columns", "categories"):
            if k in meta:
                meta[k] = json.loads(meta[k])
        T = float(meta["T"])
    except (KeyError, ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else clip(e)
        raise FormatError(f"{p} has bad or missing metadata ({what})", "Regenerate it") from None
    if not (T > 0 and math.isfinite(T)):
        raise FormatError(f"{p} records T={meta['T']}", "Regenerate it with a positive --T")
    for k in ("class_names", "feature_names"):
        names = meta.get(k)
        if names is not None and not (isinstance(names, list) and
                                      all(isinstance(n, str) for n in names)):
            raise FormatError(f"{p} records {k} that are not a list of strings",
                              "Regenerate it")
    _check_categories(p, meta, int(raw["format_version"]))
    return meta


def _check_categories(p: Path, meta: dict[str, Any], version: int) -> None:
    """``categories`` (version 5 on): feature column name -> its distinct category strings,
    for columns that ``feature_names`` names."""
    cats = meta.get("categories")
    if cats is None:
        return
    if version < COLUMNS_VERSION:
        raise FormatError(f"{p} records categories, which {TRANSFER_FORMAT} has from version "
                          f"{COLUMNS_VERSION}, but is version {version}",
                          "The file is damaged; regenerate it")
    names = meta.get("feature_names") or []
    ok = isinstance(cats, dict) and all(
        k in names and isinstance(v, list) and v and all(isinstance(c, str) for c in v)
        and len(set(v)) == len(v) for k, v in cats.items())
    if not ok:
        raise FormatError(f"{p} records categories that are not feature columns, each with "
                          "a list of distinct strings", "Regenerate it with kdcli soft-targets")


def verify_file(p: Path, tensors: dict[str, torch.Tensor], raw_meta: dict[str, str],
                 mapped: MappedFile, inputs_hash: Any) -> None:
    """Check a file's ``data_sha256`` (required from version 3 on), feeding its ``inputs``
    bytes to ``inputs_hash`` (a SHA-256 running over the set's files) in the same read."""
    recorded = raw_meta.get(DATA_SHA256)
    if recorded is None and int(raw_meta["format_version"]) >= 3:
        raise FormatError(f"{p} is {TRANSFER_FORMAT} version {raw_meta['format_version']} but "
                          f"records no {DATA_SHA256}", "The file is damaged; regenerate it")
    key = TEXT_BYTES if TEXT_BYTES in tensors else "inputs"
    x = tensors[key]
    lo = mapped.offsets[key]
    digest = data_sha256(mapped, (lo, lo + x.numel() * x.element_size()), inputs_hash)
    if recorded is not None and digest != recorded:
        raise FormatError(f"{p} fails its checksum ({DATA_SHA256}): its tensors are not the "
                          "bytes that were written",
                          "The file is damaged; regenerate it or copy it again")


def verify_inputs(p: Path, meta: dict[str, Any], digest: str) -> None:
    """The inputs of a whole set (``digest``, their SHA-256) must be what it records."""
    recorded = meta.get("inputs_sha256")
    if recorded is not None and digest != recorded:
        raise FormatError(f"{p} records an inputs_sha256 that its inputs do not have",
                          "The inputs were altered or the metadata belongs to another set; "
                          "regenerate it")


def check_counts(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  n: int) -> None:
    """The metadata's example and class counts must agree with a whole set's tensors."""
    recorded = meta.get("num_examples")
    if recorded is not None and str(recorded) != str(n):
        raise FormatError(f"{p} records num_examples={recorded}, but holds {n} examples",
                          "Regenerate it")


def check_index_fields(p: Path, shards: list[Any], index_meta: Any) -> None:
    """The index's own fields must have the types docs/formats.md gives them."""
    if not isinstance(index_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in index_meta.items()):
        raise FormatError(f"{p}: metadata must be an object of strings",
                          "Regenerate it with kdcli soft-targets")
    for i, s in enumerate(shards):
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and all(
            type(s.get(k)) is int and s[k] >= 0 for k in ("row_start", "rows")) and (
            "bytes" not in s or (type(s["bytes"]) is int and s["bytes"] >= 0))
        if not ok:
            raise FormatError(f"{p}: shard entry {i + 1} is malformed ({clip(s)})",
                              "Each needs a file name and integer row_start, rows and bytes; "
                              "regenerate the set")


def check_values(ts: StoredSet, form: Targets, path: Path) -> None:
    """Check every stored row of ``ts`` (the set at ``path``), in one pass of chunks
    (FormatError naming rows): float inputs finite, the form's own checks
    (:meth:`Targets.value_checks`), labels in ``[0, C)``."""
    checks = form.value_checks()
    if "inputs" in ts.columns and ts.columns["inputs"].dtype.is_floating_point:
        checks = (("inputs", _inputs_ok), *checks)
    labels_ok = functools.partial(_labels_ok, form.num_classes)
    for name, rule in (*checks, ("labels", labels_ok)):
        if name not in ts.columns:
            continue
        for start, chunk in ts.columns[name].chunks():
            problem = rule(ts, start, chunk)
            if problem:
                what, ok = problem
                rows = (start + (~ok).nonzero()[:5, 0]).tolist()
                raise FormatError(f"{path} has {what} (rows {rows})",
                                  "Regenerate it with kdcli soft-targets; check the "
                                  "teacher's outputs")


def _inputs_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    """Float inputs are finite, except (version 5 on) a table's missing numbers (NaN); its
    category columns hold codes of their categories."""
    if int(ts.meta.get("format_version", 0)) < COLUMNS_VERSION or chunk.dim() != 2:
        ok = finite_rows(chunk)
        return None if bool(ok.all()) else ("NaN or Inf in inputs", ok)
    ok = ~torch.isinf(chunk).any(1)
    if not bool(ok.all()):
        return "infinite inputs", ok
    names = ts.meta.get("feature_names") or []
    for name, cats in (ts.meta.get("categories") or {}).items():
        col = chunk[:, names.index(name)]
        ok = (col >= 0) & (col < len(cats)) & (col == col.floor())
        if not bool(ok.all()):
            return f"codes of column {name!r} outside its {len(cats)} categories", ok
    return None


def _labels_ok(num_classes: int, ts: StoredSet, start: int, chunk: torch.Tensor):
    ok = (chunk >= 0) & (chunk < num_classes)
    return None if bool(ok.all()) else (f"labels outside [0, {num_classes})", ok)
