"""The training order (a function of seed and epoch, sharded, resumable) and the evaluation shards."""

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from torch.utils.data import TensorDataset

from datamodules import RefineDataModule
from datamodules.sampling import ResumableDataLoader, ResumableSampler
from refine_pl.attacks import BadNets
from refine_pl.errors import ConfigError
from tests.conftest import SmallDigits


def _batches(loader: ResumableDataLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def _loader(size: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> ResumableDataLoader:
    dataset = TensorDataset(torch.arange(size))
    return ResumableDataLoader(dataset, ResumableSampler(dataset, batch_size, seed, num_replicas, rank))


def test_processes_together_see_the_batches_of_one_process_with_the_global_batch() -> None:
    one = _batches(_loader(50, batch_size=12))
    shards = [_batches(_loader(50, batch_size=4, num_replicas=3, rank=rank)) for rank in range(3)]
    assert len(one) == 4 and all(len(shard) == 4 for shard in shards)  # 50 // 12 full global batches
    for step, batch in enumerate(one):
        assert [index for shard in shards for index in shard[step]] == batch
    seen = [index for batch in one for index in batch]
    assert len(set(seen)) == 48


def test_order_is_a_function_of_seed_and_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = _loader(40, batch_size=8, seed=seed)
        loader.sampler.set_epoch(epoch)
        return _batches(loader)

    torch.manual_seed(123)  # the global generator plays no part
    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert order(1, 0) != order(0, 1)  # seeds and epochs are mixed, not added


def test_a_loader_continues_from_the_state_of_an_interrupted_one() -> None:
    interrupted = _loader(64, batch_size=8)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    first = [next(iterator)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"seed": 0, "epoch": 1, "samples_seen": 24}

    resumed = _loader(64, batch_size=8, seed=5)  # the saved seed wins
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert resumed.state_dict() == state  # a checkpoint taken before the first batch keeps the position
    rest = _batches(resumed)
    uninterrupted = _loader(64, batch_size=8)
    uninterrupted.sampler.set_epoch(1)
    assert first + rest == _batches(uninterrupted)
    resumed.sampler.set_epoch(2)  # the skip applied once, to the saved epoch only
    assert len(_batches(resumed)) == 8


def test_two_processes_resume_the_position_of_one_with_the_same_global_batch() -> None:
    one = _loader(64, batch_size=16)
    iterator = iter(one)
    next(iterator)
    state = one.state_dict()
    shards = []
    for rank in range(2):
        loader = _loader(64, batch_size=8, num_replicas=2, rank=rank)
        loader.load_state_dict(state)
        shards.append(_batches(loader))
    assert [a + b for a, b in zip(*shards, strict=True)] == _batches(_loader(64, batch_size=16))[1:]
    with pytest.raises(ConfigError, match="not a whole number of global batches of 24"):
        _loader(64, batch_size=12, num_replicas=2).load_state_dict(state)


def test_augmentation_is_the_same_for_a_sample_whatever_the_global_generator_and_workers() -> None:
    def first_batch(num_workers: int) -> torch.Tensor:
        datamodule = RefineDataModule(SmallDigits(), batch_size=16, num_workers=num_workers, horizontal_flip=False)
        datamodule.setup("fit")
        torch.manual_seed(num_workers)
        return next(iter(datamodule.train_dataloader()))

    batch = first_batch(num_workers=0)
    torch.testing.assert_close(first_batch(num_workers=2), batch, rtol=0, atol=0)
    datamodule = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    datamodule.setup("fit")
    assert not torch.equal(next(iter(datamodule.train_dataloader())).images, batch)  # the augmentation did run


def test_a_small_set_is_passed_over_again_until_the_epoch_has_its_least_number_of_samples() -> None:
    dataset = TensorDataset(torch.arange(10))
    sampler = ResumableSampler(dataset, batch_size=4, seed=0, min_epoch_samples=25)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 24  # 25 samples, cut to whole batches of 4
    indices = [key.index for key in keys]
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    assert indices[:10] != indices[10:20]  # each pass a new permutation
    first_seed = {key.index: key.seed for key in keys[:10]}
    assert all(key.seed != first_seed[key.index] for key in keys[10:])  # a repeated image is augmented anew
    one_pass = ResumableSampler(dataset, batch_size=4, seed=0)
    assert list(one_pass) == keys[:8]  # the first pass is the order without the option
    ranks = [list(ResumableSampler(dataset, 2, 0, num_replicas=2, rank=rank, min_epoch_samples=25)) for rank in (0, 1)]
    steps = [ranks[0][step : step + 2] + ranks[1][step : step + 2] for step in range(0, 12, 2)]
    assert [key for step in steps for key in step] == keys  # two processes share the same global batches


def test_a_training_epoch_of_few_unlabeled_images_draws_the_least_number_asked() -> None:
    datamodule = RefineDataModule(SmallDigits(), batch_size=16, horizontal_flip=False, min_epoch_samples=4096)
    datamodule.setup("fit")
    assert len(datamodule.train_set) < 4096
    assert len(datamodule.train_dataloader()) == 4096 // 16
    with pytest.raises(ConfigError, match="min_epoch_samples is the least number of images a training epoch"):
        RefineDataModule(SmallDigits(), min_epoch_samples=-1)


def test_training_set_smaller_than_one_global_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match="fewer than one global batch of 2 process"):
        _loader(10, batch_size=8, num_replicas=2)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_loaders_of_two_processes_cover_every_image_exactly_once(stage: str) -> None:
    source = SmallDigits(train_per_class=(15,) + (10,) * 9, test_per_class=(6,) + (5,) * 9)
    shares: list[list[list[int]]] = []
    for rank in range(2):
        datamodule = RefineDataModule(source, BadNets(target_label=0), batch_size=8)
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank, accelerator=CPUAccelerator())
        datamodule.setup(stage)
        loaders = datamodule.val_dataloader() if stage == "validate" else datamodule.test_dataloader()
        shares.append([list(loader.sampler) for loader in loaders])
    whole = RefineDataModule(source, BadNets(target_label=0))
    whole.setup(stage)
    for position, loader in enumerate(whole.val_dataloader() if stage == "validate" else whole.test_dataloader()):
        size = len(loader.dataset)
        assert size % 2 == 1  # odd sizes: a padding sampler would count one image twice
        assert sorted(shares[0][position] + shares[1][position]) == list(range(size))
