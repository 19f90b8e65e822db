"""Property-based tests of every reader of files and records from outside: victim weights, --ckpt_path
checkpoints, defended classifiers, image files and attack specs. Whatever the bytes (valid files mutated by
truncation, bit flips, overwritten spans and header edits, or random bytes) or the spec, the reader gives a
model / dataset item or one ConfigError line, never another exception, and stays within a memory bound.

The runs are derandomized (the same examples on every run) and small, so the whole file takes seconds.
"""

import io
import json
import resource
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from datamodules.datasets import ImageFileDataset, ImageTensorDataset, PoisonedTestSet, PoisonedTrainingSet
from refine_pl.architectures import build_architecture
from refine_pl.attacks import ATTACKS, Blended, LabelConsistent, attack_from_spec, attack_record
from refine_pl.attacks.base import constructor_parameters
from refine_pl.checkpoints import read_training_checkpoint
from refine_pl.classifier import DefendedClassifier, NormalizedClassifier
from refine_pl.errors import ConfigError
from refine_pl.export import export_defended, load_defended
from refine_pl.remap import OutputRemap
from refine_pl.transform import UNet
from refine_pl.victims import load_victim

MNIST = {"num_classes": 10, "in_channels": 1, "image_size": 28, "mean": (0.5,), "std": (0.25,)}
MEMORY_HEADROOM = 3 * 2**30
"""Address space a reader may add to the test process (bytes); far more than any valid input here needs."""

