"""kdcli model files as teachers (the ``kdcli`` format): safetensors with ``format: kdcli.model``.

The model carries its own preprocessing, so the teacher's is the identity and
``--scale/--mean/--std`` are refused for it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdcli.errors import ModelError
from kdcli.io.storage import read_safetensors_metadata
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import count_params
from kdcli.students.layers import Preprocess
from kdcli.students.model_file import MODEL_FORMAT, ModelFile, load_model
from kdcli.teachers.base import (
    RAW,
    TEXT,
    InputSpec,
    LoadRequest,
    Teacher,
    TeacherFormat,
    names_from_json,
    short,
    torch_runner,
)


def _metadata(p: Path) -> dict[str, str] | None:
    return None if p.is_dir() else read_safetensors_metadata(p)


def _class_names(mf: ModelFile) -> list[str] | None:
    """The model's class names: the file's ``class_names`` (which ``train`` and
    ``train-student`` write), else, for older files, those of its training summary."""
    if mf.class_names is not None:
        return mf.class_names
    names = mf.training.get("class_names")
    ok = isinstance(names, list) and len(names) == mf.num_classes
    return [str(n) for n in names] if ok else None


def _preprocessing(mf: ModelFile) -> dict[str, Any]:
    """The model's preprocessing as records show it: a text student's vocabulary as its
    rules, size and hash, not its words."""
    pre = mf.preprocessing.to_dict()
    if mf.preprocessing.words is not None:
        from kdcli.students.words import WordVocab

        vocab = WordVocab.from_json(mf.preprocessing.words)
        pre["words"] = {"rules": pre["words"]["rules"], "size": len(vocab),
                        "sha256": vocab.sha256()}
    if mf.preprocessing.tokenizer is not None:
        from kdcli.students.subwords import summary

        pre["tokenizer"] = summary(mf.preprocessing.tokenizer)
    return pre


def _text_runner(runner: Any, pre: Preprocessing) -> Any:
    """A text student's runner on texts: word ids by its vocabulary (read once; a subword
    student's token ids by its tokenizer), then the model."""
    from kdcli.students.words import WordVocab

    if pre.tokenizer is not None:
        from kdcli.students.subwords import encode, load

        tok = load(pre)

        def run_tokens(texts: Any) -> Any:
            return runner(encode(tok, list(texts), pre.raw_shape[0])[0])

        return run_tokens

    vocab, max_words = WordVocab.from_json(pre.words), pre.raw_shape[0]

    def run(texts: Any) -> Any:
        return runner(vocab.encode(list(texts), max_words))

    return run


def _table_runner(runner: Any, lookups: dict[int, Any], name: str) -> Any:
    """A table student's runner on rows whose category columns hold the data's codes: the
    student's codes (``lookups``: column -> (its name, data code -> student code, or None
    for a column the data read as numbers, which must then be all missing: the category
    ``""``, the student's code ``empty``)), then the model."""

    def run(x: Any) -> Any:
        x = x.clone()
        for j, (col, lookup, empty) in lookups.items():
            if lookup is None:
                if not bool(torch.isnan(x[:, j]).all()):
                    raise ModelError(f"{name} takes column {col!r} as categories, but the "
                                     "data's column holds numbers",
                                     "Give the table the model was trained on")
                x[:, j] = empty
            else:
                x[:, j] = lookup.to(x.device)[x[:, j].long()].to(x.dtype)
        return runner(x)

    return run


