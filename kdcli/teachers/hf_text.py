"""Hugging Face text classifiers as teachers (the ``huggingface-text`` format).

A folder saved with ``save_pretrained``: ``config.json`` naming a sequence classifier
(``BertForSequenceClassification``, ``DistilBertForSequenceClassification``,
``RobertaForSequenceClassification``, ...), its weights (``model.safetensors`` or shards)
and the tokenizer saved beside it (``tokenizer.json``, or vocabulary files such as
``vocab.txt``; ``tokenizer_config.json`` for its settings).

* The model is ``AutoModelForSequenceClassification``, loaded locally (no download) with no
  remote code: a ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` is refused.
  Weights are checked as for image checkpoints (missing or unexpected keys are refused).
* The tokenizer is transformers' own (``AutoTokenizer``), read from JSON, text or
  sentencepiece files; a tokenizer file that is a pickle, or a folder whose tokenizer is only
  pickled, is refused (see :func:`kdcli.teachers.hf_files.tokenizer_files`).
* The classes and their names come from ``id2label``. A multi-label model
  (``problem_type: multi_label_classification``) or a regressor (one label) is refused: its
  scores are not a softmax over classes.
* The teacher takes texts (or ``(text, text)`` pairs, tokenized as sentence pairs), truncated
  at the model's maximum length (:func:`max_length`). One call's texts are sorted by length
  and run in sub-batches of similar lengths, each padded to its longest
  (:class:`TextRunner`); the logits come back in the input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdcli.devices import host_to_device, use_tf32
from kdcli.errors import FormatError, ModelError, UsageError, first_line
from kdcli.output import Reporter
from kdcli.teachers.base import TEXT, InputSpec, LoadRequest, Teacher, TeacherFormat, short
from kdcli.teachers.hf import class_names, import_transformers, load_model
from kdcli.teachers.hf_files import (
    TOKENIZER_FILES,
    TOKENIZER_SETTINGS,
    check_folder,
    folder_sha256,
    is_hf_folder,
    read_config,
    read_tokenizer_config,
    refuse_outside_files,
    tokenizer_files,
    weight_files,
)

#: The most tokens (rows x padded length) one sub-batch holds; a longer text runs alone.
TOKEN_BUDGET = 8192
#: A sub-batch of at least ``MIN_ROWS`` rows is cut before padding would exceed this share
#: of its tokens.
MAX_PADDING = 0.2
MIN_ROWS = 8
#: A tokenizer's ``model_max_length`` above this is transformers' "no limit" placeholder.
_NO_LIMIT = 1_000_000
#: Model types whose position ids start after the padding index (``padding_idx + 1``), so
#: ``max_position_embeddings`` counts ``padding_idx + 1`` positions no token can use.
_OFFSET_POSITIONS = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "ibert",
    "data2vec-text", "roberta-prelayernorm", "mpnet", "xmod", "luke", "mluke", "esm"})
_SUFFIX = "ForSequenceClassification"
_HINT_REMOTE = ("kdcli runs only the model types transformers ships; convert the checkpoint "
                "to one of them")


def _architectures(cfg: dict[str, Any]) -> list[str]:
    arch = cfg.get("architectures")
    return [a for a in arch if isinstance(a, str)] if isinstance(arch, list) else []


def is_text_classifier(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint of a text sequence classifier.

    Its ``config.json`` names a ``...ForSequenceClassification`` architecture (or none), and
    a tokenizer lies beside it, or the configuration asks for remote code (which the loader
    refuses), or its ``model_type`` is one transformers has a text sequence classifier for
    (audio classifiers are ``...ForSequenceClassification`` too). Never raises: a folder
    that cannot be read is left to the image format, whose loader says why.
    """
    if not is_hf_folder(folder):
        return False
    try:
        check_folder(folder)
        cfg = read_config(folder)
    except (FormatError, OSError):
        return False
    archs = _architectures(cfg)
    if archs and not any(a.endswith(_SUFFIX) for a in archs):
        return False
    model_type = cfg.get("model_type")
    if model_type is not None and not cfg.get("auto_map") and not _text_model_type(model_type):
        return False  # an audio classifier saved with its processor's vocabulary, say
    if any((folder / n).is_file() for n in (*TOKENIZER_FILES, *TOKENIZER_SETTINGS)):
        return True
    return bool(archs and cfg.get("auto_map")) or _text_model_type(cfg.get("model_type"))


