"""ONNX teachers, run with onnxruntime: neural networks and ONNX-ML classifiers.

ONNX-ML classifiers (scikit-learn through skl2onnx; XGBoost and LightGBM through
onnxmltools) usually output a label and probabilities. kdcli takes the probabilities without
``--output`` and says so. A ZipMap output (``seq(map(int64 or string, float))``, one map per
example) becomes a probability tensor whose columns follow the ZipMap's class labels; string
labels become the class names. Inputs are cast to the declared type (``double``, ``int64``,
...). A declared input shape that contradicts the model's first operator is refused, naming
both shapes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from kdcli.errors import FormatError, ModelError, UsageError
from kdcli.io.storage import read_safetensors_metadata
from kdcli.output import Reporter
from kdcli.teachers.base import (
    TEXT,
    InputSpec,
    LoadRequest,
    NotScoresError,
    Teacher,
    TeacherFormat,
    names_from_json,
    short,
)
from kdcli.teachers.onnx_columns import ColumnsFeed, graph_columns, takes_columns
from kdcli.teachers.onnx_session import open_session, run_session
from kdcli.teachers.onnx_text import (
    STRING_TYPE,
    TextFeed,
    classifier_labels,
    refuse_several_inputs,
    takes_strings,
    text_rank,
)
from kdcli.teachers.onnx_tokens import takes_tokens, tokens_feed

ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
              "tensor(uint8)": "uint8", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}
_LABEL_TYPES = ("tensor(int64)", "tensor(int32)", "tensor(string)")



class OnnxFormat(TeacherFormat):
    """An ONNX model, run with onnxruntime."""

    name = "onnx"
    picks_output = True

    def detect(self, path: Path) -> bool:
        return not path.is_dir() and is_onnx_file(path)

    def load(self, req: LoadRequest) -> Teacher:
        """The spec of the ONNX model at ``req.path``.

        Raises:
            FormatError: the file is corrupt or onnxruntime cannot run it.
            ModelError: the model takes several inputs, or its declared input shape
                contradicts its first operator.
            UsageError: several outputs and none is clearly the class scores.
        """
        path, name, notes = req.path, req.path.name, []
        meta: dict[str, Any] = {}
        sess, graph = open_session(path, req.device, notes, meta)
        inputs = sess.get_inputs()
        out = choose_output(sess, req.opts.output_name, path, notes)
        if takes_tokens(inputs):
            return self._load_tokens(req, sess, graph, out, notes, meta)
        if takes_columns(inputs):
            return self._load_columns(req, sess, graph, out, notes, meta)
        refuse_several_inputs(name, inputs)
        if len(inputs) != 1:
            raise ModelError(f"{path} takes {len(inputs)} inputs",
                             "kdcli teachers take one input")
        inp = inputs[0]
        _refuse_non_scores(name, graph, out, sess.get_outputs())
        if takes_strings(inputs):
            return self._load_text(req, sess, graph, out, notes, meta)
        dims = list(inp.shape)
        fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        rest, shape = dims[1:], req.user_shape
        if rest and all(isinstance(d, int) and d > 0 for d in rest) and shape is None:
            shape = tuple(int(d) for d in rest)
            _check_declared_shape(name, graph, inp.name, dims)
        spec = InputSpec(inp.name, ONNX_TYPES.get(inp.type, "float32"), shape)
        fields: dict[str, Any] = {}
        if out.type.startswith("seq(map("):
            keys = _zipmap_labels(graph, out.name)
            fields = _classes(name, keys, notes)
            fields["output"] = req.opts.output or "probs"
            runner = _ZipMapRunner(sess, spec.name, out.name, keys, path)
        else:
            runner = _TensorRunner(sess, spec.name, out.name, path)
        return req.teacher(self, runner, inputs=(spec,), fixed_batch=fixed_batch,
                           meta={"onnx_output": out.name}, notes=tuple(notes), **fields)

    def _load_columns(self, req: LoadRequest, sess: Any, graph: Any, out: Any,
                      notes: list[str], meta: dict[str, Any]) -> Teacher:
        """A model that takes a table one column per input (see
        :mod:`kdcli.teachers.onnx_columns`): it is given rows ``[B, k]`` of its k columns
        (by name, see :meth:`feature_names`), which its feed splits into its inputs."""
        path = req.path
        _refuse_non_scores(path.name, graph, out, sess.get_outputs())
        feed = ColumnsFeed([(i.name, i.type, len(i.shape)) for i in sess.get_inputs()], path)
        fields: dict[str, Any] = {}
        if out.type.startswith("seq(map("):
            keys = _zipmap_labels(graph, out.name)
            fields = _classes(path.name, keys, notes)
            fields["output"] = req.opts.output or "probs"
            runner: _TensorRunner = _ZipMapRunner(sess, None, out.name, keys, path, feed)
        else:
            runner = _TensorRunner(sess, None, out.name, path, feed)
            fields["class_names"] = classifier_labels(graph)
        return req.teacher(self, runner, inputs=(InputSpec("columns", "float32",
                                                           (len(feed.specs),)),),
                           meta={"onnx_output": out.name, "onnx_inputs": feed.names, **meta},
                           notes=tuple(notes), **fields)

    def with_categories(self, t: Teacher, categories: list[list[str] | None],
                        names: list[str]) -> Teacher:
        """A model of one input per column gets its category columns as strings."""
        feed = getattr(t.runner, "feed", None)
        if not isinstance(feed, ColumnsFeed):
            return super().with_categories(t, categories, names)
        runner = copy.copy(t.runner)
        runner.feed = feed.bound(categories, names)
        return replace(t, runner=runner)

    def _load_text(self, req: LoadRequest, sess: Any, graph: Any, out: Any,
                   notes: list[str], meta: dict[str, Any]) -> Teacher:
        """A text teacher: the model's one input is a tensor of strings (``[N]`` or
        ``[N, 1]``), fed the batch's texts as they are."""
        inp, path = sess.get_inputs()[0], req.path
        feed = TextFeed(text_rank(path.name, inp), path)
        fields: dict[str, Any] = {}
        if out.type.startswith("seq(map("):
            keys = _zipmap_labels(graph, out.name)
            fields = _classes(path.name, keys, notes)  # probabilities or scores: probed
            runner: _TensorRunner = _ZipMapRunner(sess, inp.name, out.name, keys, path, feed)
        else:
            runner = _TensorRunner(sess, inp.name, out.name, path, feed)
            fields["class_names"] = classifier_labels(graph)
        return req.teacher(self, runner, inputs=(InputSpec(inp.name, TEXT),),
                           meta={"onnx_output": out.name, **meta}, notes=tuple(notes),
                           **fields)

    def _load_tokens(self, req: LoadRequest, sess: Any, graph: Any, out: Any,
                     notes: list[str], meta: dict[str, Any]) -> Teacher:
        """A text teacher that takes ``input_ids`` and ``attention_mask``: a kdcli export of
        a subword student, whose tokenizer beside it makes them from the batch's texts (see
        :mod:`kdcli.teachers.onnx_tokens`)."""
        path = req.path
        _refuse_non_scores(path.name, graph, out, sess.get_outputs())
        feed = tokens_feed(path, sess.get_modelmeta().custom_metadata_map)
        runner = _TensorRunner(sess, None, out.name, path, feed)
        return req.teacher(self, runner, inputs=(InputSpec("text", TEXT),),
                           meta={"onnx_output": out.name, **meta}, notes=tuple(notes))

    def param_count(self, t: Teacher) -> int:
        """Learned tensors only: float initializers of more than one value. Not the
        preprocessing's constants (scale, mean, std, also per channel or feature; a table
        encoding's fill values, means, stds and category codes), integer shapes, or a single
        value of any shape (``[]``, ``[1]``: a scale, an epsilon or an exponent the exporter
        wrote, such as attention's ``head_dim ** -0.25``; a learned tensor of one value is
        then not counted)."""
        m = onnx.load(str(t.path))
        constants = ("raw_mean", "raw_std", "0.fill", "0.mean", "0.std", "0.codes")
        arrays = (numpy_helper.to_array(i) for i in m.graph.initializer
                  if not any(c in i.name for c in constants))
        return int(sum(a.size for a in arrays if a.size > 1 and a.dtype.kind == "f"))

    def class_names(self, path: Path) -> list[str] | None:
        """The ``class_names`` a kdcli export records in its metadata, else the string class
        labels of an ONNX-ML classifier (skl2onnx's), in column order."""
        names = _recorded_names(path, "class_names")
        if names is not None or not path.is_file():
            return names
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - not readable: the loader says why
            return None
        return classifier_labels(graph)

    def feature_names(self, path: Path) -> list[str] | None:
        """The input names of a model of one input per column; else the
        ``feature_names`` a kdcli export records in its metadata (skl2onnx and onnxmltools
        record none for a model of one input)."""
        columns = _column_inputs(path)
        return columns if columns is not None else _recorded_names(path, "feature_names")

    def inspects(self, path: Path) -> bool:
        return path.is_file() and read_safetensors_metadata(path) is None and (
            path.suffix == ".onnx" or is_onnx_file(path))

    def inspect(self, path: Path, rep: Reporter) -> dict[str, Any]:
        return inspect_onnx(path, rep)


