"""A suspect model that can only be queried: it answers a batch of images with classes or class probabilities.

A black box is never asked for a gradient: :meth:`BlackBox.ask` runs it without autograd on detached images, and
what it answers is a plain array (a detached tensor), checked to be what its ``answers`` mode says. Three kinds:

- :class:`QueryFunction`: your own function, e.g. one that calls a prediction service;
- :class:`OnnxBlackBox`: an ONNX file run by onnxruntime, checked before anything of it runs
  (:func:`check_onnx_file`);
- :class:`ModelAnswers`: a refine-pl victim that answers labels only or probabilities only (for benchmarks).

Every image answered counts as a query (:attr:`BlackBox.queries`).
"""

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from refine_pl.classifier import NormalizedClassifier
from refine_pl.errors import ConfigError, cli_flag, first_sentence

Answers = Literal["probabilities", "labels"]
ANSWERS = ("probabilities", "labels")
"""What a black box answers: class probabilities ``[B, K]`` or classes ``[B]``."""

PROBABILITY_FLOOR = 1e-12
"""The smallest probability whose logarithm the deployed classifier gives (log 0 would be minus infinity)."""

PROBABILITY_TOLERANCE = 1e-3
"""How far a row of answered probabilities may sum from 1 (float32 softmax rounding stays far below it)."""


def check_answers_mode(answers: Any, flag: str | None = None) -> None:
    """Refuses an ``answers`` mode other than :data:`ANSWERS`."""
    if answers not in ANSWERS:
        where = flag or cli_flag("model", "answers")
        raise ConfigError(f"answers must be probabilities or labels, got {answers!r}: set {where}.")


