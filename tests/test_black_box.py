"""REFINE in front of a model that can only be queried: a query function, an ONNX file, a victim answering labels or
probabilities only. The black box is never asked for a gradient, the pseudo-labels are its own answers (never the
surrogate's), label-only mode never sees a probability, ONNX files are checked before anything of them runs, and the
defended ONNX graph gives what the PyTorch side gives.
"""

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pytorch_lightning import Callback
from torch import Tensor

from callbacks import RunCheckpoint
from datamodules import RefineDataModule
from refine_pl import RefineLitModule
from refine_pl.base_module import BackdoorLitModule
from refine_pl.black_box import BlackBox, ModelAnswers, OnnxBlackBox, QueryFunction, check_onnx_file
from refine_pl.black_box_export import export_black_box_onnx, load_black_box_defense, save_black_box_defense
from refine_pl.black_box_module import BlackBoxRefineLitModule, budget_indices, default_surrogate_arch
from refine_pl.defend import main
from refine_pl.errors import ConfigError
from refine_pl.metric_names import AGREEMENT
from refine_pl.transform import UNet
from refine_pl.victims import load_victim
from tests.conftest import MNIST_FACTS, SmallDigits, quiet_trainer, write_victim_checkpoint
from tests.test_unlabeled_folder import write_images, write_test_folder

TINY = {**MNIST_FACTS, "transform": partial(UNet, base_width=4), "surrogate_epochs": 1}


def brightness_class(images: np.ndarray) -> np.ndarray:
    """A label-only service: the class of each image is its mean brightness in hundredths, modulo 10."""
    return (images.reshape(len(images), -1).mean(1) * 100).astype(np.int64) % 10


def digits(min_epoch_samples: int = 0) -> RefineDataModule:
    """80 training digits in augmented views with their originals and indices, 30 test digits."""
    return RefineDataModule(
        SmallDigits((8,) * 10, (3,) * 10), batch_size=16, horizontal_flip=False, consistency=True, max_rotation=15,
        num_workers=0, min_epoch_samples=min_epoch_samples,
    )  # fmt: skip


def fit_and_test(module: BlackBoxRefineLitModule, root: Path, steps: int = 2) -> None:
    trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0)
    data = digits()
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)


def write_onnx_classifier(
    path: Path,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    domain: str = "",
    opset: int = 17,
    seed: int = 0,
) -> Path:
    """A linear classifier as an ONNX graph: Flatten, then Gemm to ``num_classes`` logits (dynamic batch)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, (in_channels * image_size * image_size, num_classes)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("Gemm", ["flat", "weight"], ["logits"]),
    ]
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        nodes.append(helper.make_node("Evil", ["logits"], ["scores"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", in_channels, image_size, image_size])],
        [helper.make_tensor_value_info("scores" if domain else "logits", TensorProto.FLOAT, ["batch", num_classes])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """No onnxruntime session opens: a file refine-pl checks must be refused before one would."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("onnxruntime ran a file refine-pl should have refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


# ---- the black box answers, and nothing more -------------------------------------------------------------------------


def test_the_black_box_is_never_asked_for_a_gradient_and_its_queries_are_counted(tmp_path: Path) -> None:
    classifier, _ = load_victim(write_victim_checkpoint(tmp_path / "v.ckpt"), **MNIST_FACTS)
    seen = []

    def service(images: np.ndarray) -> np.ndarray:
        assert isinstance(images, np.ndarray) and images.dtype == np.float32  # a plain array, never a tensor
        assert not torch.is_grad_enabled()
        seen.append(len(images))
        return classifier(torch.from_numpy(images)).softmax(1).numpy()

    box = QueryFunction(service, 10, name="my service")
    module = BlackBoxRefineLitModule(black_box=box, **TINY)
    fit_and_test(module, tmp_path)
    record = json.loads((tmp_path / "black_box.json").read_text())
    assert record["training_queries"] == module.training_queries == record["answered_images"] > 0
    assert record["answered_images"] == record["training_images"]  # each once, also those a dropped last batch held
    assert box.queries == sum(seen) == module.training_queries + record["test_queries"]
    assert record["answers"] == "probabilities" and record["surrogate_arch"] == "small_cnn"
    assert 0 <= record["surrogate_test_agreement"] <= 1
    assert all(not p.requires_grad for p in module.surrogate.parameters())
    assert module.victim_record.path == "my service"