def _tensor_feed(x: torch.Tensor) -> np.ndarray:
    """A batch of prepared inputs as onnxruntime takes it."""
    return np.ascontiguousarray(x.numpy())


class _TensorRunner:
    """Runs the session on one input and returns the chosen output as a tensor; ``feed``
    makes the batch an array (a tensor's values, or a text model's strings)."""

    def __init__(self, sess: Any, input_name: str | None, output: str, where: Path,
                 feed: Callable[[Any], Any] = _tensor_feed) -> None:
        self.sess, self.input_name, self.output, self.where = sess, input_name, output, where
        self.feed = feed

    def feeds(self, x: Any) -> dict[str, Any]:
        """The session's inputs for a batch: the feed's array as the one input, or (no
        ``input_name``) the feed's own mapping of inputs."""
        return self.feed(x) if self.input_name is None else {self.input_name: self.feed(x)}

    def __call__(self, x: Any) -> torch.Tensor:
        (y,) = run_session(self.sess, [self.output], self.feeds(x), self.where)
        return torch.from_numpy(np.asarray(y))


class _ZipMapRunner(_TensorRunner):
    """Runs the session and turns its ZipMap output (one map per example) into a tensor
    whose columns follow ``keys``."""

    def __init__(self, sess: Any, input_name: str | None, output: str, keys: list,
                 where: Path, feed: Callable[[Any], Any] = _tensor_feed) -> None:
        super().__init__(sess, input_name, output, where, feed)
        self.keys = keys

    def __call__(self, x: Any) -> torch.Tensor:
        (rows,) = run_session(self.sess, [self.output], self.feeds(x), self.where)
        return torch.tensor([[row[k] for k in self.keys] for row in rows], dtype=torch.float32)


