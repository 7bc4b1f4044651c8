"""``kdcli export``: a kdcli model to ONNX, verified against PyTorch on real inputs.

The graph takes raw inputs (for MNIST: float32 pixels 0-255, shape ``[batch, 28, 28]``);
scaling, normalization and flattening are inside it, and BatchNorm is folded into the
convolutions before it. The inputs are the modality's (see
:meth:`kdcli.modalities.base.Modality.inputs`: for images and tables one float32 input named
``input``, with a dynamic batch); outputs ``logits`` and/or ``probabilities`` (softmax at
T = 1). Every export is checked with
``onnx.checker`` (full check) and by running onnxruntime against torch; a file that fails
is removed.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kdcli import __version__
from kdcli.checks import check_opset
from kdcli.data.base import DataOptions, recorded_options
from kdcli.data.sources import load_data, recorded_data
from kdcli.errors import ExportError, FormatError, UsageError, first_line
from kdcli.io.files import atomic_output, check_output, require_file, write_error
from kdcli.modalities import modality_for, modality_of
from kdcli.modalities.base import Modality
from kdcli.output import Reporter
from kdcli.resources import check_memory
from kdcli.students.base import fold_batchnorm
from kdcli.students.model_file import ModelFile, load_model
from kdcli.students.subwords import (
    TOKENIZER_FILE,
    TokenInputs,
    export_json,
    graph_inputs,
    sha256_text,
    summary,
)
from kdcli.students.table_encoding import (
    TableEncoding,
    table_check_inputs,
    table_columns_of,
    table_units,
    with_columns,
)
from kdcli.teachers.inputs import match_columns

OUTPUT_MODES = {"logits": ["logits"], "probs": ["probabilities"],
                "both": ["logits", "probabilities"]}


def main_export(model: str | Path = "student.safetensors", output: str | Path = "student.onnx",
                *, opset: int | None = None, outputs: str = "logits", batch: str = "dynamic",
                atol: float = 1e-4, data: str | None = None, check_examples: int = 1000,
                force: bool = False, verbose: bool = False,
                reporter: Reporter | None = None,
                data_options: DataOptions | None = None) -> dict[str, Any]:
    """Export a kdcli model file to ONNX and verify it.

    Args:
        model: A kdcli model file (student, teacher or baseline).
        output: The ``.onnx`` path.
        opset: ONNX opset (default: the exporter's).
        outputs: ``logits``, ``probs`` or ``both``.
        batch: ``dynamic`` or a fixed batch size.
        atol: Largest allowed absolute logit difference between onnxruntime and torch.
        data: Data for the check (default: the data recorded in the model file, if it is
            bundled with kdcli; a recorded path is refused: name it again).
        check_examples: How many examples to check on.
        force: Overwrite ``output``.
        verbose: Show the exporter's own messages and warnings.
        reporter: Output sink.
        data_options: How a table or image folder is read for the check (default: as the
            model file records).

    Returns:
        The verification report: max difference, agreement, size, opset, op counts.

    Raises:
        ExportError: export failed, or the ONNX model disagrees with torch.
    """
    rep = reporter or Reporter()
    if outputs not in OUTPUT_MODES:
        raise UsageError(f"unknown --outputs {outputs!r}", "Use logits, probs or both")
    fixed = _parse_batch(batch)
    opset = check_opset(opset)
    if not atol > 0:
        raise UsageError(f"--atol must be positive, got {atol}", "Try --atol 1e-4")
    check_output(output, force, inputs=[model])
    require_file(model, "model file")
    try:
        mf = load_model(model)
    except FormatError as e:
        raise FormatError(f"{e.message}; kdcli export takes a kdcli model file",
                          "Train one with kdcli train or kdcli train-student") from e
    _check_batch_memory(fixed, mf)
    text, tokens = mf.preprocessing.is_text, mf.preprocessing.tokenizer is not None
    beside = _tokenizer_beside(mf, output, force, model)
    columns = table_columns_of(mf.preprocessing)
    if (text or columns) and fixed is not None:
        raise UsageError(f"a {'text' if text else 'table'} student is exported with a "
                         "dynamic batch", "Leave out --batch")
    x_check = (_text_inputs if text else _table_inputs if mf.preprocessing.table else
               _check_inputs)(mf, data, fixed, check_examples, data_options)
    start = time.perf_counter()
    with atomic_output(output, force) as tmp:
        # BatchNorm folded into its convolutions; verify() checks against the unfolded model
        net = fold_batchnorm(mf.model)
        log = _to_onnx(TokenInputs(net) if tokens else net, OUTPUT_MODES[outputs],
                       list(mf.preprocessing.raw_shape), fixed, opset, tmp, verbose,
                       modality_of(mf.preprocessing))
        if verbose and log.strip():
            rep.err.print(log.rstrip(), markup=False, highlight=False)
        proto = onnx.load(str(tmp))
        if text and not tokens:  # the words from strings, inside the graph: string [batch] in
            _check_graph(proto)  # the student's part in full (see _check_graph)
            proto = _with_words(proto, mf)
        elif columns:  # one input per column, strings for categories
            proto = with_columns(proto, mf.preprocessing)
        _set_metadata(proto, mf, outputs, x_check[2] if tokens else None)
        onnx.save(proto, str(tmp))
        report = verify(tmp, mf.model, x_check[0], OUTPUT_MODES[outputs], atol, x_check[1],
                        full_check=tokens or not text)
        if opset is not None and report["opset"] != opset:
            raise ExportError(f"--opset {opset} was asked for, but the exporter wrote opset "
                              f"{report['opset']}; nothing was written",
                              "Try another --opset, or leave it out")
        if beside is not None:  # written last, so nothing stays when the check fails
            with atomic_output(beside, force) as tok_tmp:
                tok_tmp.write_text(x_check[2], encoding="utf-8")
    if beside is not None:
        report["tokenizer"] = str(beside)
    report.update(out=str(output), model=str(model), outputs=OUTPUT_MODES[outputs],
                  batch="dynamic" if fixed is None else fixed,
                  seconds=round(time.perf_counter() - start, 2))
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report["op_counts"].items()))
    rep.table(f"Exported {output}", ["", "value"], [
        ["max |logit diff| vs torch", f"{report['max_abs_diff']:.3g} (atol {atol:g})"],
        ["argmax agreement", f"{100 * report['agreement']:.2f}% of {report['checked']}"],
        ["file size", f"{report['file_bytes']:,} bytes"], ["opset", report["opset"]],
        ["ops", ops], ["batch", report["batch"]]])
    return report


def _parse_batch(batch: str | int) -> int | None:
    if str(batch) == "dynamic":
        return None
    try:
        n = int(batch)
    except ValueError as e:
        raise UsageError(f"bad --batch {batch!r}", "Use dynamic or a positive number") from e
    if n <= 0:
        raise UsageError(f"--batch must be positive, got {n}", "Use dynamic or e.g. 1")
    return n


def _check_batch_memory(fixed: int | None, mf: ModelFile) -> None:
    """Refuse a fixed batch whose input, traced and checked, cannot fit in memory."""
    if fixed is not None:
        per_example = 4 * 3 * math.prod(mf.preprocessing.raw_shape)  # input, copies, check
        check_memory(fixed * per_example, f"--batch {fixed}",
                     "Lower --batch, or use --batch dynamic")


def _check_data(mf: ModelFile, data: str | None, rows: int,
                data_options: DataOptions | None) -> Any:
    """The data the export is checked on: ``data``, else the data the model records."""
    spec = data or recorded_data(mf.training, "test_data", "data")
    if not spec:
        raise UsageError("the model records no data source to check the export on",
                         "Pass --data with examples the model takes")
    ds = load_data(spec, limit=rows, options=recorded_options(data_options, mf.training))
    if ds.is_text != mf.preprocessing.is_text:
        raise UsageError(f"--data {spec} holds {'texts' if ds.is_text else 'no texts'}, but "
                         f"the model takes {'texts' if mf.preprocessing.is_text else 'tensors'}",
                         "Pass --data the model was trained on")
    return ds


def _text_inputs(mf: ModelFile, data: str | None, fixed: int | None, count: int,
                 data_options: DataOptions | None = None
                 ) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor]]:
    """Real texts for the check of a text student: the strings onnxruntime gets, and the
    word ids torch gets; a subword student's ``input_ids`` and ``attention_mask`` by the
    tokenizer written beside the graph, the token ids + 1 torch gets, and that
    tokenizer's JSON."""
    from kdcli.training.text import encode

    strings = _check_data(mf, data, count, data_options).inputs.strings()
    if mf.preprocessing.tokenizer is not None:
        text = export_json(mf.preprocessing)
        return graph_inputs(text, strings), (encode(strings, mf.preprocessing),), text
    return ({"text": np.array(strings, dtype=object)},
            (encode(strings, mf.preprocessing),))


def _table_inputs(mf: ModelFile, data: str | None, fixed: int | None, count: int,
                  data_options: DataOptions | None = None
                  ) -> tuple[dict[str, Any], tuple[torch.Tensor]]:
    """Real table rows for the check of a student with a column encoding: what
    onnxruntime gets (one input per column, strings for categories; or the rows as
    ``input``), and the rows with the student's codes that torch gets."""
    names = TableEncoding.from_json(mf.preprocessing.table).names
    given = data_options or DataOptions()
    if given.feature_columns is None:  # the model's columns, by name
        given = replace(given, feature_columns=tuple(names))
    ds = _check_data(mf, data, count, given)
    rows = ds.inputs
    order = match_columns(names, ds.feature_names, "the model")
    if order is not None:  # --feature-columns named them in another order
        rows = rows[:, list(order)]
    return table_check_inputs(mf.preprocessing, rows, ds.categories)


def _with_words(proto: onnx.ModelProto, mf: ModelFile) -> onnx.ModelProto:
    """The student's graph (word ids in) with the vocabulary's nodes before it: string
    texts ``[batch]`` in (see :func:`kdcli.students.words.onnx_nodes`)."""
    from kdcli.students.words import WordVocab, onnx_model

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    words = onnx_model(WordVocab.from_json(mf.preprocessing.words),
                       mf.preprocessing.raw_shape[0], "text", "words_ids", opset=opset)
    words.ir_version = proto.ir_version
    merged = onnx.compose.merge_models(words, proto, io_map=[("words_ids", "input_ids")])
    merged.ir_version = proto.ir_version
    return merged


def _check_inputs(mf: ModelFile, data: str | None, fixed: int | None, count: int,
                  data_options: DataOptions | None = None
                  ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Real raw inputs for the check, as the model's named inputs (``[n, *shape]`` each),
    and as torch takes them."""
    ds = _check_data(mf, data, max(count, fixed or 0), data_options)
    raw = ds.inputs
    if list(raw.shape[1:]) != list(mf.preprocessing.raw_shape):
        raise UsageError(f"--data examples have shape {list(raw.shape[1:])}, but the model "
                         f"takes {mf.preprocessing.raw_shape}",
                         "Pass --data the model was trained on")
    if ds.feature_names is not None:
        from kdcli.training.table import refuse_gaps

        refuse_gaps(raw, ds.feature_names, ds.source, "the model")
    batch = modality_for(list(raw.shape[1:])).batch(raw)
    if fixed is not None:
        reps = -(-fixed // len(raw))
        rows = fixed * max(1, len(raw) // fixed)
        batch = {k: torch.cat([v] * reps)[:rows] for k, v in batch.items()}
    return batch, tuple(batch.values())


class Exportable(nn.Module):
    """A model's inputs, in the modality's order, -> its logits and/or probabilities: the
    first as ``input``, any others as the tuple ``more`` (the graph's input names are the
    modality's)."""

    def __init__(self, model: nn.Module, output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, input: torch.Tensor,  # noqa: A002 - one-input graphs name it so
                more: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
        logits = self.model(input, *more)
        if self.output_names == ["logits"]:
            return logits
        probs = torch.softmax(logits, dim=-1)
        return probs if self.output_names == ["probabilities"] else (logits, probs)


def _to_onnx(model: nn.Module, output_names: list[str], raw_shape: list[int],
             fixed: int | None, opset: int | None, path: Path, verbose: bool = False,
             modality: Modality | None = None) -> str:
    """Export with torch's exporter; return what it printed (shown only with --verbose)."""
    modality = modality or modality_for(raw_shape)
    first, *more = modality.example_inputs(raw_shape, fixed or 2).values()
    args = (first, tuple(more)) if more else (first,)  # as forward(input, more) takes them
    kwargs: dict[str, Any] = {"input_names": [s.name for s in modality.inputs(raw_shape)],
                              "output_names": output_names, "dynamo": True,
                              "external_data": False}
    if fixed is None:
        dims: dict[str, torch.export.Dim] = {}
        shapes = [{axis: dims.setdefault(dim, torch.export.Dim(dim, min=1))
                   for axis, dim in axes.items()}
                  for axes in modality.dynamic_axes(raw_shape).values()]
        kwargs["dynamic_shapes"] = (shapes[0], tuple(shapes[1:]))[:len(args)]
    if opset is not None:
        kwargs["opset_version"] = opset
    buf = io.StringIO()
    if not verbose:  # torch logs straight to its own handlers; mute them for the export
        logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(Exportable(model, output_names).eval(), args, str(path),
                              **kwargs)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        cause = _write_failure(e, path)
        if cause is not None:  # a full disk or read-only folder, not the exporter's fault:
            raise cause from e  # atomic_output names the output
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"the ONNX exporter failed: {first}",
                          "Rerun with --verbose for its log; try another --opset") from e
    finally:
        logging.disable(logging.NOTSET)
    return buf.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)


def _write_failure(exc: BaseException, path: Path) -> BaseException | None:
    """The write error (disk full, read-only, ...) in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if write_error(path, e) is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _tokenizer_beside(mf: ModelFile, output: str | Path, force: bool, model: str | Path,
                      ) -> Path | None:
    """Where a subword student's tokenizer is written beside its graph (refused like the
    ``.onnx`` when it exists, without ``--force``); None for other students."""
    if mf.preprocessing.tokenizer is None:
        return None
    return check_output(Path(output).with_name(TOKENIZER_FILE), force, inputs=[model])


def _set_metadata(proto: onnx.ModelProto, mf: ModelFile, outputs: str,
                  tokenizer: str | None = None) -> None:
    pre = mf.preprocessing.to_dict()
    units = (f"{pre['units']} as float32, shape [batch, "
             f"{', '.join(map(str, pre['raw_shape']))}]; normalization is inside")
    if mf.preprocessing.table is not None:
        units = table_units(mf.preprocessing)
    if mf.preprocessing.words is not None:  # the vocabulary is in the graph: its hash here
        from kdcli.students.words import WordVocab

        vocab = WordVocab.from_json(mf.preprocessing.words)
        pre["words"] = {"rules": pre["words"]["rules"], "size": len(vocab),
                        "sha256": vocab.sha256()}
        units = (f"UTF-8 strings, shape [batch]; split into words (at most "
                 f"{pre['raw_shape'][0]}) and looked up in the vocabulary inside the graph")
    if tokenizer is not None:  # the tokenizer beside the graph: its name and hash here
        pre["tokenizer"] = summary(mf.preprocessing.tokenizer)
        units = (f"input_ids and attention_mask, int64 [batch, tokens] (at most "
                 f"{pre['raw_shape'][0]} tokens), from the {TOKENIZER_FILE} beside this file")
    props = {
        "kdcli_version": __version__,
        "architecture": mf.arch.spec(),
        "architecture_json": json.dumps(mf.arch.to_dict()),
        "preprocessing": json.dumps(pre),
        "input_units": units,
        "num_classes": str(mf.num_classes),
        "outputs": outputs,
        "training": json.dumps(_training_summary(mf.training), default=float),
    }
    if tokenizer is not None:
        props.update(tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_text(tokenizer))
    if mf.class_names is not None:
        props["class_names"] = json.dumps(mf.class_names)
    if mf.feature_names is not None:
        props["feature_names"] = json.dumps(mf.feature_names)
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _training_summary(training: dict[str, Any]) -> dict[str, Any]:
    keys = ("command", "data", "T", "alpha", "loss", "epochs", "test_errors", "test_data",
            "transfer_sha256")
    out = {k: training[k] for k in keys if training.get(k) is not None}
    if training.get("teachers"):
        out["teachers"] = [{"file": t.get("file"), "sha256": t.get("sha256"),
                            "test_errors": (t.get("training") or {}).get("test_errors")}
                           for t in training["teachers"]]
    return out


def _check_graph(proto: onnx.ModelProto | str, full: bool = True) -> None:
    """``onnx.checker`` on a graph, with shape inference (``full``) or without: onnx's
    strict shape inference crashes the process on a ``LabelEncoder`` fed by the words'
    ``Tokenizer`` (onnx 1.23), so a text student's graph is checked in full before its
    words are joined, and the joined graph without it (onnxruntime then runs it).

    Raises:
        ExportError: the checker rejects the graph.
    """
    try:
        onnx.checker.check_model(proto, full_check=full)
    except Exception as e:  # noqa: BLE001 - checker raises ValidationError and others
        raise ExportError(f"onnx.checker rejected the export: {first_line(e, limit=None)}",
                          "Try another --opset, or report this bug") from e


def verify(path: Path, model: nn.Module, x: Mapping[str, Any],
           output_names: list[str], atol: float,
           torch_x: tuple[torch.Tensor, ...] | None = None,
           full_check: bool = True) -> dict[str, Any]:
    """Check an exported file: ``onnx.checker`` and onnxruntime against torch.

    Args:
        path: The ONNX file.
        model: The torch model it was exported from.
        x: Real raw inputs by name, each ``[n, *shape]`` (see :func:`_check_inputs`): tensors,
            or numpy arrays (a text student's strings).
        output_names: The graph's outputs.
        atol: Largest allowed absolute logit difference.
        torch_x: The same inputs as ``model`` takes them (default: ``x``'s values).
        full_check: Run ``onnx.checker`` with shape inference (see :func:`_check_graph`).

    Raises:
        ExportError: a check failed.
    """
    rows = len(next(iter(x.values())))
    _check_graph(str(path), full=full_check)  # by path: a model over 2 GB is checked too
    proto = onnx.load(str(path))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        batch = sess.get_inputs()[0].shape[0]
        step = batch if isinstance(batch, int) else rows
        got = [sess.run(None, {k: np.asarray(v[i:i + step]) for k, v in x.items()})
               for i in range(0, rows - step + 1, step)]
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot run the export: {first_line(e, limit=None)}",
                          "Try another --opset") from e
    n = sum(len(g[0]) for g in got)
    with torch.inference_mode():
        ref = model(*(v[:n] for v in (torch_x or tuple(x.values())))).float()
    first = torch.from_numpy(np.concatenate([g[0] for g in got]))
    if output_names == ["probabilities"]:
        ref = torch.softmax(ref, -1)
    diff = float((first - ref).abs().max())
    agree = float((first.argmax(-1) == ref.argmax(-1)).float().mean())
    if not diff <= atol or agree < 1.0:
        raise ExportError(
            f"the ONNX model disagrees with torch: max |diff| {diff:.3g} > atol {atol:g} "
            f"or argmax agreement {100 * agree:.2f}% < 100%; the file was removed",
            "Report this bug; a larger --atol only hides it")
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"max_abs_diff": diff, "agreement": agree, "checked": n,
            "file_bytes": Path(path).stat().st_size, "opset": opset, "op_counts": dict(ops)}
