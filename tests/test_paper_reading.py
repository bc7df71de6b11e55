"""The paper's reading against this project's recipe: each departure is a field, off in
paper_defaults, and a config file starts from its own dataset's defaults."""

import numpy as np
import pytest
import torch
import yaml

from cmath_model.config import RECIPE, CMATHConfig, load_config, paper_defaults, recipe_defaults
from cmath_model.data import Utterances, load_dataset, write_dataset
from cmath_model.model import CMATH, Dropout, Layout, VariationalFusion
from cmath_model.runs import defaults_for
from cmath_model.train import Trainer, load_model, predict
from hpo.space import parse_space

DIMS = {"text": 20, "audio": 12, "visual": 8}


def test_a_config_with_only_its_dataset_gets_that_datasets_settings(tmp_path):
    (tmp_path / "meld.yaml").write_text("dataset: meld\n")
    config = load_config(tmp_path / "meld.yaml")
    assert (config.d, config.lr, config.batch_size, config.gamma1, config.gamma2) == (400, 2e-4, 4, 1.0, 1.2)
    assert config.dataset == "meld" and config == recipe_defaults("meld")


def test_a_config_can_start_from_the_papers_reading(tmp_path):
    (tmp_path / "paper.yaml").write_text("dataset: iemocap\ndefaults: paper\nd: 300\n")
    assert load_config(tmp_path / "paper.yaml") == paper_defaults("iemocap").replace(d=300)


@pytest.mark.parametrize("dataset", ["iemocap", "meld"])
def test_paper_defaults_turn_every_departure_off(dataset):
    paper, recipe = paper_defaults(dataset), recipe_defaults(dataset)
    # Eq. 20-21 are plain cross-entropy; the paper states no weight decay; Eq. 19 is one FC layer.
    assert paper.class_weights == "none" and paper.weight_decay == 0.0 and paper.modality_head == "linear"
    assert paper.input_norm == "none" and paper.sigma_init == 0.0 and paper.wo_cmat == "discard"
    assert paper.defaults == "paper" and recipe.defaults == "recipe"
    changed = {k for k, v in recipe.to_dict().items() if v != paper.to_dict()[k]} - {"defaults"}
    assert changed == set(RECIPE[dataset])  # the recipe differs only where RECIPE says


def test_a_space_builds_on_the_recipe_unless_it_says_paper():
    space = {"dataset": "meld", "search": {"d": {"type": "int", "low": 100, "high": 200}}}
    assert parse_space(space).base_config() == recipe_defaults("meld")
    assert parse_space({**space, "defaults": "paper"}).base_config() == paper_defaults("meld")


def test_the_paper_head_is_one_linear_layer_and_sdts_keeps_relu_dropout():
    paper = CMATH(CMATHConfig(d=16), DIMS, num_classes=4, max_speakers=9)
    sdt = CMATH(CMATHConfig(d=16, modality_head="sdt"), DIMS, num_classes=4, max_speakers=9)
    assert all(isinstance(head, torch.nn.Linear) for head in paper.heads.values())
    assert [type(layer) for layer in sdt.heads["text"]] == [torch.nn.ReLU, Dropout, torch.nn.Linear]


def test_wo_cmat_discards_the_transformer_or_keeps_self_attention():
    discard = CMATH(CMATHConfig(d=16, ablation="wo_cmat"), DIMS, num_classes=4, max_speakers=9)
    kept = CMATH(CMATHConfig(d=16, ablation="wo_cmat", wo_cmat="self_attention"), DIMS, num_classes=4,
                 max_speakers=9)
    assert all(len(cma.layers) == 0 for cma in discard.cma.values())
    assert all(len(cma.layers) == 1 and not cma.layers[0].aux for cma in kept.cma.values())
    h = torch.randn(10, 16)  # two dialogues of five utterances, packed
    mask = torch.ones(2, 5, dtype=torch.bool)
    allowed = torch.ones(2, 5, 5, dtype=torch.bool)
    assert torch.equal(discard.cma["text"](h, [], Layout.of(mask), allowed), h)  # H'_m = H_m


@pytest.mark.parametrize("sigma", ["softplus", "exp"])
def test_sigma_starts_where_sigma_init_says(sigma):
    torch.manual_seed(0)
    h = {m: torch.nn.functional.layer_norm(torch.randn(4, 7, 32), (32,)) for m in DIMS}
    default = VariationalFusion(32, tuple(DIMS), sigma).eval()
    small = VariationalFusion(32, tuple(DIMS), sigma, sigma_init=0.02).eval()
    assert default(h)[2].mean().item() > 0.3  # PyTorch's init: sigma ~ positive(0), mostly noise
    assert small(h)[2].mean().item() == pytest.approx(0.02, rel=0.5)