def test_the_pseudo_labels_are_the_black_boxs_answers_not_the_surrogates(tmp_path: Path) -> None:
    def scrambled_class(images: np.ndarray) -> np.ndarray:  # answers no network could be distilled into in 1 epoch
        return (images.reshape(len(images), -1).sum(1) * 7).astype(np.int64) % 10

    module = BlackBoxRefineLitModule(black_box=QueryFunction(scrambled_class, 10, answers="labels"), **TINY)
    given = []
    original = module.pseudo_labels

    def spy(images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        labels = original(images, indices)
        given.append((images.detach().cpu(), labels.cpu()))
        return labels

    module.pseudo_labels = spy
    fit_and_test(module, tmp_path, steps=3)
    assert given
    images = torch.cat([batch for batch, _ in given])
    labels = torch.cat([labels for _, labels in given])
    assert torch.equal(labels, torch.from_numpy(scrambled_class(images.numpy())))
    with torch.no_grad():
        surrogate = module.surrogate(images).argmax(1)
    assert not torch.equal(labels, surrogate)  # the surrogate's guesses differ: they were not used


def test_label_only_mode_never_sees_a_probability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classifier, _ = load_victim(write_victim_checkpoint(tmp_path / "v.ckpt"), **MNIST_FACTS)
    box = ModelAnswers(classifier, 10, answers="labels")
    answers = []
    ask = BlackBox.ask

    def spy(self: BlackBox, images: torch.Tensor) -> torch.Tensor:
        answer = ask(self, images)
        answers.append(answer)
        return answer

    monkeypatch.setattr(BlackBox, "ask", spy)
    module = BlackBoxRefineLitModule(black_box=box, **TINY)
    fit_and_test(module, tmp_path)
    assert answers and all(a.ndim == 1 and a.dtype == torch.long for a in answers)
    assert module._answers.ndim == 1 and module._answers.dtype == torch.long

    def service(images: np.ndarray) -> np.ndarray:  # a service that gives probabilities where labels were promised
        return np.full((len(images), 10), 0.1, dtype=np.float32)

    with pytest.raises(ConfigError, match="answers labels only but gave an answer of shape .*answers probabilities"):
        QueryFunction(service, 10, answers="labels").ask(torch.rand(3, 1, 28, 28))


def test_a_resumed_run_asks_the_black_box_nothing_again(tmp_path: Path) -> None:
    no_refresh = {**TINY, "surrogate_refresh_epochs": 0}  # the refreshes ask about T's new outputs (tested below)
    first = BlackBoxRefineLitModule(black_box=QueryFunction(brightness_class, 10, answers="labels"), **no_refresh)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(first, datamodule=digits())
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    box = QueryFunction(brightness_class, 10, answers="labels")
    resumed = BlackBoxRefineLitModule(black_box=box, **no_refresh)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(
        resumed, datamodule=digits(), ckpt_path=tmp_path / "first.ckpt"
    )
    assert box.queries == 0 and resumed.training_queries == first.training_queries > 0
    assert torch.equal(resumed._answers, first._answers)


@pytest.mark.parametrize(
    ("min_epoch_samples", "expected_refresh_queries"),
    [
        (0, lambda answered: answered - answered % 16),  # one pass an epoch: the full batches
        (4 * 80, lambda answered: answered),  # 4 passes an epoch: each image once, the leftover included
    ],
)
def test_a_surrogate_refresh_asks_about_ts_output_once_per_answered_image_and_counts_those_queries(
    tmp_path: Path, min_epoch_samples: int, expected_refresh_queries: Any
) -> None:
    box = QueryFunction(brightness_class, 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, surrogate_refresh_epochs=1, **TINY)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=digits(min_epoch_samples))
    answered = module.record["answered_images"]
    assert module.record["surrogate_refreshes"] == 1  # before epoch 1 (none before epoch 0)
    assert module.training_queries == box.queries == answered + expected_refresh_queries(answered)
    with pytest.raises(ConfigError, match="surrogate_refresh_epochs"):
        BlackBoxRefineLitModule(black_box=box, surrogate_refresh_epochs=-1, **TINY)


