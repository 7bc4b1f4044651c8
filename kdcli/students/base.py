"""A student's architecture (a family and its configuration), and building a student.

A kdcli model takes inputs in the raw units of its training data (MNIST: pixels 0-255, shape
``[B, 28, 28]``) and does its own preprocessing, so that a model file is all a user, a
teacher loader or the ONNX exporter needs (see :mod:`kdcli.students.model_file`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kdcli.errors import UsageError
from kdcli.modalities import modality_of
from kdcli.preprocessing import Preprocessing
from kdcli.students import FAMILIES, family_config, usages

# The fields of the model file's flat ``architecture`` record, in its order after
# ``family``, with the value that means "not set"; each family has some of them.
FIELDS: dict[str, Any] = {"hidden": [], "width": 1.0, "dropout": 0.0, "input_dropout": 0.0,
                          "max_norm": None, "depth": 0}


@dataclasses.dataclass(init=False)
class Architecture:
    """A model of one of kdcli's families (see :data:`kdcli.students.FAMILIES`).

    Made from a family name and fields, ``Architecture("mlp", hidden=[1200, 1200],
    dropout=0.5)``, or from a spec (:meth:`parse`). The fields are read as attributes
    (``arch.hidden``, ``arch.width``, ``arch.depth``, ``arch.dropout``,
    ``arch.input_dropout``, ``arch.max_norm``); one the family has not reads as unset.

    Attributes:
        family: ``"mlp"``, ``"cnn"`` or ``"resnet"``.
        config: The family's configuration (e.g. :class:`kdcli.students.mlp.MlpConfig`).
        others: Fields given that the family has not, set to something; :meth:`check`
            refuses them.
    """

    family: str
    config: Any
    others: dict[str, Any]

    def __init__(self, family: str = "mlp", **fields: Any) -> None:
        cls = family_config(family)
        own = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - own - set(FIELDS))
        if unknown:
            raise TypeError(f"Architecture got unexpected fields {unknown}")
        self.family = family
        self.config = cls(**{k: v for k, v in fields.items() if k in own})
        self.others = {k: v for k, v in fields.items() if k not in own and v != FIELDS[k]}

    def __getattr__(self, name: str) -> Any:
        if name not in FIELDS:
            raise AttributeError(name)
        config, others = self.__dict__.get("config"), self.__dict__.get("others", {})
        if hasattr(config, name):
            return getattr(config, name)
        return others.get(name, copy.copy(FIELDS[name]))

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> Architecture:
        """Parse ``mlp:1200,1200``, ``cnn:0.5``, ``resnet:20,0.5`` (extra fields from kwargs)."""
        name, _, rest = spec.strip().partition(":")
        if name not in FAMILIES:
            raise UsageError(f"bad architecture spec {spec!r}: unknown family {name!r}",
                             f"Use {usages()}")
        config = family_config(name)
        try:
            arch = cls(name, **config.parse(rest.strip()), **kwargs)
        except ValueError as e:
            raise UsageError(f"bad architecture spec {spec!r}", f"Use {config.USAGE}") from e
        arch.check()
        return arch

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Architecture:
        """Read a model file's flat ``architecture`` record (TypeError for an unknown field;
        UsageError for an unknown family)."""
        return cls(**record)

    def to_dict(self) -> dict[str, Any]:
        """The flat record a model file keeps: ``family``, then every field of
        :data:`FIELDS` in order (unset ones at their unset value)."""
        return {"family": self.family, **{k: getattr(self, k) for k in FIELDS}}

    def check(self) -> None:
        """Check the family's fields, then refuse fields it does not take."""
        self.config.check()
        if self.others:
            raise UsageError(*type(self.config).OTHERS)

    def spec(self) -> str:
        """The spec string that :meth:`parse` reads back, e.g. ``resnet:20,0.5``."""
        return f"{self.family}:{self.config.spec()}"


def build_model(arch: Architecture, pre: Preprocessing, num_classes: int) -> nn.Module:
    """Build a model of kdcli's family: ``Sequential(preprocess, net)``.

    Args:
        arch: The architecture.
        pre: The preprocessing (``pre.raw_shape`` sets the input size).
        num_classes: Output size.

    Returns:
        A module mapping raw inputs ``[B, *raw_shape]`` to logits ``[B, num_classes]``.
    """
    arch.check()
    raw = list(pre.raw_shape)
    text = getattr(arch.config, "TEXT", False)
    if text != pre.is_text:
        raise UsageError(f"{arch.spec()} takes {'texts' if text else 'tensors'}, but the "
                         f"data is {'texts' if pre.is_text else 'not text'}",
                         "Use a text family (bow:64) for text, and mlp, cnn or resnet for "
                         "images and tables")
    if getattr(arch.config, "SUBWORDS", False) and pre.tokenizer is None:
        raise UsageError(f"{arch.spec()} takes the teacher's subword tokenizer, not a word "
                         "vocabulary", "Pass --tokenizer path/to/teacher-folder (or its "
                         "tokenizer.json)")
    if pre.tokenizer is not None:  # token ids + 1, 0 = padding
        net, in_shape = arch.config.build(raw, num_classes,
                                          vocab_size=pre.tokenizer["size"] + 1)
    elif text:
        from kdcli.students.words import WordVocab

        net, in_shape = arch.config.build(raw, num_classes,
                                          vocab_size=len(WordVocab.from_json(pre.words)))
    elif pre.table is not None:  # the network takes the encoded columns
        from kdcli.students.table_encoding import TableEncoding

        net, in_shape = arch.config.build([TableEncoding.from_json(pre.table).width],
                                          num_classes)
    else:
        net, in_shape = arch.config.build(raw, num_classes)
    return nn.Sequential(modality_of(pre).student_preprocess(pre, in_shape), net)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that follows a Conv2d in an
    ``nn.Sequential`` folded into that convolution (the BN becomes an Identity).

    In eval mode BN is the affine map ``gamma * (y - mean) / sqrt(var + eps) + beta`` with
    its running statistics, so the conv's weights and bias absorb it exactly (up to rounding):
    the exported graph has no BatchNormalization node and one op fewer per conv.
    """
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return folded


def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each hidden unit's incoming weight vector to L2 norm at most ``max_norm``.

    The constraint of the dropout papers (Hinton et al. 2012, Srivastava et al. 2014), which
    the distillation paper's teacher used: it bounds the hidden units of every Linear layer
    but the output layer, whose logits it leaves free.
    """
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linear[:-1]:
            m.weight.renorm_(2, 0, max_norm)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def final_linear(model: nn.Module) -> nn.Module:
    """The last Linear layer (the logits' weights and biases)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise UsageError("the model has no Linear output layer", "Use a kdcli model")
    return last[-1]