def test_each_epoch_logs_the_fused_samples_sigma_and_mean(tiny):
    config = CMATHConfig(d=16, epochs=1, batch_size=8, num_threads=1, sigma_init=0.05)
    record = Trainer(config, tiny).step()
    assert record["sigma_mean"] == pytest.approx(0.05, rel=0.5) and record["mu_abs_mean"] > 0


def _scaled(data, scale: np.ndarray, shift: np.ndarray):
    """The same dataset with every text dimension rescaled and shifted (another encoder's units)."""
    for split in data.splits.values():
        x = split.features["text"]
        x[:-1] = x[:-1] * torch.from_numpy(scale) + torch.from_numpy(shift)
    return data


def test_standardised_inputs_make_the_model_blind_to_feature_units(tiny_path):
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 5.0, DIMS_TINY_TEXT).astype(np.float32)
    shift = rng.normal(0, 3, DIMS_TINY_TEXT).astype(np.float32)

    def outputs(input_norm: str, rescale: bool) -> torch.Tensor:
        data = load_dataset(tiny_path)
        if rescale:
            _scaled(data, scale, shift)
        config = CMATHConfig(d=16, modalities="t", dropout=0.0, input_norm=input_norm, num_threads=1)
        trainer = Trainer(config, data)
        return torch.from_numpy(predict(trainer.model, data.splits["test"], 8, torch.device("cpu"))[2])

    assert torch.allclose(outputs("standardize", False), outputs("standardize", True), atol=1e-4)
    assert not torch.allclose(outputs("none", False), outputs("none", True), atol=1e-2)


DIMS_TINY_TEXT = 1024  # the synthetic IEMOCAP set uses the paper's RoBERTa width


def test_a_checkpoint_carries_its_input_statistics(tiny, tmp_path):
    config = CMATHConfig(d=16, epochs=1, batch_size=8, num_threads=1, input_norm="standardize")
    trainer = Trainer(config, tiny)
    trainer.step()
    trainer.save_best(tmp_path / "best")
    model, _ = load_model(tmp_path / "best")
    expected = tiny.splits["train"].features["text"][:-1].mean(0)
    assert torch.allclose(model.reconstruction["text"].input_mean, expected)
    theirs = predict(model, tiny.splits["test"], 8, torch.device("cpu"))[2]
    ours = trainer.predict(tiny.splits["test"])[2]
    assert np.allclose(theirs, ours, atol=1e-6)


def _transcripts(path, classes, per_dialogue: int, modalities=("text",), dataset="custom"):
    rng = np.random.default_rng(0)
    n_dialogues = 30
    n = n_dialogues * per_dialogue
    utts = Utterances(
        dialogue_id=np.repeat([f"d{k}" for k in range(n_dialogues)], per_dialogue),
        position=np.tile(np.arange(per_dialogue), n_dialogues),
        speaker=rng.integers(0, 2, n), label=rng.integers(0, len(classes), n),
        split=np.repeat(np.array(["train"] * 20 + ["valid"] * 5 + ["test"] * 5), per_dialogue),
        features={m: rng.normal(size=(n, 8)).astype(np.float32) for m in modalities})
    return write_dataset(path, utts, dataset=dataset, classes=classes, source="test", source_sha256="0" * 64,
                         split_seed=None)


def test_other_transcripts_get_melds_defaults_and_say_why(tmp_path):
    path = _transcripts(tmp_path / "sentiment.parquet", ["negative", "neutral", "positive"], per_dialogue=9)
    config, line = defaults_for(str(path))
    # IEMOCAP's (lr 3e-3, batch 16, class weights, 60 epochs) collapsed on MELD Sentiment.
    assert config == recipe_defaults("meld")
    assert line.endswith("(custom data: text only, 9.0 utterances per dialogue; text-only data takes MELD's)")
    assert "classes" not in line  # the class count plays no part in the rule


def test_long_multimodal_dialogues_get_iemocaps_defaults(tmp_path):
    path = _transcripts(tmp_path / "sessions.parquet", ["a", "b"], per_dialogue=40, modalities=("text", "audio"))
    config, line = defaults_for(str(path))
    assert config == recipe_defaults("iemocap")
    assert line.endswith("(custom data: modalities ta, 40.0 utterances per dialogue; multimodal data with 25 or more "
                         "utterances per dialogue takes IEMOCAP's)")
    short = _transcripts(tmp_path / "short.parquet", ["a", "b"], per_dialogue=9, modalities=("text", "audio"))
    config, line = defaults_for(str(short))
    assert config == recipe_defaults("meld") and line.endswith("dialogues under 25 utterances take MELD's)")