def test_an_online_surrogate_asks_about_ts_output_in_every_training_step(tmp_path: Path) -> None:
    box = QueryFunction(brightness_class, 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, surrogate_online=True, surrogate_refresh_epochs=0, **TINY)
    distilled = {}
    original = module._query_and_distill

    def snapshot() -> None:
        original()
        distilled.update({name: value.clone() for name, value in module.surrogate.state_dict().items()})

    module._query_and_distill = snapshot
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=digits())
    answered = module.record["answered_images"]
    assert module.training_queries == box.queries == answered + 3 * 16  # 3 steps, each asks about its 16 views
    moved = [name for name, value in module.surrogate.state_dict().items() if not torch.equal(value, distilled[name])]
    assert moved  # the surrogate took a step in each training step
    assert not module.surrogate.training and all(not p.requires_grad for p in module.surrogate.parameters())
    with pytest.raises(ConfigError, match="surrogate_online refreshes the surrogate in every training step"):
        BlackBoxRefineLitModule(black_box=box, surrogate_online=True, surrogate_refresh_epochs=1, **TINY)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (np.zeros(3, dtype=np.int64), "answers probabilities but gave .*set answers labels"),
        (np.full((3, 10), 0.5, dtype=np.float32), "not probabilities"),
        (np.full((3, 4), 0.25, dtype=np.float32), r"shape \(3, 4\)"),
    ],
)
def test_answers_that_are_not_what_the_mode_says_are_refused(answer: np.ndarray, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QueryFunction(lambda images: answer, 10).ask(torch.rand(3, 1, 28, 28))


def test_the_query_budget_bounds_the_images_answered_and_the_surrogate_fits_the_data(tmp_path: Path) -> None:
    assert len(budget_indices(100, 0.25, 0)) == 25 and len(budget_indices(100, 40, 0)) == 40
    assert set(budget_indices(100, 0.1, 0).tolist()) <= set(budget_indices(100, 0.5, 0).tolist())
    assert (default_surrogate_arch(28), default_surrogate_arch(32), default_surrogate_arch(224)) == (
        "small_cnn", "resnet18_cifar_narrow", "resnet18"
    )  # fmt: skip
    for bad in (0, -1, 2.5, float("nan")):
        with pytest.raises(ConfigError, match="query_budget"):
            BlackBoxRefineLitModule(black_box=QueryFunction(lambda x: x, 10), query_budget=bad, **TINY)
    box = QueryFunction(lambda images: np.zeros(len(images), dtype=np.int64), 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, query_budget=0.25, **TINY)
    fit_and_test(module, tmp_path)
    assert (
        module.training_queries
        == box.queries - json.loads((tmp_path / "black_box.json").read_text())["test_queries"]
        <= 18
    )  # a quarter of 72 training digits (the rest of the 80 is held out)


# ---- ONNX files ------------------------------------------------------------------------------------------------------


def test_a_white_box_defense_sends_an_onnx_victim_to_the_black_box_path(tmp_path: Path, no_onnxruntime: None) -> None:
    path = write_onnx_classifier(tmp_path / "vendor.onnx")
    with pytest.raises(ConfigError, match="configs/refine/black_box.yaml"):
        RefineLitModule(victim_checkpoint=str(path), **MNIST_FACTS)


def test_an_onnx_file_with_a_custom_domain_is_refused_without_running(tmp_path: Path, no_onnxruntime: None) -> None:
    path = write_onnx_classifier(tmp_path / "vendor.onnx", domain="com.vendor")
    with pytest.raises(ConfigError, match=r"custom domain\(s\) com.vendor.*standard ONNX operators only"):
        BlackBoxRefineLitModule(victim_checkpoint=str(path), **TINY)


def test_external_data_outside_the_files_folder_is_refused_without_running(tmp_path: Path) -> None:
    path = write_onnx_classifier(tmp_path / "model" / "vendor.onnx")
    (tmp_path / "elsewhere").mkdir()
    for location in ("../elsewhere/weights.bin", str(tmp_path / "elsewhere" / "weights.bin")):
        keep_weights_in(path, location)  # written by hand: onnx.save_model refuses such paths itself
        with pytest.raises(ConfigError, match="outside the file's folder"):
            check_onnx_file(path, 1, 28, 10)
    keep_weights_in(path, "weights.bin")
    check_onnx_file(path, 1, 28, 10)  # beside the model: read
    assert OnnxBlackBox(path, 10, 1, 28, (0.0,), (1.0,)).ask(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def keep_weights_in(path: Path, location: str) -> None:
    """Writes the linear classifier to ``path`` with its weight tensor in the external file ``location``."""
    model = onnx.load(str(write_onnx_classifier(path)))
    tensor = model.graph.initializer[0]
    (path.parent / location).write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({"in_channels": 3}, r"takes float input \['B', 1, 28, 28\], not float images \[B, 3, 28, 28\]"),
        ({"image_size": 32}, r"not float images \[B, 1, 32, 32\]"),
        ({"num_classes": 5}, r"gives output \['B', 10\], not \[B, 5\].*num_classes 10"),
    ],
)
def test_an_onnx_graph_that_does_not_fit_the_data_is_refused_in_one_line(
    tmp_path: Path, no_onnxruntime: None, facts: dict, message: str
) -> None:
    path = write_onnx_classifier(tmp_path / "vendor.onnx")
    shape = {"in_channels": 1, "image_size": 28, "num_classes": 10, **facts}
    with pytest.raises(ConfigError, match=message):
        check_onnx_file(path, **shape)