def _text_model_type(model_type: Any) -> bool:
    """Whether transformers has a text sequence classifier for ``model_type``."""
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as TEXT_MODELS,
        )
    except ImportError:  # the image format's loader says how to install it
        return False
    return isinstance(model_type, str) and model_type in TEXT_MODELS


def refuse_remote_code(folder: Path, cfg: dict[str, Any], name: str) -> None:
    """Refuse a configuration that asks for code from the checkpoint (``auto_map``).

    Raises:
        FormatError: naming the file and the classes it maps.
    """
    auto = cfg.get("auto_map")
    if auto:
        shown = short(sorted(auto) if isinstance(auto, dict) else auto, 60)
        raise FormatError(f"{folder / name} asks for remote code (auto_map: {shown}); kdcli "
                          "never runs code from a checkpoint folder", _HINT_REMOTE)


def refuse_problem_type(folder: Path, cfg: dict[str, Any]) -> None:
    """Refuse a model whose scores are not a softmax over classes.

    Raises:
        ModelError: ``problem_type`` is multi-label classification or regression, or the
            model has one label (which transformers trains as a regression).
    """
    kind = cfg.get("problem_type")
    n = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
    if kind == "multi_label_classification":
        raise ModelError(f"{folder} is a multi-label classifier (problem_type: "
                         "multi_label_classification): one independent sigmoid per label, "
                         "not a softmax over classes, so its logits are no soft targets",
                         "kdcli distils single-label classifiers; give a model trained with "
                         "one class per text")
    if kind == "regression" or n == 1:
        raise ModelError(f"{folder} is a regression model (one output, problem_type "
                         f"{kind or 'regression'}), not a classifier",
                         "kdcli distils classifiers with two or more classes")