class KdcliModelFormat(TeacherFormat):
    """A kdcli model file."""

    name = "kdcli"
    own_preprocessing = True

    def detect(self, path: Path) -> bool:
        meta = _metadata(path)
        return meta is not None and meta.get("format") == MODEL_FORMAT

    def load(self, req: LoadRequest) -> Teacher:
        mf = load_model(req.path)
        meta = {"architecture": mf.arch.spec(), "model_preprocessing": _preprocessing(mf),
                "training": {k: mf.training.get(k) for k in ("command", "test_errors")
                             if k in mf.training}}
        runner, module = torch_runner(mf.model, req.device, req.precision)
        if mf.preprocessing.is_text:  # texts in, tokenized as in training
            return req.teacher(
                self, _text_runner(runner, mf.preprocessing), module=module,
                inputs=(InputSpec("text", TEXT),), preprocessing=Preprocessing(), meta=meta,
                num_classes=mf.num_classes, class_names=_class_names(mf))
        shape = req.user_shape or tuple(mf.preprocessing.raw_shape)
        # a model whose first layer is Preprocess converts raw values itself: no float copy
        first = next(iter(mf.model.children()), None)
        dtype = RAW if type(first) is Preprocess else "float32"
        return req.teacher(
            self, runner, module=module, inputs=(InputSpec(shape=shape, dtype=dtype),),
            preprocessing=Preprocessing(),  # the model does its own
            meta=meta, num_classes=mf.num_classes, class_names=_class_names(mf))

    def class_names(self, path: Path) -> list[str] | None:
        return names_from_json((_metadata(path) or {}).get("class_names"))

    def with_categories(self, t: Teacher, categories: list[list[str] | None],
                        names: list[str]) -> Teacher:
        """A table student with its own encoding gets its category columns' codes turned
        into its own (:meth:`~kdcli.students.table_encoding.TableEncoding.code_lookup`)."""
        table = Preprocessing.from_dict(t.meta["model_preprocessing"]).table
        if table is None:
            return super().with_categories(t, categories, names)
        from kdcli.students.table_encoding import TableEncoding

        enc = TableEncoding.from_json(table)
        lookups, notes = {}, []
        for j, (col, cats) in enumerate(zip(enc.columns, categories, strict=False)):
            if col.kind == "number" and cats is not None:
                raise ModelError(f"{t.name} takes column {col.name!r} as numbers, but the "
                                 f"data's column {names[j]!r} holds categories",
                                 "Give the table the model was trained on")
            if col.kind == "category":  # numbers: an all-empty column, checked as it runs
                lookups[j] = (col.name, None if cats is None else enc.code_lookup(j, cats),
                              float(enc.code_lookup(j, [""])[0]))
                notes += _unknown_note(t.name, col, cats)
        if not lookups:
            return t
        return replace(t, runner=_table_runner(t.runner, lookups, t.name),
                       notes=(*t.notes, *notes))

    def feature_names(self, path: Path) -> list[str] | None:
        return names_from_json((_metadata(path) or {}).get("feature_names"))

    def inspects(self, path: Path) -> bool:
        return self.detect(path)

    def inspect(self, path: Path, rep: Reporter) -> dict[str, Any]:
        mf = load_model(path)
        info = {"file": str(path), "kind": "model", "format": mf.metadata["format"],
                "format_version": int(mf.metadata["format_version"]),
                "architecture": mf.arch.spec(), "architecture_detail": mf.arch.to_dict(),
                "preprocessing": _preprocessing(mf), "classes": mf.num_classes,
                "params": count_params(mf.model), "training": mf.training,
                "created": mf.metadata.get("created"),
                "kdcli_version": mf.metadata.get("kdcli_version"),
                "class_names": mf.class_names, "feature_names": mf.feature_names}
        rows = [[k, short(info[k])] for k in ("format", "format_version", "architecture",
                                              "params", "classes", "class_names",
                                              "feature_names", "preprocessing", "created")
                if info[k] is not None]
        if mf.preprocessing.table is not None:
            from kdcli.students.table_encoding import TableEncoding

            rows.append(["columns", TableEncoding.from_json(mf.preprocessing.table).describe()])
        rows += [[f"training.{k}", short(v)] for k, v in mf.training.items()
                 if k not in ("teachers",)]
        rep.table(f"Model {path.name}", ["", "value"], rows)
        return info


FORMAT = KdcliModelFormat()


def _unknown_note(model: str, col: Any, cats: list[str] | None) -> list[str]:
    """What a table student does with the data's categories of column ``col`` that it has
    no input of its own for (never seen in training, or too rare to keep), or nothing."""
    kept = set(col.categories)
    unknown = [c or "(missing)" for c in cats or [] if c not in kept]
    if not unknown:
        return []
    where = "its 'other' input" if col.other else "none of its inputs (all 0)"
    return [f"{model}: column {col.name!r} has {len(unknown)} "
            f"categor{'y' if len(unknown) == 1 else 'ies'} it has no input of its own for "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); those rows "
            f"go to {where}"]