def test_cmath_train_prints_the_defaults_it_chose(tmp_path, capsys):
    from cmath_model.cli import train_main

    path = _transcripts(tmp_path / "sentiment.parquet", ["negative", "neutral", "positive"], per_dialogue=9)
    assert train_main(["--data", str(path), "--epochs", "1", "--set", "d=16", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("defaults: recipe for MELD (custom data: text only")
    assert "lr 0.0002, batch 4" in printed[1]
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["dataset"] == "meld" and written["lr"] == 2e-4


@pytest.mark.parametrize("kind, power", [("inverse_frequency", 1.0), ("inverse_sqrt_frequency", 0.5)])
def test_class_weights_follow_the_training_splits_frequencies_only(tiny, kind, power):
    weight = Trainer(CMATHConfig(d=16, class_weights=kind, num_threads=1), tiny).class_weight.numpy()
    train_labels = tiny.splits["train"].label[:-1].numpy()
    freq = np.bincount(train_labels, minlength=tiny.num_classes) / len(train_labels)
    valid_labels = tiny.splits["valid"].label[:-1].numpy()
    with_valid = np.bincount(np.concatenate([train_labels, valid_labels]), minlength=tiny.num_classes)
    assert not np.allclose(freq, with_valid / with_valid.sum())  # else this test could not tell them apart
    expected = freq ** -power
    assert np.allclose(weight, expected / expected.mean(), rtol=1e-5)  # mean 1: the loss keeps its scale
    assert Trainer(CMATHConfig(d=16, num_threads=1), tiny).class_weight is None  # the paper: plain CE


def test_checkpoints_from_before_standardisation_still_load(tiny, tmp_path):
    from cmath_model.errors import DataError

    config = CMATHConfig(d=16, epochs=1, batch_size=8, num_threads=1)  # input_norm none: identity buffers
    trainer = Trainer(config, tiny)
    trainer.step()
    trainer.save_best(tmp_path / "best")
    state = torch.load(tmp_path / "best" / "model.pt", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.endswith(("input_mean", "input_std"))}
    torch.save(state, tmp_path / "best" / "model.pt")  # what an earlier release wrote
    model, _ = load_model(tmp_path / "best")
    theirs = predict(model, tiny.splits["test"], 8, torch.device("cpu"))[2]
    assert np.allclose(theirs, trainer.predict(tiny.splits["test"])[2], atol=1e-6)
    state["model"].pop("head_x.weight")
    torch.save(state, tmp_path / "best" / "model.pt")
    with pytest.raises(DataError, match=r"model.pt: weights do not match .*head_x.weight missing"):
        load_model(tmp_path / "best")


@pytest.mark.parametrize("text, field", [("dataset: mosei\n", "dataset"),
                                         ("dataset: meld\ndefaults: papr\n", "defaults")])
def test_a_config_with_unknown_defaults_names_the_file_and_field(tmp_path, text, field):
    from cmath_model.errors import ConfigError

    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'bad.yaml'}: config field '{field}': .* is not one of"):
        load_config(tmp_path / "bad.yaml")


def test_a_sweep_on_text_only_transcripts_runs_the_text_only_model(tmp_path):
    # search_spaces/meld.yaml on the shared MELD transcripts: the recipe's modalities are tav,
    # the file has text; as cmath-train does, the sweep narrows to what the file holds ...
    from hpo.plan import SweepOptions, plan_sweep

    classes = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    data = _transcripts(tmp_path / "meld.parquet", classes, per_dialogue=6, dataset="meld")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"dataset": "meld", "search": {"lr": {"type": "loguniform", "low": 1e-4,
                                                                         "high": 1e-3}}}))
    plan = plan_sweep(SweepOptions(space=space, data=str(data), results=tmp_path / "r", name="s"))
    assert plan.base.modalities == "t"
    # ... unless --set or the space asks for modalities the file lacks: that stays an error
    with pytest.raises(Exception, match="needs the audio modality"):
        plan_sweep(SweepOptions(space=space, data=str(data), results=tmp_path / "r", name="s",
                                overrides={"modalities": "tav"}))
    space.write_text(yaml.safe_dump({"dataset": "meld", "fixed": {"modalities": "ta"},
                                     "search": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}))
    with pytest.raises(Exception, match="needs the audio modality"):
        plan_sweep(SweepOptions(space=space, data=str(data), results=tmp_path / "r", name="s"))


def test_the_papers_settings_hold_only_what_the_paper_states():
    """The paper states no epoch count; the project's choice is labelled as such, not as the paper's."""
    from cmath_model.config import EPOCHS, PAPER, paper_defaults

    for dataset, stated in PAPER.items():
        assert "epochs" not in stated
        assert paper_defaults(dataset).epochs == EPOCHS[dataset]