class BlackBox(nn.Module):
    """A classifier that only answers queries: images ``[B, C, H, W]`` in [0, 1] to classes or probabilities.

    Subclasses implement :meth:`answer`. :meth:`ask` is the one way in: it runs :meth:`answer` without autograd on
    detached float images, checks the answer, counts the queries and gives a detached tensor. As a module, the
    black box gives scores that a remap can reorder (:meth:`forward`): the log-probabilities, or one-hot classes
    when it answers labels only; no gradient flows through them.

    Args:
        num_classes: Classes of the data, the width of a probability answer.
        answers: ``probabilities`` or ``labels``.
        name: What the black box is, for messages and records.
    """

    def __init__(self, num_classes: int, answers: Answers = "probabilities", name: str = "black box") -> None:
        super().__init__()
        check_answers_mode(answers)
        self.num_classes = num_classes
        self.answers = answers
        self.name = name
        self.queries = 0
        """Images answered so far."""
        self._last: tuple[Tensor, Tensor] | None = None

    def answer(self, images: Tensor) -> Any:
        """The raw answer to detached float images ``[B, C, H, W]`` (run without autograd).

        Classes ``[B]`` or probabilities ``[B, K]``, as a numpy array or a tensor.
        """
        raise NotImplementedError

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to compile: a black box is not a network refine-pl runs."""

    def ask(self, images: Tensor) -> Tensor:
        """The black box's answer to ``images``: long classes ``[B]`` or float probabilities ``[B, K]``.

        Detached, on the images' device. Counts ``B`` queries.

        Raises:
            ConfigError: The answer is not of the ``answers`` mode's shape and type (a label-only black box that
                answers probabilities is refused, so label-only mode never sees one).
        """
        with torch.no_grad():
            raw = self.answer(images.detach().float().contiguous())
        answer = self._checked(raw, len(images)).to(images.device)
        self.queries += len(images)
        return answer

    def labels(self, images: Tensor) -> Tensor:
        """The black box's class ``[B]`` of each image (the argmax of its probabilities)."""
        answer = self.ask(images)
        return answer if answer.ndim == 1 else answer.argmax(1)

    def last_labels(self, images: Tensor) -> Tensor:
        """The classes of :meth:`forward`'s last call when it was on ``images`` (no new query), else :meth:`labels`."""
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        return self.labels(images)

    def forward(self, images: Tensor) -> Tensor:
        """Scores ``[B, K]``: log-probabilities (floored at :data:`PROBABILITY_FLOOR`), or one-hot classes."""
        answer = self.ask(images)
        if answer.ndim == 1:
            scores = nn.functional.one_hot(answer, self.num_classes).float()
            self._last = (images, answer)
        else:
            scores = answer.clamp_min(PROBABILITY_FLOOR).log()
            self._last = (images, answer.argmax(1))
        return scores

    def _checked(self, raw: Any, batch: int) -> Tensor:
        if isinstance(raw, Tensor):
            answer = raw.detach().cpu()
        else:
            try:
                answer = torch.from_numpy(np.array(raw))
            except (TypeError, ValueError) as error:
                raise ConfigError(
                    f"The {self.name} answered a {type(raw).__name__}, not an array ({first_sentence(error)}): return "
                    "a numpy array of classes [B] or of probabilities [B, num_classes]."
                ) from error
        shape = tuple(answer.shape)
        if self.answers == "labels":
            if answer.ndim == 2 and answer.shape[1] == 1:
                answer = answer[:, 0]
            if answer.ndim != 1 or len(answer) != batch:
                probabilities = answer.ndim == 2 and len(answer) == batch
                fix = "set answers probabilities" if probabilities else "return one class per image"
                raise ConfigError(
                    f"The {self.name} answers labels only but gave an answer of shape {shape} for {batch} image(s): "
                    f"{fix}."
                )
            if answer.is_floating_point() or answer.dtype == torch.bool or answer.is_complex():
                raise ConfigError(
                    f"The {self.name} answers labels only but gave {answer.dtype} values: return integer classes."
                )
            answer = answer.long()
            if len(answer) and (int(answer.min()) < 0 or int(answer.max()) >= self.num_classes):
                wrong = int(answer.min()) if int(answer.min()) < 0 else int(answer.max())
                raise ConfigError(
                    f"The {self.name} answered class {wrong}, outside the data's {self.num_classes} classes: check "
                    "num_classes."
                )
            return answer
        if answer.ndim != 2 or tuple(answer.shape) != (batch, self.num_classes) or not answer.is_floating_point():
            fix = (
                "set answers labels"
                if answer.ndim == 1 and not answer.is_floating_point()
                else f"return probabilities [{batch}, {self.num_classes}]"
            )
            raise ConfigError(
                f"The {self.name} answers probabilities but gave a {answer.dtype} answer of shape {shape} for {batch} "
                f"image(s) of {self.num_classes} classes: {fix}."
            )
        answer = answer.float()
        if len(answer) and (
            not bool(torch.isfinite(answer).all())
            or float(answer.min()) < -PROBABILITY_TOLERANCE
            or float((answer.sum(1) - 1).abs().max()) > PROBABILITY_TOLERANCE
        ):
            raise ConfigError(
                f"The {self.name} answers probabilities but gave rows that are not probabilities (negative, not "
                "finite, or not summing to 1): apply a softmax to logits before answering."
            )
        return answer.clamp_min(0)


class QueryFunction(BlackBox):
    """Your own query function as a black box, e.g. one that sends the images to a prediction service.

    ``function`` gets a float32 numpy array ``[B, C, H, W]`` of pixels in [0, 1] (never a tensor that could carry a
    gradient) and returns, as a numpy array or list, one class per image (``answers="labels"``) or one row of class
    probabilities per image (``answers="probabilities"``).

    Args:
        function: The query function.
        num_classes: Classes of the data.
        answers: What the function returns: ``probabilities`` or ``labels``.
        name: What the function is, for messages and the run's record (its sha256 is that of the name).
    """

    def __init__(
        self,
        function: Callable[[np.ndarray], Any],
        num_classes: int,
        answers: Answers = "probabilities",
        name: str = "query function",
    ) -> None:
        super().__init__(num_classes, answers, name)
        if not callable(function):
            raise ConfigError(f"QueryFunction takes a callable, got {type(function).__name__}.")
        self.function = function

    def answer(self, images: Tensor) -> Any:
        return self.function(images.cpu().numpy().astype(np.float32, copy=False))

    @property
    def sha256(self) -> str:
        """A stand-in for a file digest, the sha256 of the name: checkpoints name the black box they trained with."""
        return hashlib.sha256(f"query-function:{self.name}".encode()).hexdigest()


