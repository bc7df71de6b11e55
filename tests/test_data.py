"""The canonical Parquet format, the synthetic generator, and every bad-input error."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmath_model import CMATHConfig, DataError, Trainer, load_dataset
from cmath_model.data import METADATA_KEY, Utterances, write_dataset
from cmath_model.synth import SCALES, generate, write_synthetic


def test_round_trip_gives_padded_dialogue_tensors(tmp_path):
    rng = np.random.default_rng(0)
    # Three dialogues written in shuffled row order: loading must restore position order.
    dialogue = np.array(["a", "a", "a", "b", "b", "c", "d", "d"])
    position = np.array([0, 1, 2, 0, 1, 0, 0, 1])
    split = np.array(["train", "train", "train", "train", "train", "valid", "test", "test"])
    order = rng.permutation(8)
    text = rng.standard_normal((8, 5)).astype(np.float32)
    speaker = np.array([0, 1, 0, 0, 0, 0, 1, 0])
    utts = Utterances(dialogue_id=dialogue[order], position=position[order], speaker=speaker[order],
                      label=np.array([0, 1, 2, 1, 0, 2, 1, 1])[order], split=split[order],
                      features={"text": text[order]})
    path = write_dataset(tmp_path / "x.parquet", utts, dataset="custom", classes=["x", "y", "z"], source="test",
                         source_sha256="", split_seed=None)
    data = load_dataset(path)
    train = data.splits["train"]
    batch = train.batch(np.arange(2), ("text",))
    assert batch.features["text"].shape == (2, 3, 5) and batch.mask.shape == (2, 3)
    assert batch.mask.tolist() == [[True, True, True], [True, True, False]]
    assert np.allclose(batch.features["text"][0].numpy(), text[:3])
    assert np.allclose(batch.features["text"][1, :2].numpy(), text[3:5])
    assert batch.features["text"][1, 2].abs().sum() == 0 and batch.label[1, 2] == -1
    assert batch.label[0].tolist() == [0, 1, 2]
    meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert meta["classes"] == ["x", "y", "z"] and meta["modality_dims"] == {"text": 5}
    schema = pq.read_schema(path)
    assert schema.field("text").type == pa.list_(pa.float32(), 5)
    assert schema.field("position").type == pa.int32()


def test_synthetic_shapes_match_the_real_datasets():
    utts, shape = generate("iemocap", "full")
    dims = {m: x.shape[1] for m, x in utts.features.items()}
    assert dims == {"text": 1024, "audio": 1582, "visual": 342} and len(shape.classes) == 6
    trainval = set(utts.dialogue_id[utts.split != "test"])
    test = set(utts.dialogue_id[utts.split == "test"])
    assert (len(trainval), len(test)) == (120, 31)
    mean_len = len(utts.label[utts.split != "test"]) / len(trainval)
    assert 40 <= mean_len <= 56
    valid = set(utts.dialogue_id[utts.split == "valid"])
    assert len(valid) == 24  # the paper's 20 % of training dialogues

    meld, meld_shape = generate("meld", "small")
    assert {m: x.shape[1] for m, x in meld.features.items()} == {"text": 1024, "audio": 300, "visual": 342}
    assert len(meld_shape.classes) == 7
    _, counts = np.unique(meld.dialogue_id, return_counts=True)
    assert counts.min() >= 1 and counts.max() <= 24
    assert meld.speaker.max() <= 8
    assert SCALES["meld"]["full"][:2] == (1153, 280)


def test_synthetic_is_deterministic_and_seeded():
    a, _ = generate("meld", "tiny", seed=3)
    b, _ = generate("meld", "tiny", seed=3)
    c, _ = generate("meld", "tiny", seed=4)
    assert np.array_equal(a.features["text"], b.features["text"]) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label[:50], c.label[:50])


def test_text_is_the_strongest_modality_and_visual_the_weakest():
    from sklearn.linear_model import LogisticRegression

    utts, _ = generate("iemocap", "small")
    train, test = utts.split != "test", utts.split == "test"
    acc = {m: LogisticRegression(C=0.05, max_iter=500).fit(x[train], utts.label[train]).score(x[test], utts.label[test])
           for m, x in utts.features.items()}
    assert acc["text"] > acc["audio"] > acc["visual"]


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def good_table(tiny_path):
    return pq.read_table(tiny_path)


def write_table(path, table):
    pq.write_table(table, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: no such dataset file; make one from transcripts"):
        load_dataset(tmp_path / "nope.parquet")


def test_a_mistyped_path_suggests_the_file_that_exists(tmp_path, tiny_path):
    """Someone who mistyped the path to their real data is pointed at it, not at synthetic data."""
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "meld-text.parquet"
    real.write_bytes(tiny_path.read_bytes())
    with pytest.raises(DataError, match=f"did you mean {real}\\?"):
        load_dataset(tmp_path / "data" / "meld_text.parquet")
    with pytest.raises(DataError, match=f"no folder {tmp_path / 'dta'}; did you mean {tmp_path / 'data'}\\?"):
        load_dataset(tmp_path / "dta" / "meld-text.parquet")
    with pytest.raises(DataError) as unrelated:
        load_dataset(tmp_path / "data" / "iemocap.parquet")
    assert "did you mean" not in str(unrelated.value)


def test_truncated_file(tmp_path, tiny_path):
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(tiny_path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file.*truncated"):
        load_dataset(cut)


def test_not_parquet(tmp_path):
    bogus = tmp_path / "notes.parquet"
    bogus.write_text("dialogue_id,label\n")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(bogus)


def test_missing_column(tmp_path, good_table):
    path = write_table(tmp_path / "x.parquet", good_table.drop_columns(["label"]))
    with pytest.raises(DataError, match=r"x\.parquet: missing column 'label'"):
        load_dataset(path)


def test_missing_metadata(tmp_path, good_table):
    path = write_table(tmp_path / "x.parquet", good_table.replace_schema_metadata({}))
    with pytest.raises(DataError, match="no cmath metadata"):
        load_dataset(path)


def test_wrong_vector_length(tmp_path, good_table):
    meta = json.loads(good_table.schema.metadata[METADATA_KEY])
    meta["modality_dims"]["audio"] = 300
    table = good_table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    path = write_table(tmp_path / "x.parquet", table)
    with pytest.raises(DataError, match=r"column 'audio' holds vectors of type .*1582.*expected .*\[300\]"):
        load_dataset(path)


def test_nan_features(tmp_path, good_table):
    text = good_table.column("text").combine_chunks()
    values = text.flatten().to_numpy().copy()
    values[7] = np.nan
    bad = pa.FixedSizeListArray.from_arrays(pa.array(values), 1024)
    table = good_table.set_column(good_table.column_names.index("text"), "text", bad)
    path = write_table(tmp_path / "x.parquet", table)
    with pytest.raises(DataError, match=r"x\.parquet: text features contain NaN/inf \(first at row 0\)"):
        load_dataset(path)


def test_label_outside_class_set(tmp_path, good_table):
    labels = good_table.column("label").to_numpy().copy()
    labels[3] = 6
    table = good_table.set_column(good_table.column_names.index("label"), "label", pa.array(labels, pa.int32()))
    with pytest.raises(DataError, match=r"label 6 is outside the 6 classes"):
        load_dataset(write_table(tmp_path / "x.parquet", table))


def test_empty_split(tmp_path, good_table):
    split = np.where(good_table.column("split").to_numpy(zero_copy_only=False) == "valid", "train",
                     good_table.column("split").to_numpy(zero_copy_only=False))
    table = good_table.set_column(good_table.column_names.index("split"), "split", pa.array(split))
    with pytest.raises(DataError, match=r"the valid split is empty.*--resplit 0\.2"):
        load_dataset(write_table(tmp_path / "x.parquet", table))


def test_write_refuses_nan_and_bad_labels(tmp_path):
    utts, shape = generate("iemocap", "tiny")
    utts.features["visual"][4, 2] = np.inf
    with pytest.raises(DataError, match="visual features contain NaN/inf"):
        write_dataset(tmp_path / "x.parquet", utts, dataset="iemocap", classes=list(shape.classes), source="t",
                      source_sha256="", split_seed=0)
    assert not (tmp_path / "x.parquet").exists()


def test_modality_the_run_needs_but_the_file_lacks(tmp_path, good_table):
    meta = json.loads(good_table.schema.metadata[METADATA_KEY])
    del meta["modality_dims"]["visual"]
    table = good_table.drop_columns(["visual"]).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    data = load_dataset(write_table(tmp_path / "ta.parquet", table))
    with pytest.raises(DataError, match=r"ta\.parquet: the run needs the visual modality.*set modalities: ta"):
        Trainer(CMATHConfig(d=16, modalities="tav"), data)
    Trainer(CMATHConfig(d=16, modalities="ta"), data)  # a subset the file has is fine


def test_hash_mismatch_fails(tiny_path):
    with pytest.raises(DataError, match="differs from the config's data_sha256"):
        load_dataset(tiny_path, expected_sha256="0" * 64)


def test_synthetic_file_round_trips(tmp_path):
    path = write_synthetic(tmp_path / "m.parquet", "meld", "tiny")
    data = load_dataset(path)
    assert data.name == "meld" and data.num_classes == 7
    assert sum(s.num_utterances for s in data.splits.values()) == data.meta["num_utterances"]