def test_too_large_a_graph_and_a_file_that_is_not_onnx_are_refused(
    tmp_path: Path, no_onnxruntime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_onnx_classifier(tmp_path / "vendor.onnx")
    monkeypatch.setattr("refine_pl.black_box.ONNX_MAX_NODES", 1)
    with pytest.raises(ConfigError, match="has 2 nodes, more than refine-pl reads"):
        check_onnx_file(path, 1, 28, 10)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a protobuf at all\xff\xff")
    with pytest.raises(ConfigError, match="is not an ONNX model|malformed"):
        check_onnx_file(tmp_path / "junk.onnx", 1, 28, 10)


@pytest.mark.parametrize("answers", ["probabilities", "labels"])
def test_the_defended_onnx_graph_equals_the_pytorch_defended_classifier(tmp_path: Path, answers: str) -> None:
    victim = write_onnx_classifier(tmp_path / "vendor.onnx", opset=17)  # converted to the export's opset
    module = BlackBoxRefineLitModule(victim_checkpoint=str(victim), answers=answers, **TINY)
    assert isinstance(module.black_box, OnnxBlackBox)
    path = export_black_box_onnx(module.defended, 28, tmp_path / "defended.onnx")
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = module.defended.eval()(images)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.from_numpy(logits).argmax(1), expected.argmax(1))


def test_the_defense_of_a_query_function_reloads_around_it(tmp_path: Path) -> None:
    module = BlackBoxRefineLitModule(black_box=QueryFunction(brightness_class, 10, answers="labels"), **TINY)
    path = save_black_box_defense(module.defended, 28, tmp_path / "defended.safetensors")
    reloaded = load_black_box_defense(path, QueryFunction(brightness_class, 10, answers="labels"))
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), module.defended.eval()(images))
    with pytest.raises(ConfigError, match="black box of 10 classes"):
        load_black_box_defense(path, QueryFunction(brightness_class, 4, answers="labels"))