FUZZ = settings(
    max_examples=40,
    deadline=None,  # wall-clock deadlines fail at random on a loaded machine; pytest-timeout catches hangs
    derandomize=True,
    database=None,
    # bounded_memory holds for the whole test, across its examples, as intended
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture
def bounded_memory() -> Iterator[None]:
    """Caps the process's address space at its current size plus :data:`MEMORY_HEADROOM` during the test.

    A reader that tries to allocate what a file claims then fails fast instead of exhausting the machine.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    limit = current + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(current + MEMORY_HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _accept_config_error(read: Callable[[], object]) -> object | None:
    """``read()``, or None when it raises a one-line ConfigError that did not come from running out of memory."""
    try:
        result = read()
        event(f"read: {type(result).__name__}")
        return result
    except ConfigError as error:
        message = str(error)
        event(
            f"ConfigError: {message.split(':')[0][:40] if '/' not in message[:30] else message.split(' ', 2)[1][:30]}"
        )
        assert message and "\n" not in message, message
        cause: BaseException | None = error
        while cause is not None:
            assert not isinstance(cause, MemoryError) and "can't allocate memory" not in str(cause), message
            cause = cause.__cause__ or cause.__context__
        return None


def _read_file(path: Path, data: bytes, read: Callable[[Path], object]) -> object | None:
    """Writes ``data`` to ``path`` and reads it: ``read(path)``, or None after one ConfigError line."""
    path.write_bytes(data)
    return _accept_config_error(lambda: read(path))


def _flip_bits(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, bit in flips:
        mutable[position % len(mutable)] ^= 1 << bit
    return bytes(mutable)


def mutations(valid: bytes, header: int = 4096) -> st.SearchStrategy[bytes]:
    """Damaged versions of ``valid``: truncated, bit-flipped, a span overwritten, or random bytes.

    Positions are drawn mostly from the first ``header`` bytes and the last 1 KiB, where the formats keep their
    structure.
    """
    position = st.one_of(
        st.integers(0, min(header, len(valid) - 1)),
        st.integers(max(0, len(valid) - 1024), len(valid) - 1),
        st.integers(0, len(valid) - 1),
    )
    return st.one_of(
        st.builds(lambda n: valid[:n], st.integers(0, len(valid) - 1)),
        st.builds(_flip_bits, st.just(valid), st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=6)),
        st.builds(
            lambda at, span: valid[:at] + span + valid[at + len(span) :], position, st.binary(min_size=1, max_size=64)
        ),
        st.binary(max_size=512),
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
"""JSON-like values: what a header or a record could hold in place of the expected one."""

SMALL_TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 5), max_size=4).map(tuple),
    st.sampled_from([torch.uint8, torch.int16, torch.int64, torch.float32, torch.bool]),
    st.sampled_from([0.0, 1.0, 7.0, -3.0, float("nan")]),
)


# --- victim weights -------------------------------------------------------------------------------------------


def _victim_files() -> dict[str, bytes]:
    """A small_cnn for the MNIST shape in each format a victim arrives in, as bytes."""
    torch.manual_seed(0)
    state = build_architecture("small_cnn", 10, 1).state_dict()
    checkpoint = {
        "state_dict": {f"model.net.{key}": value for key, value in state.items()},
        "hyper_parameters": {"arch": "small_cnn", **MNIST},
        "backdoor_attack": {"name": "badnets", "init_args": {"target_label": 0}},
    }
    files = {}
    for name, content, legacy in (("zip", state, False), ("legacy", state, True), ("checkpoint", checkpoint, False)):
        buffer = io.BytesIO()
        torch.save(content, buffer, _use_new_zipfile_serialization=not legacy)
        files[name] = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
        files["safetensors"] = path.read_bytes()
    return files


VICTIM_FILES = _victim_files()


def _edited_pickle(archive: bytes, edit: tuple[int, bytes]) -> bytes:
    """``archive`` (torch.save's zip) with a span of its pickle overwritten, and valid CRCs.

    The unpickler itself then sees the damage instead of the zip reader.
    """
    source, target = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                at, span = edit
                at %= len(data)
                data = data[:at] + span + data[at + len(span) :]
            out.writestr(info, data)
    return target.getvalue()


def _edited_safetensors_header(data: bytes, edit: tuple[int, str, object]) -> bytes:
    """``data`` with one field (dtype, shape or data_offsets) of one tensor's header entry replaced."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    names = sorted(key for key in header if key != "__metadata__")
    index, field, value = edit
    header[names[index % len(names)]][field] = value
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


ODD_TENSORS = st.one_of(
    SMALL_TENSORS,
    st.sampled_from(
        [
            torch.zeros(32, 1, 3, 3, device="meta"),
            torch.zeros(32, 1, 3, 3).to_sparse(),
            torch.full((32, 1, 3, 3), complex(float("nan"), 0)),
            torch.full((32, 1, 3, 3), float("inf")),
            torch.zeros(32, 1, 3, 3, dtype=torch.int64),
            torch.zeros(32, 1, 3, 3, dtype=torch.bfloat16),
        ]
    ),
)
"""Tensors a weights file could hold in place of a weight: of any dtype, shape, layout or device."""


def _victim_with_tensor(edit: tuple[int, object]) -> bytes:
    """The plain state_dict file with one entry replaced by another tensor or any value."""
    torch.manual_seed(0)
    state = build_architecture("small_cnn", 10, 1).state_dict()
    index, value = edit
    state[sorted(state)[index % len(state)]] = value
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


VICTIM_BYTES = st.one_of(
    *(mutations(data) for data in VICTIM_FILES.values()),
    st.builds(
        _edited_pickle,
        st.sampled_from([VICTIM_FILES["zip"], VICTIM_FILES["checkpoint"]]),
        st.tuples(st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
    ),
    st.builds(
        _edited_safetensors_header,
        st.just(VICTIM_FILES["safetensors"]),
        st.tuples(st.integers(0, 20), st.sampled_from(["dtype", "shape", "data_offsets"]), JSON),
    ),
)


@FUZZ
@given(data=VICTIM_BYTES, arch=st.sampled_from([None, "small_cnn", "resnet18_cifar"]))
def test_any_victim_file_gives_a_classifier_or_one_config_error(
    folder: Path, bounded_memory: None, data: bytes, arch: str | None
) -> None:
    victim = _read_file(folder / "victim.ckpt", data, lambda path: load_victim(path, arch=arch, **MNIST).classifier)
    if victim is not None:
        assert isinstance(victim, NormalizedClassifier) and not victim.training
        assert victim(torch.rand(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@FUZZ
@given(edit=st.tuples(st.integers(0, 30), ODD_TENSORS | JSON))
def test_any_value_in_place_of_a_weight_gives_a_classifier_or_one_config_error(
    folder: Path, bounded_memory: None, edit: tuple[int, object]
) -> None:
    path = folder / "state_dict.pt"
    path.write_bytes(_victim_with_tensor(edit))
    victim = _accept_config_error(lambda: load_victim(path, arch="small_cnn", **MNIST).classifier)
    if victim is not None:
        assert all(bool(torch.isfinite(p).all()) for p in victim.parameters())
        assert victim(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def _exported_victim() -> bytes:
    """A small CNN for the MNIST shape as a torch.export archive (.pt2) with a dynamic batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).eval()
    buffer = io.BytesIO()
    shapes = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 28, 28),), dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


EXPORTED_VICTIM = _exported_victim()


def _edited_program(data: bytes, edit: tuple[int, object]) -> bytes:
    """The archive with one value anywhere in its program's JSON (or weights config) replaced by any JSON value."""
    source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    index, value = edit
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            content = source.read(info.filename)
            if info.filename.endswith(("models/model.json", "weights/model_weights_config.json")):
                document = json.loads(content)
                places = list(_json_places(document))
                if places:
                    parent, key = places[index % len(places)]
                    parent[key] = value
                content = json.dumps(document).encode()
            out.writestr(info, content)
    return target.getvalue()


def _json_places(value: object) -> Iterator[tuple[object, object]]:
    """Every (container, key or index) of a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield value, key
            yield from _json_places(item)
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield value, position
            yield from _json_places(item)


@FUZZ
@given(
    data=st.one_of(
        mutations(EXPORTED_VICTIM, header=256),
        st.builds(_edited_program, st.just(EXPORTED_VICTIM), st.tuples(st.integers(0, 10**4), JSON)),
    )
)
def test_any_exported_program_gives_a_classifier_or_one_config_error(
    folder: Path, bounded_memory: None, data: bytes
) -> None:
    path = folder / "victim.pt2"
    path.write_bytes(data)
    victim = _accept_config_error(lambda: load_victim(path, **MNIST).classifier)
    if victim is not None:
        assert victim(torch.rand(3, 1, 28, 28)).shape == (3, 10)


# --- training checkpoints (--ckpt_path) -----------------------------------------------------------------------


def _training_checkpoint() -> bytes:
    """A REFINE training checkpoint as a run writes it: weights, loop and optimizer state, the victim's digest."""
    torch.manual_seed(0)
    transform = UNet(1, base_width=2)
    optimizer = torch.optim.SGD(transform.parameters(), lr=0.1, momentum=0.9)
    transform(torch.rand(2, 1, 28, 28)).mean().backward()
    optimizer.step()
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "state_dict": {f"defended.transform.{key}": value for key, value in transform.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 0}}}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "victim": {"sha256": "0" * 64, "path": "victim.ckpt"},
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


TRAINING_CHECKPOINT = _training_checkpoint()


@FUZZ
@given(
    data=mutations(TRAINING_CHECKPOINT)
    | st.builds(_edited_pickle, st.just(TRAINING_CHECKPOINT), st.tuples(st.integers(0, 3000), st.binary(max_size=8)))
    | st.sampled_from(list(VICTIM_FILES.values()))
)
def test_any_ckpt_path_file_gives_a_training_checkpoint_or_one_config_error(
    folder: Path, bounded_memory: None, data: bytes
) -> None:
    checkpoint = _read_file(folder / "run.ckpt", data, read_training_checkpoint)
    if checkpoint is not None:
        assert isinstance(checkpoint["state_dict"], dict) and "global_step" in checkpoint


def test_the_valid_victim_files_load(folder: Path) -> None:
    for name, data in VICTIM_FILES.items():
        path = folder / f"{name}.bin"
        path.write_bytes(data)
        if name == "legacy":  # refused whole: its loader allocates what the file declares before checking it
            with pytest.raises(ConfigError, match="legacy"):
                load_victim(path, arch="small_cnn", **MNIST)
        else:
            assert isinstance(load_victim(path, arch="small_cnn", **MNIST).classifier, NormalizedClassifier)


# --- defended classifiers -------------------------------------------------------------------------------------


def _defended_file() -> bytes:
    torch.manual_seed(0)
    victim = NormalizedClassifier(build_architecture("small_cnn", 10, 1), (0.5,), (0.25,), arch="small_cnn")
    with tempfile.TemporaryDirectory() as folder:
        defended = DefendedClassifier(UNet(1, base_width=2, depth=2), victim, OutputRemap(10))
        path = export_defended(defended, 28, Path(folder) / "d.safetensors")
        return path.read_bytes()


DEFENDED_FILE = _defended_file()
DESCRIPTION_KEYS = [
    "format", "victim_arch", "num_classes", "in_channels", "image_size", "mean", "std", "transform",
    "class_names", "crop",
]  # fmt: skip


def _edited_description(data: bytes, edit: tuple[str, object, bool]) -> bytes:
    """The defended file with one metadata value replaced (or the key deleted)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    description = json.loads(header["__metadata__"]["refine_pl"])
    key, value, delete = edit
    if delete:
        description.pop(key, None)
    elif key == "transform" and isinstance(value, int):
        description["transform"]["depth"] = value
    else:
        description[key] = value
    header["__metadata__"]["refine_pl"] = json.dumps(description)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def _replaced_tensor(data: bytes, edit: tuple[int, torch.Tensor]) -> bytes:
    """The defended file with one tensor replaced by another of any dtype and shape."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    tensors = load_bytes(data)
    names = sorted(tensors)
    index, tensor = edit
    tensors[names[index % len(names)]] = tensor.contiguous()
    return save_bytes(tensors, metadata=metadata)


PERMUTATIONS = st.lists(st.integers(-2, 12), min_size=0, max_size=12).map(lambda v: torch.tensor(v, dtype=torch.long))
DEFENDED_BYTES = st.one_of(
    mutations(DEFENDED_FILE),
    st.builds(
        _edited_description,
        st.just(DEFENDED_FILE),
        st.tuples(st.sampled_from([*DESCRIPTION_KEYS, "extra"]), JSON | st.integers(-3, 10**12), st.booleans()),
    ),
    st.builds(_replaced_tensor, st.just(DEFENDED_FILE), st.tuples(st.integers(0, 100), SMALL_TENSORS)),
    st.builds(lambda p: _replaced_tensor(DEFENDED_FILE, (10**6, p)), PERMUTATIONS),  # the last name is the remap
)


@FUZZ
@given(data=DEFENDED_BYTES)
def test_any_defended_file_gives_a_classifier_or_one_config_error(
    folder: Path, bounded_memory: None, data: bytes
) -> None:
    model = _read_file(folder / "defended.safetensors", data, load_defended)
    if model is not None:
        assert isinstance(model, DefendedClassifier) and not model.training
        permutation = model.remap.permutation
        assert torch.equal(permutation.sort().values, torch.arange(10)) and not (permutation == torch.arange(10)).any()
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_the_valid_defended_file_loads(folder: Path) -> None:
    path = folder / "valid.safetensors"
    path.write_bytes(DEFENDED_FILE)
    assert isinstance(load_defended(path), DefendedClassifier)


# --- image files ----------------------------------------------------------------------------------------------

IMAGE_KINDS = {  # mode: (numpy dtype of its pixels, channels, file formats that store it)
    "1": (np.bool_, 1, ["PNG", "TIFF", "BMP"]),
    "L": (np.uint8, 1, ["PNG", "JPEG", "TIFF", "BMP", "PPM", "WEBP"]),
    "LA": (np.uint8, 2, ["PNG", "TIFF"]),
    "P": (np.uint8, 1, ["PNG", "GIF", "BMP", "TIFF"]),
    "RGB": (np.uint8, 3, ["PNG", "JPEG", "TIFF", "BMP", "PPM", "WEBP", "GIF"]),
    "RGBA": (np.uint8, 4, ["PNG", "TIFF", "WEBP"]),
    "CMYK": (np.uint8, 4, ["JPEG", "TIFF"]),
    "I;16": (np.uint16, 1, ["PNG", "TIFF"]),
    "I": (np.int32, 1, ["TIFF", "PPM"]),
    "F": (np.float32, 1, ["TIFF"]),
}


def _image_bytes(mode: str, file_format: str, side: tuple[int, int], seed: int, special: float | None) -> bytes:
    dtype, channels, _ = IMAGE_KINDS[mode]
    rng = np.random.default_rng(seed)
    shape = (side[0], side[1]) + ((channels,) if channels > 1 else ())
    if dtype == np.bool_:
        pixels = rng.integers(0, 2, shape).astype(bool)
    elif dtype == np.float32:
        pixels = rng.random(shape, dtype=np.float32)
        if special is not None:
            pixels.flat[0] = special
    else:
        info = np.iinfo(dtype)
        pixels = rng.integers(max(info.min, -(2**20)), min(info.max, 2**20) + 1, shape, dtype=np.int64).astype(dtype)
    image = Image.frombytes(mode, side[::-1], pixels.tobytes()) if mode in ("LA", "CMYK") else Image.fromarray(pixels)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=file_format)
    return buffer.getvalue()


VALID_IMAGES = st.sampled_from(sorted(IMAGE_KINDS)).flatmap(
    lambda mode: st.builds(
        _image_bytes,
        st.just(mode),
        st.sampled_from(IMAGE_KINDS[mode][2]),
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        st.integers(0, 2**16),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    )
)
IMAGE_BYTES = st.one_of(VALID_IMAGES, VALID_IMAGES.flatmap(lambda data: mutations(data, header=256)))


@settings(FUZZ, max_examples=80)
@given(data=IMAGE_BYTES, image_size=st.integers(1, 10), crop=st.booleans())
def test_any_image_file_gives_an_item_in_0_1_or_one_config_error(
    folder: Path, bounded_memory: None, data: bytes, image_size: int, crop: bool
) -> None:
    item = _read_file(
        folder / "image", data, lambda path: ImageFileDataset([str(path)], torch.tensor([1]), image_size, crop)[0]
    )
    if item is not None:
        image, label = item
        assert label == 1 and image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
        assert bool(torch.isfinite(image).all()) and image.min() >= 0 and image.max() <= 1


# --- attack specs ---------------------------------------------------------------------------------------------


def _valid_records() -> list[dict]:
    """Records of attacks with state, as a victim checkpoint holds them."""
    pattern = Blended(pattern_path=None)
    pattern.pattern_path, pattern._file_pattern = "pattern.png", torch.zeros(3, 4, 4, dtype=torch.uint8)
    lc = LabelConsistent(target_label=1)
    lc.load_state_dict(
        {"poison_indices": torch.tensor([0, 2]), "perturbations": torch.ones(2, 1, 8, 8, dtype=torch.int16)}
    )
    return [attack_record(pattern), attack_record(lc)]


def _spec_variant(name: str, edits: dict, state: object, with_state: bool) -> dict:
    spec = {"name": name, "init_args": edits}
    if with_state:
        spec["state"] = state
    return spec


STATES = st.dictionaries(
    st.sampled_from(["pattern", "poison_indices", "perturbations", "in_channels", "networks", "x"]),
    JSON | SMALL_TENSORS,
    max_size=3,
)
INIT_ARGS = st.dictionaries(
    st.sampled_from(
        [
            "target_label",
            "poison_rate",
            "seed",
            "patch_size",
            "location",
            "margin",
            "pattern",
            "alpha",
            "grid_size",
            "strength",
            "grid_rescale",
            "cross_ratio",
            "angle",
            "shift_x",
            "transformation",
            "degrees",
            "max_scale",
            "locations",
            "train_alphas",
            "test_triggers",
            "test_alpha",
            "epsilon",
            "trigger_size",
            "width",
            "pattern_path",
            "unknown",
        ]
    ),
    JSON | st.integers(-5, 40) | st.floats(-2, 40),
    max_size=3,
)
NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 1e-300, 1e300, sys.float_info.max, -sys.float_info.max, 2**63, 360.0, 720.5]),
    st.integers(-3, 64),
    st.integers(),
    st.floats(),
    st.floats(-1.5, 1.5),
)
"""Values for one constructor argument: mostly numbers, small and extreme, finite or not."""