def max_length(config: Any, tokenizer_max: Any) -> int | None:
    """The longest input (in tokens) the model takes: the smaller of its position
    embeddings (less the padding offset of RoBERTa-like models) and the tokenizer's
    ``model_max_length`` when that is a real limit; None when neither says."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        offset = 0
        if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
            pad = getattr(config, "pad_token_id", None)
            offset = (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
        if positions > offset:
            limits.append(positions - offset)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max <= _NO_LIMIT:
        limits.append(tokenizer_max)
    return min(limits) if limits else None


def plan_batches(lengths: Sequence[int], group: bool = True,
                 budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """The sub-batches (lists of row indices) one call's rows run in.

    Args:
        lengths: Each row's length in tokens.
        group: Sort the rows by length and cut them into sub-batches, each padded to its
            longest row: a sub-batch ends before it would exceed ``budget`` tokens (a row
            longer than that runs alone), or, once it has :data:`MIN_ROWS` rows, before
            padding would exceed :data:`MAX_PADDING` of its tokens. False: one batch in the
            input order, padded to its longest row.
        budget: The most tokens (rows x padded length) in one sub-batch.
    """
    n = len(lengths)
    if not group:
        return [list(range(n))] if n else []
    plan: list[list[int]] = []
    chunk: list[int] = []
    total = 0
    for i in sorted(range(n), key=lambda i: lengths[i]):
        size = (len(chunk) + 1) * lengths[i]
        if chunk and (size > budget or (len(chunk) >= MIN_ROWS and
                                        size - total - lengths[i] > MAX_PADDING * size)):
            plan.append(chunk)
            chunk, total = [], 0
        chunk.append(i)
        total += lengths[i]
    if chunk:
        plan.append(chunk)
    return plan


def _split(texts: Sequence[Any], name: str) -> tuple[list[str], list[str] | None]:
    """The first texts and, for sentence pairs, the second ones.

    Raises:
        ModelError: an example that is neither a text nor a pair of texts, or a batch that
            mixes texts and pairs.
    """
    if isinstance(texts, str):
        raise ModelError(f"teacher {name} takes a batch of texts, not one string",
                         "Give a list of texts, e.g. [text]")
    pairs = [isinstance(t, (tuple, list)) for t in texts]
    if any(pairs) and not all(pairs):
        raise ModelError(f"teacher {name} was given a batch that mixes single texts and "
                         "sentence pairs", "Give every example as a text, or every one as a "
                         "pair of texts")
    if pairs and pairs[0]:
        if not all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts):
            raise ModelError(f"teacher {name} takes (text, text) pairs; an example is not one",
                             "Give sentence pairs as two text columns")
        return [t[0] for t in texts], [t[1] for t in texts]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ModelError(f"teacher {name} reads texts, not {type(bad).__name__} values",
                         "Give it texts (str), or (text, text) pairs")
    return list(texts), None


class TextRunner:
    """Tokenizes a batch of texts and runs the classifier on them, a sub-batch of similar
    lengths at a time.

    Attributes:
        model: The ``transformers`` sequence classifier (in eval mode).
        tokenizer: Its tokenizer.
        max_length: Texts are truncated to this many tokens (None: not truncated).
        pad_id: The padding token's id.
        device: Where the model runs.
        precision: ``fp32`` or ``bf16`` (autocast).
        group: Sort by length into sub-batches (see :func:`plan_batches`).
        budget: The most tokens in one sub-batch.
        truncated: How many texts (or pairs) have been truncated so far.
    """

    def __init__(self, model: Any, tokenizer: Any, max_len: int | None, pad_id: int,
                 device: str = "cpu", precision: str = "fp32", name: str = "") -> None:
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_len
        self.pad_id, self.name = pad_id, name
        self.device, self.precision = torch.device(device), precision
        self.pad_type = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.group, self.budget, self.truncated = True, TOKEN_BUDGET, 0

    def encode(self, texts: Sequence[Any]) -> Any:
        """The tokenizer's output for ``texts`` (or pairs), truncated, not padded."""
        first, second = _split(texts, self.name)
        enc = self.tokenizer(first, second, truncation=self.max_length is not None,
                             max_length=self.max_length, padding=False)
        self.truncated += sum(bool(e.overflowing) for e in getattr(enc, "encodings", None) or ())
        return enc

    def pad(self, enc: Any, rows: list[int]) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows`` of ``enc``, padded to the longest of them."""
        ids = enc["input_ids"]
        width = max(len(ids[i]) for i in rows)
        out = {}
        for key, value in (("input_ids", self.pad_id), ("attention_mask", 0),
                           ("token_type_ids", self.pad_type)):
            if key in enc:
                seqs = [list(enc[key][i]) for i in rows]
                out[key] = torch.tensor([[value] * (width - len(s)) + s if self.left else
                                         s + [value] * (width - len(s)) for s in seqs],
                                        dtype=torch.long)
        return out

    def __call__(self, texts: Sequence[Any]) -> torch.Tensor:
        """``[B, C]`` float32 logits on the CPU, in the order of ``texts``."""
        if len(texts) == 0:
            return torch.zeros((0, int(self.model.config.num_labels)))
        enc = self.encode(texts)
        plan = plan_batches([len(s) for s in enc["input_ids"]], self.group, self.budget)
        out: torch.Tensor | None = None
        for rows in plan:
            batch = {k: host_to_device(v, self.device) for k, v in self.pad(enc, rows).items()}
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.model(**batch).logits.float().cpu()
            if out is None:
                out = logits.new_empty((len(texts), *logits.shape[1:]))
            out[torch.tensor(rows)] = logits
        return out


def _pick_sequence_classifier(tf: Any, config: Any, folder: Path) -> Any:
    """``AutoModelForSequenceClassification``, if it has a class for ``config``."""
    auto = tf.AutoModelForSequenceClassification
    if type(config) not in auto._model_mapping:
        raise ModelError(f"{folder} is a {getattr(config, 'model_type', '?')} model, which "
                         "transformers has no sequence classifier for",
                         "kdcli reads text classifiers saved with "
                         "AutoModelForSequenceClassification.save_pretrained")
    return auto


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, with no remote code and no download.

    Raises:
        FormatError: no tokenizer, a tokenizer that asks for remote code, or one that
            transformers cannot read.
        UnsafePickleError: the tokenizer is (only) pickled.
    """
    tokenizer_files(folder)
    settings = read_tokenizer_config(folder)
    refuse_remote_code(folder, settings, "tokenizer_config.json")
    refuse_outside_files(folder, settings)
    tf = import_transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, OSError, ...
        raise FormatError(f"the tokenizer in {folder} cannot be read by transformers "
                          f"({first_line(e)})", "Save the model's tokenizer again with "
                          "save_pretrained (tokenizer.json)") from e


def _check_vocabulary(folder: Path, tokenizer: Any, config: Any) -> None:
    """Refuse a tokenizer whose ids the model's embedding does not have (another model's)."""
    vocab = getattr(config, "vocab_size", None)
    ids = tokenizer.get_vocab().values()
    largest = max(ids, default=-1)
    if isinstance(vocab, int) and vocab > 0 and (len(tokenizer) > vocab or largest >= vocab):
        raise FormatError(f"{folder}: the tokenizer has {len(tokenizer):,} tokens (ids up to "
                          f"{largest:,}) but the model's embedding only {vocab:,}: they "
                          "belong to different models", "Save the model's own tokenizer "
                          "beside it")