# ---- the command line ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_onnx_victim_is_defended_end_to_end_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_onnx_classifier(tmp_path / "vendor.onnx", num_classes=3)
    write_images(tmp_path / "my_images", 24)
    write_test_folder(tmp_path / "my_test", ["a", "b", "c"])
    report = main(
        ["vendor.onnx", "my_images", "--mean", "0.5", "--std", "0.25", "--channels", "1", "--max-epochs", "1",
         "--batch-size", "8", "--answers", "labels", "--query-budget", "0.5", "--test-root", "my_test", "--out", "run",
         "--", "--model.init_args.transform.init_args.base_width", "4", "--model.init_args.surrogate_epochs", "1",
         "--data.init_args.num_workers", "0", "--data.init_args.min_epoch_samples", "0",
         "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Inferred --image-size 28: the graph of vendor.onnx" in out
    assert "Inferred --num-classes 3: the graph of vendor.onnx" in out
    run = tmp_path / "run"
    assert {"defended.safetensors", "defended.onnx", "MODEL_CARD.md", "black_box.json"} <= {
        p.name for p in run.iterdir()
    }  # fmt: skip
    record = json.loads((run / "black_box.json").read_text())
    assert record["answers"] == "labels" and record["query_budget"] == 0.5
    assert 0 < record["training_queries"] <= 12  # half the training images (some of the 24 are held out)
    assert 0 <= report["defended"]["ba"] <= 1
    card = (run / "MODEL_CARD.md").read_text()
    answered = f"{record['answered_images']} images for training, {record['training_queries']} training queries"
    assert "## Black box" in card and answered in card
    session = onnxruntime.InferenceSession(str(run / "defended.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": np.random.default_rng(0).random((2, 1, 28, 28), np.float32)})
    assert logits.shape == (2, 3)


def test_label_smoothing_spreads_the_surrogates_probability_and_bad_settings_are_refused() -> None:
    images = torch.stack([image for image, _ in SmallDigits((2,) * 10).load()[0]])
    classes = torch.arange(10).repeat_interleave(2)
    confidence = {}
    for smoothing in (0.0, 0.5):
        torch.manual_seed(0)
        box = QueryFunction(brightness_class, 10, answers="labels")
        module = BlackBoxRefineLitModule(black_box=box, surrogate_label_smoothing=smoothing, **TINY)
        module.surrogate.requires_grad_(True).train()
        optimizer = torch.optim.Adam(module.surrogate.parameters(), lr=1e-3)
        for _ in range(60):
            module._distillation_step(optimizer, images, classes)
        module.surrogate.eval()
        with torch.no_grad():
            confidence[smoothing] = module.surrogate(images).softmax(1).amax(1).mean().item()
    # the answered class's target share: 1 without smoothing, 1 - 0.5 + 0.5 / 10 = 0.55 with 0.5
    assert confidence[0.5] < 0.7 < confidence[0.0]
    box = QueryFunction(brightness_class, 10, answers="labels")
    for bad in ({"surrogate_label_smoothing": 1.0}, {"surrogate_label_smoothing": -0.1}):
        with pytest.raises(ConfigError, match="surrogate_label_smoothing is a share in"):
            BlackBoxRefineLitModule(black_box=box, **bad, **TINY)
    with pytest.raises(ConfigError, match="surrogate_refresh_lr must be above 0"):
        BlackBoxRefineLitModule(black_box=box, surrogate_refresh_lr=0.0, **TINY)


class KeepWeights(Callback):
    """The module's trained state before (``trained``) and after (``weights``) each validation, by 0-based epoch."""

    def __init__(self) -> None:
        self.trained: dict[int, dict[str, Tensor]] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_validation_start(self, trainer: Any, module: BlackBoxRefineLitModule) -> None:
        self.trained[module.current_epoch] = {k: v.clone() for k, v in module._trained_state().items()}

    def on_validation_end(self, trainer: Any, module: BlackBoxRefineLitModule) -> None:
        self.weights[module.current_epoch] = {k: v.clone() for k, v in module._trained_state().items()}


def script_agreements(monkeypatch: pytest.MonkeyPatch, agreements: list[float]) -> None:
    """Each validation measures the next of ``agreements`` as the label-free agreement (on 8 held-out images)."""

    def scripted_agreement(module: BackdoorLitModule) -> None:
        epoch = module.current_epoch
        module.label_free_estimate = {AGREEMENT: agreements[epoch], "held_out_images": 8, "epoch": epoch + 1}

    monkeypatch.setattr(BackdoorLitModule, "on_validation_epoch_end", scripted_agreement)


def test_a_collapsed_agreement_rolls_t_and_the_surrogate_back_to_the_best_epoch_and_a_resume_keeps_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agreements = [0.5, 0.9, 0.7, 0.4, 0.85]  # epoch 3 falls 0.2 below the best (kept), epoch 4 0.5 (rolled back)
    script_agreements(monkeypatch, agreements)
    kept_weights = KeepWeights()
    weights = kept_weights.weights
    box = QueryFunction(brightness_class, 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, agreement_rollback=0.3, **TINY)
    epochs = {"limit_train_batches": 2, "limit_val_batches": 1, "callbacks": [kept_weights]}
    trainer = quiet_trainer(tmp_path, max_epochs=4, **epochs)
    with pytest.warns(UserWarning, match="fell to 0.4 in epoch 4.*go back to that epoch's weights"):
        trainer.fit(module, datamodule=digits())
    assert module.record["agreement_rollbacks"] == [
        {"epoch": 4, "agreement": 0.4, "restored_epoch": 2, "restored_agreement": 0.9}
    ]
    best, kept = weights[1], weights[2]  # epoch 2's weights, and epoch 3's, which were not rolled back
    assert any(not torch.equal(kept[name], best[name]) for name in best)
    assert all(torch.equal(weights[3][name], best[name]) for name in best)
    assert module.label_free_estimate[AGREEMENT] == 0.9  # the estimate describes the weights held
    held, saved = trainer.optimizers[0].state_dict()["state"], module._best["optimizers"][0]["state"]
    assert held.keys() == saved.keys() and held  # the optimizer state goes back too (momentum and step count)
    assert all(torch.equal(torch.as_tensor(held[p][k]), torch.as_tensor(saved[p][k])) for p in held for k in held[p])
    trainer.save_checkpoint(tmp_path / "rolled_back.ckpt")

    agreements[4] = 0.55  # 0.35 below the best the checkpoint kept, though above the epoch before it
    resumed = BlackBoxRefineLitModule(black_box=QueryFunction(brightness_class, 10, answers="labels"),
                                      agreement_rollback=0.3, **TINY)  # fmt: skip
    quiet_trainer(tmp_path, max_epochs=5, **epochs).fit(
        resumed, datamodule=digits(), ckpt_path=tmp_path / "rolled_back.ckpt"
    )
    assert [r["epoch"] for r in resumed.record["agreement_rollbacks"]] == [4, 5]
    assert all(torch.equal(weights[4][name], best[name]) for name in best)
    for bad in (0.0, 1.0, True):
        with pytest.raises(ConfigError, match="agreement_rollback is a fall of the label-free agreement"):
            BlackBoxRefineLitModule(black_box=box, agreement_rollback=bad, **TINY)


def test_the_refreshes_rate_follows_ts_schedule_when_asked(tmp_path: Path) -> None:
    class QuarterRate(Callback):  # T's schedule at a quarter of its full rate
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            for group in trainer.optimizers[0].param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] / 4

    rates = {}
    for follows in (False, True):
        box = QueryFunction(brightness_class, 10, answers="labels")
        module = BlackBoxRefineLitModule(
            black_box=box, surrogate_online=True, surrogate_refresh_epochs=0, surrogate_refresh_lr=0.002,
            surrogate_refresh_schedule=follows, **TINY,
        )  # fmt: skip
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[QuarterRate()]).fit(
            module, datamodule=digits()
        )
        rates[follows] = module._online_optimizer.param_groups[0]["lr"]
    assert rates == {False: 0.002, True: pytest.approx(0.0005)}


