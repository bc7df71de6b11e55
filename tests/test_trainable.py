"""CMATHTrial's own rules, on one process without Ray: what a reused worker frees between trials,
and which errors Ray retries (out of memory in a share of a GPU) versus which fail the trial once
(a bad config, a config that does not fit a GPU of its own)."""

import gc
import shutil
import time
import weakref

import pytest
import torch

from cmath_model.config import paper_defaults
from hpo import trainable as trainable_module
from hpo.recovery import OUT_OF_MEMORY, TRIAL_ERROR
from hpo.trainable import CMATHTrial, DoesNotFit


@pytest.fixture
def trial_class(tiny):
    base = paper_defaults("iemocap").replace(d=16, epochs=2, batch_size=4, num_threads=1).to_dict()

    class Direct(CMATHTrial):  # what tune.with_parameters does, without Ray's object store
        def setup(self, config):
            super().setup(config, base=base, dataset=tiny)

    return Direct


def test_reset_config_frees_the_previous_trainer_before_building_the_next(trial_class, monkeypatch):
    trial = trial_class(config={"lr": 1e-3})
    previous = weakref.ref(trial.trainer)
    previous_model = weakref.ref(trial.trainer.model)
    alive_when_building = []
    real_trainer = trainable_module.Trainer

    def trainer_checking_the_old_one(*args, **kwargs):
        gc.collect()  # anything still alive now is referenced, not merely uncollected
        alive_when_building.append(previous() is not None or previous_model() is not None)
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(trainable_module, "Trainer", trainer_checking_the_old_one)
    assert trial.reset_config({"lr": 2e-3})
    assert alive_when_building == [False]
    assert trial.trainer.config.lr == 2e-3


def _packed(trial, share=0.25):
    """The trial as Ray would have placed it in a share of a GPU (set in setup from Ray's resources)."""
    trial.gpu_share = share
    trial.oom_backoff_s = 0.05
    return trial


def test_out_of_memory_in_a_share_of_a_gpu_is_reported_then_raised_for_ray_to_retry(trial_class, monkeypatch):
    """In a share of a GPU, out of memory may be the neighbours' doing: a fault report the driver
    turns into a retry on its own budget (hpo.placement), then the exception Ray retries, after a
    back-off; never an error result, which would end the trial and tell Optuna FAIL."""
    trial = _packed(trial_class(config={"lr": 1e-3}))

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trial.trainer, "step", out_of_memory)
    reported = trial.step()
    assert TRIAL_ERROR not in reported and "CUDA out of memory" in reported[OUT_OF_MEMORY]
    assert reported["gpu_share"] == 0.25 and trial.trainer is None  # its memory is given back at once
    started = time.perf_counter()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trial.step()
    assert time.perf_counter() - started >= 0.05  # the back-off


def test_out_of_memory_on_a_gpu_of_its_own_is_a_config_that_does_not_fit(trial_class, monkeypatch):
    """Nothing else shares its memory, so a retry would run out again: the trial fails as a bad
    config does (error result, then the error), saying why."""
    trial = trial_class(config={"lr": 1e-3})
    assert trial.gpu_share is None

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trial.trainer, "step", out_of_memory)
    error = trial.step()[TRIAL_ERROR]
    assert error.startswith("DoesNotFit: out of memory on a GPU of its own") and "lower d or batch_size" in error
    with pytest.raises(DoesNotFit):
        trial.step()


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
])
def test_cublas_and_cudnn_allocation_failures_are_out_of_memory_too(trial_class, monkeypatch, error):
    """They arrive as RuntimeError, which was taken for a bad config (an error result, Optuna FAIL)."""
    trial = _packed(trial_class(config={"lr": 1e-3}))

    def fails():
        raise error

    monkeypatch.setattr(trial.trainer, "step", fails)
    assert OUT_OF_MEMORY in trial.step()
    with pytest.raises(RuntimeError, match="ALLOC_FAILED|out of memory"):
        trial.step()


def test_out_of_memory_while_building_the_model_is_out_of_memory_too(trial_class, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(trainable_module, "Trainer", out_of_memory)
    trial = _packed(trial_class(config={"lr": 1e-3}))
    assert OUT_OF_MEMORY in trial.step()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trial.step()


def test_a_bad_config_is_an_error_result_then_the_error(trial_class, monkeypatch):
    """The other side of the rule: an ordinary exception is reported first (so the driver turns
    retries off for this trial), then raised."""
    trial = trial_class(config={"lr": 1e-3})

    def broken():
        raise ValueError("d must be divisible by the number of heads")

    monkeypatch.setattr(trial.trainer, "step", broken)
    assert trial.step()[TRIAL_ERROR] == "ValueError: d must be divisible by the number of heads"
    with pytest.raises(ValueError):
        trial.step()


@pytest.mark.parametrize("assigned, share", [({"CPU": 1.0, "GPU": 0.25}, 0.25), ({"GPU": 1.0}, None),
                                             ({"CPU": 2.0}, None)])
def test_a_packed_trial_may_use_its_share_of_the_gpus_memory(assigned, share):
    """Set as torch's per-process memory fraction in the trial's set-up (on a GPU; none here)."""
    assert trainable_module.gpu_memory_share(assigned) == share


def test_a_trial_looks_for_its_own_checkpoints_at_its_first_step_only(tiny, tmp_path, monkeypatch):
    """A trial Ray starts without a checkpoint looks in its folder on the storage at its first
    step (Ray's saved state may have missed its checkpoints), and never again: its own later
    checkpoints are not loaded back in the middle of training, whether it started anew or carries
    on a lost trial (which left nothing here)."""
    import pyarrow.fs as pafs

    from hpo.recovery import CHECKPOINTS_OF, RESTORE_NOTE

    base = paper_defaults("iemocap").replace(d=16, epochs=3, batch_size=4, num_threads=1, checkpoint_every=1).to_dict()
    ended = tmp_path / "experiment" / "cmath_ended"
    ended.mkdir(parents=True)
    own = tmp_path / "experiment" / "CMATHTrial_abc_1_lr=0.001"
    monkeypatch.setattr(trainable_module, "trial_folder", lambda trainable: (pafs.LocalFileSystem(), str(own)))

    class Direct(CMATHTrial):
        def setup(self, config):
            super().setup(config, base=base, dataset=tiny, ended_dir=str(ended))

    for config in ({"lr": 1e-3}, {"lr": 1e-3, CHECKPOINTS_OF: "lost"}):
        trial = Direct(config=config)
        try:
            assert trial.train()["epoch"] == 1
            (own / "checkpoint_000000").mkdir(parents=True)
            trial.save_checkpoint(str(own / "checkpoint_000000"))  # as Ray's save would, after epoch 1
            second = trial.train()
            assert second["epoch"] == 2 and RESTORE_NOTE not in second, (config, second.get(RESTORE_NOTE))
        finally:
            trial.stop()
            shutil.rmtree(own, ignore_errors=True)