class HfTextFormat(TeacherFormat):
    """A Hugging Face sequence-classifier folder with its tokenizer."""

    name = "huggingface-text"
    folders = True

    def detect(self, path: Path) -> bool:
        return is_text_classifier(path)

    def digest(self, path: Path) -> str:
        return folder_sha256(path, (*TOKENIZER_FILES, *TOKENIZER_SETTINGS))

    def load(self, req: LoadRequest) -> Teacher:
        folder, opts = req.path, req.opts
        if opts.preprocessing() or opts.input_shape:
            raise UsageError(f"--scale/--mean/--std/--input-shape were given for {folder.name}, "
                             "a text model that tokenizes its own texts", "Drop them for "
                             "this model")
        cfg = read_config(folder)
        refuse_remote_code(folder, cfg, "config.json")
        refuse_problem_type(folder, cfg)
        tokenizer = load_tokenizer(folder)
        model, config = load_model(folder, opts.trust_pickle, _pick_sequence_classifier)
        _check_vocabulary(folder, tokenizer, config)
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else getattr(config, "pad_token_id", None)
        if pad is None:
            raise FormatError(f"{folder}: neither the tokenizer nor config.json has a padding "
                              "token, so texts of different lengths cannot share a batch",
                              "Set pad_token in tokenizer_config.json (or pad_token_id in "
                              "config.json)")
        limit = max_length(config, getattr(tokenizer, "model_max_length", None))
        model.eval()
        if req.device != "cpu":
            model.to(torch.device(req.device))
            if torch.device(req.device).type == "cuda":
                use_tf32()
        runner = TextRunner(model, tokenizer, limit, int(pad), req.device, req.precision,
                            folder.name)
        n = int(config.num_labels)
        notes = () if limit else (f"{folder.name}: no maximum length in config.json or the "
                                  "tokenizer; texts are not truncated",)
        meta = {"architecture": type(model).__name__, "tokenizer": type(tokenizer).__name__,
                "max_length": limit}
        return req.teacher(self, runner, module=model, inputs=(InputSpec("text", TEXT),),
                           num_classes=n, meta=meta, notes=notes,
                           class_names=class_names(getattr(config, "id2label", None), n))

    def inspects(self, path: Path) -> bool:
        return is_text_classifier(path)

    def inspect(self, path: Path, rep: Reporter) -> dict[str, Any]:
        """A text-classifier folder, from its JSON files alone (no weights are loaded)."""
        info = describe_text_folder(path)
        rows = [["format", info["format"]], ["architecture", short(info["architecture"])],
                ["inputs", "texts, or (text, text) pairs"],
                ["outputs", "logits, one per class"], ["classes", info["classes"]],
                ["class names", short(info["class_names"])],
                ["problem type", info["problem_type"] or "single_label_classification"],
                ["tokenizer", f"{info['tokenizer'] or '?'} ({', '.join(info['tokenizer_files'])})"],
                ["max length", info["max_length"] or "none"],
                ["weights", short(info["weights"])]]
        rep.table(f"Hugging Face text classifier {path.name}", ["", "value"], rows)
        return info


def describe_text_folder(folder: Path) -> dict[str, Any]:
    """What ``kdcli inspect`` shows of a text-classifier folder, from its JSON files only."""
    cfg = read_config(folder)
    refuse_remote_code(folder, cfg, "config.json")
    files = tokenizer_files(folder)
    tok = read_tokenizer_config(folder)
    n = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
    limit = max_length(_Fields(cfg), tok.get("model_max_length"))
    return {"file": str(folder), "kind": "huggingface text classifier",
            "format": FORMAT.name, "model_type": cfg.get("model_type"),
            "architecture": cfg.get("architectures"), "inputs": ["text"], "outputs": ["logits"],
            "classes": n, "class_names": class_names(cfg.get("id2label"), n),
            "problem_type": cfg.get("problem_type"), "tokenizer": tok.get("tokenizer_class"),
            "tokenizer_files": files, "max_length": limit,
            "weights": [f.name for f in weight_files(folder, trust_pickle=True)]}


class _Fields:
    """A ``config.json`` object read as attributes (what :func:`max_length` reads)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.__dict__.update(cfg)


FORMAT = HfTextFormat()