@pytest.mark.parametrize(("agreements", "kept_epoch"), [([0.5, 0.9, 0.7, 0.8], 2), ([0.5, 0.9, 0.7, 0.95], 4)])
def test_the_best_agreements_epoch_is_kept_at_the_end_and_is_what_the_last_checkpoint_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agreements: list[float], kept_epoch: int
) -> None:
    script_agreements(monkeypatch, agreements)
    kept_weights = KeepWeights()
    box = QueryFunction(brightness_class, 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, keep_best_agreement=True, **TINY)
    trainer = quiet_trainer(
        tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=1, callbacks=[kept_weights, RunCheckpoint()]
    )
    trainer.fit(module, datamodule=digits())
    assert module.record["kept_epoch"] == kept_epoch and module.record["last_epoch_agreement"] == agreements[-1]
    assert module.label_free_estimate[AGREEMENT] == max(agreements)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = module._trained_state()
    for weights in (trained, saved):  # the weights held and the ones a later test reads
        assert all(torch.equal(weights[name], value) for name, value in kept_weights.weights[kept_epoch - 1].items())
    if kept_epoch != len(agreements):  # another epoch's weights than those the last epoch trained to
        assert any(not torch.equal(trained[n], v) for n, v in kept_weights.trained[len(agreements) - 1].items())


def test_a_rollback_can_keep_the_surrogate_as_it_has_become(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script_agreements(monkeypatch, [0.5, 0.9, 0.4])  # epoch 3 falls 0.5 below epoch 2's best
    kept_weights = KeepWeights()
    box = QueryFunction(brightness_class, 10, answers="labels")
    module = BlackBoxRefineLitModule(black_box=box, agreement_rollback=0.3, rollback_keeps_surrogate=True, **TINY)
    trainer = quiet_trainer(
        tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[kept_weights]
    )
    with pytest.warns(UserWarning, match="go back to that epoch's weights"):
        trainer.fit(module, datamodule=digits())
    best, fallen, held = kept_weights.weights[1], kept_weights.trained[2], module._trained_state()
    surrogate = [name for name in held if name.startswith("surrogate.")]
    transform = [name for name in held if name.startswith("defended.transform.")]
    assert surrogate and transform
    assert all(torch.equal(held[name], best[name]) for name in transform)  # T went back
    assert all(torch.equal(held[name], fallen[name]) for name in surrogate)  # the surrogate stayed
    assert any(not torch.equal(best[name], fallen[name]) for name in surrogate)  # ... and had moved since
