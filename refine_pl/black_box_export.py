"""The files of a black-box defense: ``T`` and ``M`` in safetensors, and for an ONNX victim one defended ONNX graph.

The defended classifier is ``M(f_blackbox(T(x)))``. Its black box is not refine-pl's to copy: a query function stays
the user's, so :func:`save_black_box_defense` writes the transform and the remap with what rebuilds them, and
:func:`load_black_box_defense` puts them around the black box the caller gives (a module that calls the user's
function). An ONNX victim's graph can be copied: :func:`export_black_box_onnx` writes one ONNX graph of the
transform, the normalisation, the victim's own graph and the black box's answer with the remap, which gives what
the PyTorch-side defended classifier gives (up to float rounding).
"""

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from refine_pl.black_box import PROBABILITY_FLOOR, BlackBox, OnnxBlackBox
from refine_pl.classifier import DefendedClassifier
from refine_pl.errors import ConfigError
from refine_pl.remap import OutputRemap
from refine_pl.transform import UNet

FORMAT = "refine-pl-black-box-defense/1"
"""Value of the ``format`` field of a black-box defense's description (the file's ``refine_pl`` metadata entry)."""

ONNX_OPSET = 20
"""ONNX opset of the defended graph (the victim's graph is converted to it when it has another)."""


def _unet(defended: DefendedClassifier) -> UNet:
    transform = defended.transform
    if not isinstance(transform, UNet):
        raise ConfigError(
            f"Export rebuilds the transform from its size, which it knows for refine_pl.transform.UNet only; this "
            f"run's transform is {type(transform).__name__}: save the LightningModule's checkpoint instead."
        )
    return transform


def save_black_box_defense(
    defended: DefendedClassifier, image_size: int, path: str | Path, record: dict[str, Any] | None = None
) -> Path:
    """Writes ``T`` and ``M`` of a black-box defense to ``path`` (safetensors), with what rebuilds them.

    Args:
        defended: The defended classifier, whose victim is a :class:`~refine_pl.black_box.BlackBox`.
        image_size: Image side of the data.
        path: Output file.
        record: What the run knows of the black box (answers mode, its file's sha256, queries), recorded as it is.
    """
    transform = _unet(defended)
    box = defended.victim
    description = {
        "format": FORMAT,
        "num_classes": defended.remap.num_classes,
        "in_channels": transform.in_channels,
        "image_size": image_size,
        "transform": {"base_width": transform.base_width, "depth": transform.depth},
        "answers": box.answers,
        "black_box": box.name,
        "record": record or {},
    }
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in defended.state_dict().items()
        if name.startswith(("transform.", "remap."))
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"refine_pl": json.dumps(description)})
    return path