RECORDS = st.one_of(
    JSON,
    st.builds(_spec_variant, st.sampled_from(sorted(ATTACKS)), INIT_ARGS, STATES, st.booleans()),
    st.builds(
        lambda record, edits, state: {**record, "init_args": {**record["init_args"], **edits}, "state": state},
        st.sampled_from(_valid_records()),
        INIT_ARGS,
        st.one_of(st.builds(lambda r: r["state"], st.sampled_from(_valid_records())), STATES),
    ),
)
"""Whole specs and records: any JSON, any attack with any arguments and state, valid records edited."""


def _check_poisoned_items(spec: object, channels: int) -> None:
    """Rebuilds the attack of ``spec`` and poisons a test item, a training item and a cover item with it."""
    generator = torch.Generator().manual_seed(0)
    data = ImageTensorDataset(torch.randint(0, 256, (20, channels, 8, 8), dtype=torch.uint8, generator=generator),
                              torch.arange(20) % 5)  # fmt: skip
    attack = _accept_config_error(lambda: attack_from_spec(spec))
    if attack is None or attack.target_label >= 5:  # the datamodule refuses targets that are not classes
        return
    chosen = _accept_config_error(lambda: _poisoned_and_covered(attack, data.labels))
    indices = [] if chosen is None else [int(selection[0]) for selection in chosen if len(selection)]
    training = None if chosen is None else PoisonedTrainingSet(data, attack, chosen[0], cover_indices=chosen[1])
    for item in [lambda: PoisonedTestSet(data, attack)[0][0], *(lambda i=i: training[i][0] for i in indices)]:
        image = _accept_config_error(item)
        if image is not None:
            assert image.shape == (channels, 8, 8) and bool(torch.isfinite(image).all())
            assert image.min() >= -1e-3 and image.max() <= 1 + 1e-3


ATTACK_ARGUMENTS = [
    (name, argument) for name in sorted(ATTACKS) for argument in sorted(constructor_parameters(ATTACKS[name]))
]


@pytest.mark.parametrize(("name", "argument"), ATTACK_ARGUMENTS)
@settings(FUZZ, max_examples=15)
@given(value=NUMBERS | JSON, channels=st.sampled_from([1, 3]))
def test_any_argument_of_an_attack_gives_poisoned_items_in_0_1_or_one_config_error(
    bounded_memory: None, name: str, argument: str, value: object, channels: int
) -> None:
    _check_poisoned_items({"name": name, "init_args": {argument: value}}, channels)


@settings(FUZZ, max_examples=150)
@given(spec=RECORDS, channels=st.sampled_from([1, 3]))
def test_any_attack_record_gives_poisoned_items_in_0_1_or_one_config_error(
    bounded_memory: None, spec: object, channels: int
) -> None:
    _check_poisoned_items(spec, channels)


def _poisoned_and_covered(attack, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    poisoned = attack.select_poison_indices(labels)
    return poisoned, attack.select_cover_indices(labels, poisoned)