def _column_inputs(path: Path) -> list[str] | None:
    """The input names of a model that takes one input per table column, else None."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not readable as ONNX: no names
        return None
    return graph_columns(graph)


def _recorded_names(path: Path, key: str) -> list[str] | None:
    """The list of names the model's metadata records under ``key`` (None: none)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not readable as ONNX: no names
        return None
    return names_from_json({e.key: e.value for e in proto.metadata_props}.get(key))


def is_onnx_file(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with nodes and outputs."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as ONNX
        return False
    return len(model.graph.node) > 0 and len(model.graph.output) > 0


_SCORE_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")


def _refuse_non_scores(name: str, graph: Any, out: Any, outputs: list[Any]) -> None:
    """Labels (integer, string or boolean outputs) and an ONNX-ML regressor's predicted
    values are not class scores (a regressor's one column would be read as a binary logit)."""
    if not out.type.startswith("seq(map(") and out.type not in _SCORE_TYPES:
        scores = [o.name for o in outputs if o.type in _SCORE_TYPES or
                  o.type.startswith("seq(map(")]
        raise NotScoresError(f"{name}'s output {out.name!r} is {out.type} (labels or "
                             "flags), not class scores",
                             f"Choose its scores with --output ({', '.join(scores)})" if scores
                             else "Export the model with its probabilities or logits")

    ops = {n.op_type for n in graph.node if n.domain == "ai.onnx.ml"}
    regressors = sorted(op for op in ops if op.endswith("Regressor"))
    if regressors and not any(op.endswith("Classifier") for op in ops):
        raise NotScoresError(f"{name} is a regressor ({regressors[0]}): it outputs "
                             "predicted values, not class scores",
                             "kdcli distils classifiers; export a classifier (with "
                             "probabilities) instead")


def choose_output(sess: Any, output_name: str | None, where: Any,
                  notes: list[str] | None = None) -> Any:
    """The output holding the class scores: the one named by ``--output``, the only one, a
    kdcli export's ``logits``, or the probabilities next to a classifier's label output (then
    a note saying so is added to ``notes``)."""
    outs = sess.get_outputs()
    names = [o.name for o in outs]
    if output_name:
        if output_name not in names:
            raise UsageError(f"{where} has no output {output_name!r}",
                             f"Choose --output from {names}")
        return outs[names.index(output_name)]
    if len(outs) == 1:
        return outs[0]
    if "logits" in names and "kdcli_version" in sess.get_modelmeta().custom_metadata_map:
        return outs[names.index("logits")]  # a kdcli export: its outputs are known
    probs = [o for o in outs if o.type.startswith("seq(map(") or "prob" in o.name.lower()]
    labels = [o for o in outs if o not in probs
              and ("label" in o.name.lower() or o.type in _LABEL_TYPES)]
    if len(probs) == 1 and len(probs) + len(labels) == len(outs):
        if notes is not None:
            others = ", ".join(repr(o.name) for o in labels)
            notes.append(f"{Path(str(where)).name}: using its probabilities "
                         f"{probs[0].name!r}, not the labels {others} "
                         "(choose another with --output)")
        return probs[0]
    raise UsageError(f"{where} has several outputs {names}", "Choose one with --output NAME")


def describe_onnx(path: Any, output_name: str | None = None) -> dict[str, Any]:
    """What ``kdcli inspect`` shows of an ONNX model: inputs and outputs with their types and
    shapes, the output kdcli uses, its classes and names, and the ONNX-ML operators."""
    notes: list[str] = []
    meta: dict[str, Any] = {}
    sess, graph = open_session(path, notes=notes, meta=meta)
    try:
        out = choose_output(sess, output_name, path, notes)
    except UsageError:
        out = None
    spec = lambda a: {"name": a.name, "type": a.type, "shape": list(a.shape)}  # noqa: E731
    info: dict[str, Any] = {"input_specs": [spec(i) for i in sess.get_inputs()],
                            "output_specs": [spec(o) for o in sess.get_outputs()],
                            "scores_output": out.name if out is not None else None,
                            "ml_operators": sorted({n.op_type for n in graph.node
                                                    if n.domain == "ai.onnx.ml"}),
                            "classes": None, "class_names": None,
                            "locale_fallback": meta.get("onnx_locale")}
    if out is not None and out.type.startswith("seq(map("):
        keys = _zipmap_labels(graph, out.name)
        info["classes"] = len(keys)
        info["class_labels"] = keys
        if keys and isinstance(keys[0], str):
            info["class_names"] = keys
    elif out is not None and out.shape and isinstance(out.shape[-1], int):
        info["classes"] = out.shape[-1] if out.shape[-1] > 1 else 2
    inp = sess.get_inputs()[0] if len(sess.get_inputs()) == 1 else None
    tokenizer = sess.get_modelmeta().custom_metadata_map.get("tokenizer_file")
    info["preprocessing"] = (f"texts in: tokenized by the {tokenizer} beside it"
                             if takes_tokens(sess.get_inputs()) and tokenizer else
                             "none: inputs as given" if inp is None else
                             "none: texts as given" if inp.type == STRING_TYPE else
                             f"none: inputs as given, cast to {ONNX_TYPES.get(inp.type, inp.type)}")
    return info


def _zipmap_labels(graph: Any, output: str) -> list:
    """The class labels of the ZipMap that makes ``output``, in column order."""
    zipmaps = [n for n in graph.node if n.op_type == "ZipMap"]
    node = next((n for n in zipmaps if output in n.output), zipmaps[0] if zipmaps else None)
    if node is None:
        raise ModelError(f"output {output!r} is a sequence of maps, but no ZipMap makes it",
                         "Convert the model with zipmap=False")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "classlabels_strings" in attrs:
        return [s.decode() if isinstance(s, bytes) else str(s)
                for s in attrs["classlabels_strings"]]
    return [int(k) for k in attrs.get("classlabels_int64s", [])]


def _classes(name: str, keys: list, notes: list[str]) -> dict[str, Any]:
    """The class fields of a ZipMap output: column k is the k-th label; string labels name
    the classes (a note says how other labels map to classes)."""
    fields: dict[str, Any] = {"num_classes": len(keys)}
    if keys and isinstance(keys[0], str):
        fields["class_names"] = list(keys)
    elif keys != list(range(len(keys))):
        fields["class_names"] = [str(k) for k in keys]
        notes.append(f"{name}: its class labels are {keys}; class k of the transfer set "
                     "is the k-th of them (labels in the data must be 0..C-1 in this order)")
    return fields


def _check_declared_shape(teacher: str, graph: Any, name: str, dims: list) -> None:
    """Refuse a declared input shape that contradicts the operator that reads the input."""
    need = _features_used(graph, name)
    if need is None:
        return
    op, n, exact = need
    declared = math.prod(dims[1:])
    if declared == n or (not exact and declared > n):
        return
    raise ModelError(
        f"{teacher} declares its input {name!r} with shape {dims} ({declared} features per "
        f"example), but its {op} uses {'' if exact else 'at least '}{n} features: "
        f"the actual shape is [batch, {n}]",
        f"Fix the declared shape (e.g. onnx.tools.update_model_dims to [None, {n}]), "
        "and save the model again")


def _features_used(graph: Any, name: str) -> tuple[str, int, bool] | None:
    """(operator, features, exact) for ONNX-ML operators that read ``name`` directly."""
    for node in graph.node:
        if not node.input or node.input[0] != name:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("LinearClassifier", "LinearRegressor") and attrs.get("coefficients"):
            rows = len(attrs.get("intercepts", [])) or attrs.get("targets", 1)
            return node.op_type, len(attrs["coefficients"]) // max(1, rows), True
        if node.op_type.startswith("TreeEnsemble") and attrs.get("nodes_featureids"):
            return node.op_type, max(attrs["nodes_featureids"]) + 1, False
        if node.op_type == "Scaler" and len(attrs.get("scale", [])) > 1:
            return node.op_type, len(attrs["scale"]), True
    return None


def inspect_onnx(p: Path, rep: Reporter) -> dict[str, Any]:
    """What ``kdcli inspect`` shows of an ONNX model: shows its table, returns its info."""
    try:
        proto = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others
        raise FormatError(f"{p} is not a readable ONNX model ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:100]})",
                          "The file is truncated or damaged; export it again") from None
    props = {e.key: e.value for e in proto.metadata_props}
    info = {"file": str(p), "kind": "onnx", "format": "onnx", "metadata": props,
            "class_names": json.loads(props["class_names"]) if "class_names" in props else None,
            "opset": [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")],
            "inputs": [i.name for i in proto.graph.input],
            "outputs": [o.name for o in proto.graph.output], "nodes": len(proto.graph.node),
            **describe_onnx(p)}
    specs = lambda xs: "; ".join(f"{a['name']} {a['type']} {a['shape']}" for a in xs)  # noqa: E731
    rows = [["opset", short(info["opset"])], ["inputs", specs(info["input_specs"])],
            ["outputs", specs(info["output_specs"])],
            ["class scores", info["scores_output"] or "(choose with --output)"],
            ["classes", short(info["classes"])],
            ["class labels", short(info.get("class_labels"))],
            ["class names", short(info["class_names"])],
            ["preprocessing", info["preprocessing"]], ["nodes", info["nodes"]]]
    if info["locale_fallback"]:
        rows.append(["StringNormalizer locale", f"{info['locale_fallback']} (the model's "
                     "is not installed here)"])
    if info["ml_operators"]:
        rows.append(["ONNX-ML operators", ", ".join(info["ml_operators"])])
    rep.table(f"ONNX {p.name}", ["", "value"], rows + [[k, short(v)] for k, v in props.items()])
    return info


FORMAT = OnnxFormat()