def load_black_box_defense(path: str | Path, black_box: BlackBox) -> DefendedClassifier:
    """The defended classifier ``M(black_box(T(x)))`` of a file of :func:`save_black_box_defense` around ``black_box``.

    Raises:
        ConfigError: The file is not a black-box defense, or ``black_box`` answers another number of classes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No black-box defense at {path}: a black-box REFINE run writes defended.safetensors.")
    with safe_open(str(path), framework="pt") as file:
        try:
            description = json.loads((file.metadata() or {}).get("refine_pl", "{}"))
        except ValueError as error:
            raise ConfigError(f"{path} has damaged refine-pl metadata ({error}): export the model again.") from error
        found = description.get("format") if isinstance(description, dict) else None
        if found != FORMAT:
            raise ConfigError(
                f"{path} is not a black-box defense (format {found!r}): load a white-box run's file with "
                "refine_pl.export.load_defended."
            )
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open has no iterator)
    num_classes, in_channels = int(description["num_classes"]), int(description["in_channels"])
    if black_box.num_classes != num_classes:
        raise ConfigError(
            f"{path} was trained in front of a black box of {num_classes} classes, but this one answers "
            f"{black_box.num_classes}: give the black box the defense was trained with."
        )
    size = description["transform"]
    transform = UNet(in_channels, base_width=int(size["base_width"]), depth=int(size["depth"]))
    defended = DefendedClassifier(
        transform, black_box, OutputRemap(num_classes), in_channels=in_channels, image_size=description["image_size"]
    )
    expected = [name for name in defended.state_dict() if name.startswith(("transform.", "remap."))]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing[:3])}: the file is damaged; export the model again.")
    defended.load_state_dict(tensors, strict=False)
    return defended.eval()


class _Transform(nn.Module):
    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = copy.deepcopy(transform).cpu().float().eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform(images.contiguous())


def _transform_graph(transform: nn.Module, in_channels: int, image_size: int) -> Any:
    import onnx

    example = torch.rand(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(
            _Transform(transform).eval(),
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["transformed"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return onnx.load_from_string(program.model_proto.SerializeToString())


def export_black_box_onnx(defended: DefendedClassifier, image_size: int, path: str | Path) -> Path:
    """Writes the defended classifier around an ONNX victim as one ONNX graph (input ``images``, output ``logits``).

    The graph: ``T`` (exported by torch), ``(x - mean) / std``, the victim's own graph (converted to opset
    :data:`ONNX_OPSET` if it has another), then the black box's answer as the PyTorch side scores it (log of the
    floored softmax probabilities, or one-hot classes for a label-only black box) and the remap ``M``.

    Raises:
        ConfigError: The victim is not an :class:`~refine_pl.black_box.OnnxBlackBox`, or its graph cannot be converted
            to the opset.
    """
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper, version_converter

    box = defended.victim
    if not isinstance(box, OnnxBlackBox):
        raise ConfigError(
            f"One defended ONNX graph needs an ONNX victim; this black box is a {type(box).__name__}: deploy "
            "refine_pl.black_box_export.load_black_box_defense around it instead."
        )
    transform = _unet(defended)
    front = _transform_graph(transform, transform.in_channels, image_size)
    victim = onnx.load(str(box.path))  # external data (checked to lie in the file's folder) loaded with it
    version = next((o.version for o in victim.opset_import if o.domain in ("", "ai.onnx")), ONNX_OPSET)
    if version != ONNX_OPSET:
        try:
            victim = version_converter.convert_version(victim, ONNX_OPSET)
        except Exception as error:  # the converter's own errors
            raise ConfigError(
                f"The ONNX victim's opset {version} cannot be converted to {ONNX_OPSET} ({error}): export the victim "
                f"at opset {ONNX_OPSET} and defend it again."
            ) from error
    mean = box.mean.cpu().numpy().astype(np.float32)
    std = box.std.cpu().numpy().astype(np.float32)
    graph = front.graph
    graph.initializer.extend([numpy_helper.from_array(mean, "bb_mean"), numpy_helper.from_array(std, "bb_std")])
    graph.node.extend(
        [
            helper.make_node("Sub", ["transformed", "bb_mean"], ["bb_centred"]),
            helper.make_node("Div", ["bb_centred", "bb_std"], ["normalised"]),
        ]
    )
    kept = [output for output in graph.output if output.name == "transformed"]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output[0].name = "normalised"
    ir_version = max(front.ir_version, victim.ir_version)
    front.ir_version = victim.ir_version = ir_version
    initializers = {tensor.name for tensor in victim.graph.initializer}
    victim_input = next(value.name for value in victim.graph.input if value.name not in initializers)
    victim_output = victim.graph.output[0].name
    del victim.graph.output[1:]
    merged = compose.merge_models(
        front, victim, io_map=[("normalised", victim_input)], prefix1="transform/", prefix2="victim/"
    )
    scores = f"victim/{victim_output}"
    inverse = torch.argsort(defended.remap.permutation.cpu()).numpy().astype(np.int64)
    num_classes = len(inverse)
    merged.graph.initializer.append(numpy_helper.from_array(inverse, "remap_columns"))
    nodes = []
    if box.answers == "labels":
        merged.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([num_classes], dtype=np.int64), "classes"),
                numpy_helper.from_array(np.array([0.0, 1.0], dtype=np.float32), "one_hot_values"),
            ]
        )
        nodes += [
            helper.make_node("ArgMax", [scores], ["answer"], axis=1, keepdims=0),
            helper.make_node("OneHot", ["answer", "classes", "one_hot_values"], ["answer_scores"], axis=-1),
        ]
    else:
        probabilities = scores
        if box.outputs == "logits":
            nodes.append(helper.make_node("Softmax", [scores], ["probabilities"], axis=1))
            probabilities = "probabilities"
        merged.graph.initializer.append(
            numpy_helper.from_array(np.array(PROBABILITY_FLOOR, dtype=np.float32), "probability_floor")
        )
        nodes += [
            helper.make_node("Max", [probabilities, "probability_floor"], ["floored"]),
            helper.make_node("Log", ["floored"], ["answer_scores"]),
        ]
    nodes.append(helper.make_node("Gather", ["answer_scores", "remap_columns"], ["logits"], axis=1))
    merged.graph.node.extend(nodes)
    del merged.graph.output[:]
    merged.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]))
    prefixed = merged.graph.input[0].name  # transform/images: back to the name of refine-pl's other ONNX files
    for node in merged.graph.node:
        node.input[:] = ["images" if name == prefixed else name for name in node.input]
    merged.graph.input[0].name = "images"
    onnx.checker.check_model(merged)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = merged.ByteSize() > 1_800_000_000
    onnx.save_model(merged, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)
    return path