class ModelAnswers(BlackBox):
    """A refine-pl victim that answers queries only: its softmax probabilities, or its classes alone.

    For benchmarks that compare black-box REFINE with white-box REFINE on the same victim: the classifier runs
    without autograd, and only the probabilities or classes leave it.

    Args:
        classifier: The victim on images in [0, 1] (as :func:`~refine_pl.victims.load_victim` builds it).
        num_classes: Classes of the data.
        answers: ``probabilities`` or ``labels``.
    """

    def __init__(self, classifier: NormalizedClassifier, num_classes: int, answers: Answers = "probabilities") -> None:
        arch = getattr(classifier, "arch", None) or "model"
        super().__init__(num_classes, answers, f"victim {arch} ({answers} only)")
        self.classifier = classifier.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "ModelAnswers":
        super().train(mode)
        self.classifier.eval()
        return self

    def answer(self, images: Tensor) -> Tensor:
        logits = self.classifier(images)
        return logits.argmax(1) if self.answers == "labels" else logits.float().softmax(1)


# --------------------------------------------------------------------------------------------------- ONNX files

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
"""Operator domains of the ONNX standard, which onnxruntime implements itself: any other domain is custom code."""

ONNX_MAX_FILE_BYTES = 2**31
"""Largest ONNX file read (a protobuf message cannot exceed 2 GB; larger weights go to external data files)."""

ONNX_MAX_EXTERNAL_BYTES = 16 * 2**30
"""Largest total size of the external data files an ONNX victim names."""

ONNX_MAX_NODES = 100_000
"""Largest number of nodes (graph, subgraphs and functions together) of an ONNX victim; ResNet-152 has under 1,000."""

ONNX_OUTPUTS = ("logits", "probabilities")
"""What an ONNX victim's output is: logits (a softmax gives the probabilities) or probabilities already."""


def _graphs(graph: Any) -> Any:
    """``graph`` and every subgraph of its nodes' attributes (If, Loop, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def _tensors(graph: Any) -> Any:
    """Every tensor a graph holds: initializers and Constant attributes, of the graph and its subgraphs."""
    for sub in _graphs(graph):
        yield from sub.initializer
        for sparse in sub.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in sub.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors


def _function_tensors(model: Any) -> Any:
    """The Constant tensors of a model's local functions."""
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors


def _dims(value_info: Any) -> tuple[int, list[int | None]]:
    """Element type and dimensions (None where not fixed) of a graph input or output."""
    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return tensor.elem_type, dims


def _check_external_data(path: Path, model: Any) -> int:
    """Refuses external data outside the file's folder or missing; returns the external files' total size."""
    folder = path.parent.resolve()
    files: set[Path] = set()
    for tensor in [*_tensors(model.graph), *_function_tensors(model)]:
        if tensor.data_location != 1:  # onnx.TensorProto.EXTERNAL
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ConfigError(
                f"ONNX file {path} keeps tensor {tensor.name!r} in {location!r}, outside the file's folder: refine-pl "
                "reads external data only beside the model; put the data file in its folder (onnx.save_model with "
                "location=a file name)."
            )
        if not target.is_file():
            raise ConfigError(
                f"ONNX file {path} keeps tensor {tensor.name!r} in {location!r}, which is not in {folder}: copy the "
                "data file beside the model."
            )
        files.add(target)
    total = sum(file.stat().st_size for file in files)
    if total > ONNX_MAX_EXTERNAL_BYTES:
        raise ConfigError(
            f"ONNX file {path}'s external data is {total / 2**30:.1f} GiB, more than refine-pl reads "
            f"({ONNX_MAX_EXTERNAL_BYTES / 2**30:.0f} GiB): it is not an image classifier refine-pl can defend."
        )
    return total


def check_onnx_file(path: str | Path, in_channels: int, image_size: int, num_classes: int) -> Any:
    """Reads an ONNX victim's graph and checks it, before anything of it runs.

    Parsing the protobuf runs nothing. Refused: a file over :data:`ONNX_MAX_FILE_BYTES` or a graph over
    :data:`ONNX_MAX_NODES` nodes; an operator of a custom domain (code outside the ONNX standard, which a runtime
    would have to load); external data outside the file's folder (a path that points elsewhere on the disk); a graph
    that :func:`onnx.checker.check_model` finds malformed; an input that is not one float image batch
    ``[B, in_channels, image_size, image_size]``, or an output that is not ``[B, num_classes]`` (where the graph fixes
    those dimensions).

    Returns:
        The ``onnx.ModelProto`` (external data not loaded).

    Raises:
        ConfigError: One line naming the problem and the fix.
    """
    import onnx

    path = Path(path)
    flag = cli_flag("model", "victim_checkpoint")
    if not path.is_file():
        raise ConfigError(f"ONNX victim {path} {'is a folder' if path.is_dir() else 'not found'}: check {flag}.")
    size = path.stat().st_size
    if size > ONNX_MAX_FILE_BYTES:
        raise ConfigError(
            f"ONNX file {path} is {size / 2**30:.1f} GiB, more than one ONNX file can hold (2 GiB): save its weights "
            "as external data beside it."
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and onnx's own errors
        raise ConfigError(f"{path} is not an ONNX model ({first_sentence(error)}): check {flag}.") from error
    local = {(function.domain, function.name) for function in model.functions}
    local_domains = {function.domain for function in model.functions}
    custom = sorted({o.domain for o in model.opset_import} - STANDARD_DOMAINS - local_domains)
    nodes = [node for graph in _graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    if len(nodes) > ONNX_MAX_NODES:
        raise ConfigError(
            f"ONNX file {path} has {len(nodes)} nodes, more than refine-pl reads ({ONNX_MAX_NODES}): it is not an "
            "image classifier refine-pl can defend."
        )
    for node in nodes:
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            custom.append(f"{node.domain} ({node.op_type})")
    if custom:
        raise ConfigError(
            f"ONNX file {path} uses operators of custom domain(s) {', '.join(sorted(set(custom)))}, code outside the "
            "ONNX standard that refine-pl never runs: export the model with standard ONNX operators only."
        )
    _check_external_data(path, model)
    try:
        onnx.checker.check_model(str(path))
    except Exception as error:  # onnx.checker.ValidationError and protobuf errors
        raise ConfigError(f"ONNX file {path} is malformed ({first_sentence(error)}): export it again.") from error
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(
            f"ONNX file {path} takes {len(inputs)} inputs ({', '.join(v.name for v in inputs)}), not one image batch: "
            "export the classifier with the images as its only input."
        )
    element, dims = _dims(inputs[0])
    expected = [None, in_channels, image_size, image_size]
    if (
        element != onnx.TensorProto.FLOAT
        or len(dims) != 4
        or any(d is not None and e is not None and d != e for d, e in zip(dims, expected, strict=True))
    ):
        shown = ["B" if d is None else d for d in dims]
        raise ConfigError(
            f"ONNX file {path} takes {onnx.TensorProto.DataType.Name(element).lower()} input {shown}, not float images "
            f"[B, {in_channels}, {image_size}, {image_size}] (the data's): use the dataset it was made for "
            f"({cli_flag('data', 'source', 'image_size')}, in_channels), or export it for this data."
        )
    if not model.graph.output:
        raise ConfigError(f"ONNX file {path} has no output: export the classifier with its logits as output.")
    _, out = _dims(model.graph.output[0])
    if len(out) != 2 or (out[1] is not None and out[1] != num_classes):
        shown = ["B" if d is None else d for d in out]
        fix = (
            f"set {cli_flag('data', 'source', 'num_classes')} {out[1]}"
            if len(out) == 2
            else "export it with [B, num_classes] scores as its first output"
        )
        raise ConfigError(f"ONNX file {path} gives output {shown}, not [B, {num_classes}] class scores: {fix}.")
    return model


def onnx_facts(path: str | Path) -> dict[str, int | None]:
    """What an ONNX classifier's graph fixes: ``in_channels``, ``image_size``, ``num_classes`` (None where dynamic).

    Reads the graph only (nothing runs); the full checks are :func:`check_onnx_file`'s.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ConfigError(f"{path} is not an ONNX model ({first_sentence(error)}).") from error
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    dims = _dims(inputs[0])[1] if len(inputs) == 1 else []
    out = _dims(model.graph.output[0])[1] if model.graph.output else []
    side = dims[2] if len(dims) == 4 and dims[2] == dims[3] else None
    return {
        "in_channels": dims[1] if len(dims) == 4 else None,
        "image_size": side,
        "num_classes": out[1] if len(out) == 2 else None,
    }


class OnnxBlackBox(BlackBox):
    """An ONNX classifier file run by onnxruntime, answering probabilities or classes only.

    The file is checked (:func:`check_onnx_file`) before onnxruntime reads it; then it runs on one and on two black
    images, which must give ``[B, num_classes]`` scores. It takes normalised images, ``(x - mean) / std`` (give
    mean 0 and std 1 for a graph that takes [0, 1] pixels or normalises itself).

    Args:
        path: The ONNX file.
        num_classes: Classes of the data.
        in_channels: Channels of the data.
        image_size: Image side of the data.
        mean: Normalisation mean the graph expects.
        std: Normalisation std the graph expects.
        answers: ``probabilities`` or ``labels``: what leaves the black box (the graph's scores never do).
        outputs: What the graph's first output is: ``logits`` (softmaxed into probabilities) or ``probabilities``.
    """

    def __init__(
        self,
        path: str | Path,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        answers: Answers = "probabilities",
        outputs: str = "logits",
    ) -> None:
        super().__init__(num_classes, answers, f"ONNX victim {Path(path).name}")
        if outputs not in ONNX_OUTPUTS:
            raise ConfigError(
                f"onnx_outputs must be logits or probabilities, got {outputs!r}: set "
                f"{cli_flag('model', 'onnx_outputs')}."
            )
        self.path = Path(path)
        self.outputs = outputs
        self.model = check_onnx_file(path, in_channels, image_size, num_classes)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(
                "Running an ONNX victim needs onnxruntime: pip install 'refine-pl[onnx]' (or onnxruntime)."
            ) from error
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own error types
            raise ConfigError(f"onnxruntime cannot run {path} ({first_sentence(error)}): export it again.") from error
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        for batch in (1, 2):
            try:
                scores = self.scores(torch.zeros(batch, in_channels, image_size, image_size))
            except Exception as error:  # a graph that fails on the data's shape, with any error type
                raise ConfigError(
                    f"ONNX victim {path} cannot take {batch} {in_channels}-channel {image_size}x{image_size} image(s) "
                    f"({first_sentence(error)}): export it for this data with a dynamic batch."
                ) from error
            if scores.shape != (batch, num_classes):
                raise ConfigError(
                    f"ONNX victim {path} gives {list(scores.shape)} for {batch} image(s), not [{batch}, {num_classes}] "
                    "class scores: check the data's num_classes."
                )

    def scores(self, images: Tensor) -> np.ndarray:
        """The graph's first output on images in [0, 1] (normalised here), float32 ``[B, K]``."""
        normalised = ((images.float().cpu() - self.mean.cpu()) / self.std.cpu()).numpy()
        (scores,) = self.session.run([self.output_name], {self.input_name: normalised})
        return np.asarray(scores, dtype=np.float32)

    def answer(self, images: Tensor) -> Tensor:
        scores = torch.from_numpy(self.scores(images))
        if self.answers == "labels":
            return scores.argmax(1)
        return scores.softmax(1) if self.outputs == "logits" else scores
