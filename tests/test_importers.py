"""Every pickle layout round-trips; untrusted pickles are refused; real MELD transcripts import."""

import pickle

import numpy as np
import pandas as pd
import pytest

from cmath_model import CMATHConfig, DataError, Trainer, load_dataset
from cmath_model.cli import data_main
from cmath_model.importers import LAYOUTS, detect_layout, import_csv, import_pickle

IEMOCAP_IDS = [f"Ses0{s}F_impro0{k}" for s in (1, 2, 5) for k in range(1, 5)]
MELD_IDS = [0, 1, 2, 3, 5, 7, 8, 9, 11, 12, 13, 14]  # MELD ids are ints with gaps


def make_pickle(path, layout_name, seed=0):
    """A small pickle in the named layout; returns (path, the per-dialogue truth)."""
    lay = LAYOUTS[layout_name]
    rng = np.random.default_rng(seed)
    iemocap = lay.dataset == "iemocap"
    ids = IEMOCAP_IDS if iemocap else MELD_IDS
    dims = {"sdt": {"text": 1024, "audio": 1582 if iemocap else 300, "visual": 342},
            "mmgcn": {"text": 100 if iemocap else 600, "audio": 1582 if iemocap else 300, "visual": 342},
            "dialoguernn": {"text": 600, "audio": 300},
            "cosmic": {"text": 1024}}[layout_name.split("-")[0]]
    n_classes = 6 if iemocap else 7
    speakers, labels, feats, sentences = {}, {}, {m: {} for m in dims}, {}
    for dia in ids:
        n = int(rng.integers(2, 7))
        if iemocap:
            speakers[dia] = list(rng.choice(["M", "F"], n))
        else:
            speakers[dia] = [list(np.eye(9)[rng.integers(0, 3)]) for _ in range(n)]
        labels[dia] = rng.integers(0, n_classes, n).tolist()
        for m, d in dims.items():
            feats[m][dia] = [rng.standard_normal(d).astype(np.float32) for _ in range(n)]
        sentences[dia] = [f"utterance {i}" for i in range(n)]
    train, test, valid = ids[:8], ids[10:], ids[8:10]
    video_ids = {dia: [f"{dia}_{i}" for i in range(len(labels[dia]))] for dia in ids}
    roberta = [feats["text"]] + [{d: [v * 0 for v in vs] for d, vs in feats["text"].items()}] * 3
    if layout_name == "sdt-iemocap" or layout_name == "sdt-meld":
        fields = [video_ids, speakers, labels, *roberta, feats["audio"], feats["visual"], sentences,
                  train + valid, test]
        if layout_name == "sdt-meld":
            fields.append(None)
    elif layout_name in ("mmgcn-iemocap", "mmgcn-meld"):
        fields = [video_ids, speakers, labels, feats["text"], feats["audio"], feats["visual"], sentences,
                  train + valid, test]
        if layout_name == "mmgcn-meld":
            fields.append([])
    elif layout_name == "dialoguernn-meld":
        fields = [video_ids, speakers, labels, feats["text"], feats["audio"], sentences, train + valid, test,
                  {d: [0] * len(labels[d]) for d in ids}]
    elif layout_name == "cosmic-iemocap":
        fields = [speakers, labels, *roberta, sentences, train, test, valid]
    else:  # cosmic-meld
        fields = [speakers, labels, {d: [0] * len(v) for d, v in labels.items()}, *roberta, sentences, train, test,
                  valid]
    assert len(fields) == lay.length
    with open(path, "wb") as handle:
        pickle.dump(tuple(fields), handle)
    return path, {"speakers": speakers, "labels": labels, "features": feats, "train": train, "valid": valid,
                  "test": test}


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_every_layout_round_trips(tmp_path, layout_name):
    path, truth = make_pickle(tmp_path / f"{layout_name}.pkl", layout_name)
    with open(path, "rb") as handle:
        assert detect_layout(pickle.load(handle)).name == layout_name
    out = import_pickle(path, tmp_path / "out.parquet", trust=True)
    data = load_dataset(out)
    lay = LAYOUTS[layout_name]
    assert data.name == lay.dataset and set(data.modality_dims) == set(lay.features)
    assert data.meta["source_sha256"] and lay.name in data.meta["source"]
    for split in data.splits.values():
        for k, dia in enumerate(split.dialogue_ids):
            original = next(d for d in truth["labels"] if str(d) == dia)
            n = len(truth["labels"][original])
            batch = split.batch(np.array([k]), tuple(data.modality_dims))
            assert batch.label[0, :n].tolist() == truth["labels"][original]
            for m in data.modality_dims:
                assert np.allclose(batch.features[m][0, :n].numpy(), np.stack(truth["features"][m][original]))
            speakers = batch.speaker[0, :n].tolist()
            assert speakers[0] == 0 and max(speakers) < n  # indexed by first appearance
    test_ids = {str(d) for d in truth["test"]}
    assert set(data.splits["test"].dialogue_ids) == test_ids
    if lay.valid is not None:  # the source's own validation split is kept
        assert set(data.splits["valid"].dialogue_ids) == {str(d) for d in truth["valid"]}
        assert data.meta["split_seed"] is None
    else:  # otherwise a seeded 20 % of the training dialogues
        assert len(data.splits["valid"].dialogue_ids) == 2 and data.meta["split_seed"] == 0


def test_resplit_overrides_the_source_validation(tmp_path):
    path, truth = make_pickle(tmp_path / "c.pkl", "cosmic-meld")
    data = load_dataset(import_pickle(path, tmp_path / "o.parquet", trust=True, resplit=0.2, split_seed=5))
    assert data.meta["split_seed"] == 5
    assert len(data.splits["valid"].dialogue_ids) == 2
    again = load_dataset(import_pickle(path, tmp_path / "o2.parquet", trust=True, resplit=0.2, split_seed=5))
    assert again.splits["valid"].dialogue_ids == data.splits["valid"].dialogue_ids


def test_untrusted_pickle_is_refused(tmp_path, capsys):
    path, _ = make_pickle(tmp_path / "x.pkl", "sdt-iemocap")
    with pytest.raises(DataError, match=r"x\.pkl: refusing to unpickle.*--trust-pickle"):
        import_pickle(path, tmp_path / "o.parquet")
    assert data_main(["import", str(path), "-o", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--trust-pickle" in err
    assert not (tmp_path / "o.parquet").exists()


def test_corrupt_pickle(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04not really")
    with pytest.raises(DataError, match=r"bad\.pkl: not a readable pickle"):
        import_pickle(bad, tmp_path / "o.parquet", trust=True)


def test_mismatched_feature_rows(tmp_path):
    path, _ = make_pickle(tmp_path / "m.pkl", "mmgcn-iemocap")
    with open(path, "rb") as handle:
        fields = list(pickle.load(handle))
    fields[4][IEMOCAP_IDS[0]] = fields[4][IEMOCAP_IDS[0]][:-1]  # one audio vector short
    with open(path, "wb") as handle:
        pickle.dump(tuple(fields), handle)
    with pytest.raises(DataError, match=r"dialogue Ses01F_impro01 audio features have shape"):
        import_pickle(path, tmp_path / "o.parquet", trust=True)


def test_layout_without_visual_feeds_only_runs_that_do_not_need_it(tmp_path):
    path, _ = make_pickle(tmp_path / "d.pkl", "dialoguernn-meld")
    data = load_dataset(import_pickle(path, tmp_path / "o.parquet", trust=True))
    with pytest.raises(DataError, match="needs the visual modality"):
        Trainer(CMATHConfig(dataset="meld", d=16, modalities="tav"), data)
    Trainer(CMATHConfig(dataset="meld", d=16, modalities="ta"), data).step()


# ---------------------------------------------------------------------------- MELD transcripts
N_DIALOGUES = {"train": 40, "valid": 8, "test": 8}
FILES = {"train": "train_sent_emo.csv", "valid": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def gapped_dialogues(frame: pd.DataFrame) -> list:
    """Dialogues whose Utterance_IDs are not 0..n-1 (MELD has gaps and late starts)."""
    return [d for d, g in frame.groupby("Dialogue_ID") if list(g["Utterance_ID"]) != list(range(len(g)))]


@pytest.fixture(scope="module")
def meld_slice(meld_dir, tmp_path_factory):
    """The first dialogues of each shared MELD file, plus one train dialogue whose ids have gaps."""
    out = tmp_path_factory.mktemp("meld")
    embeddings = np.load(meld_dir / "meld_minilm_all.npy")
    offset, rows = 0, []
    for split, name in FILES.items():
        frame = pd.read_csv(meld_dir / name)
        keep = list(dict.fromkeys(frame["Dialogue_ID"]))[: N_DIALOGUES[split]]
        if split == "train":
            keep.append(next(d for d in gapped_dialogues(frame) if d not in keep))
        mask = frame["Dialogue_ID"].isin(keep).to_numpy()
        frame[mask].to_csv(out / name, index=False)
        rows.append(np.flatnonzero(mask) + offset)
        offset += len(frame)
    np.save(out / "emb.npy", embeddings[np.concatenate(rows)])
    return out


def test_from_csv_on_real_meld_transcripts(meld_slice, tmp_path):
    path = import_csv(meld_slice, tmp_path / "meld.parquet", embeddings=meld_slice / "emb.npy")
    data = load_dataset(path)
    assert data.name == "meld" and data.classes[0] == "neutral" and data.modality_dims == {"text": 384}
    assert data.splits["train"].num_dialogues == N_DIALOGUES["train"] + 1
    assert data.splits["valid"].num_dialogues == N_DIALOGUES["valid"]  # MELD's dev split is kept

    # Order within a dialogue follows Utterance_ID, and each row keeps its own embedding.
    frame = pd.read_csv(meld_slice / "train_sent_emo.csv")
    emb = np.load(meld_slice / "emb.npy")
    gapped = gapped_dialogues(frame)[0]
    rows = frame.index[frame["Dialogue_ID"] == gapped]
    order = rows[np.argsort(frame.loc[rows, "Utterance_ID"].to_numpy(), kind="stable")]
    train = data.splits["train"]
    k = train.dialogue_ids.index(f"train:{gapped}")
    batch = train.batch(np.array([k]), ("text",))
    n = len(rows)
    assert int(batch.mask.sum()) == n
    assert np.allclose(batch.features["text"][0, :n].numpy(), emb[order])
    labels = [data.classes.index(e.lower()) for e in frame.loc[order, "Emotion"]]
    assert batch.label[0, :n].tolist() == labels
    names = frame.loc[order, "Speaker"].tolist()
    expected_speakers = [list(dict.fromkeys(names)).index(s) for s in names]
    assert batch.speaker[0, :n].tolist() == expected_speakers


def test_from_csv_text_only_file_trains_text_only(meld_slice, tmp_path):
    from cmath_model.cli import train_main

    path = import_csv(meld_slice, tmp_path / "meld.parquet", embeddings=meld_slice / "emb.npy")
    assert train_main(["--data", str(path), "--epochs", "1", "--set", "d=32", "--out", str(tmp_path / "run"),
                       "--quiet"]) == 0
    import yaml

    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["modalities"] == "t"
    assert (written["dataset"], written["lr"], written["batch_size"]) == ("meld", 2e-4, 4)  # MELD's paper defaults


def test_from_csv_multi_column_dialogue_key_and_resplit(meld_slice, tmp_path):
    path = import_csv(meld_slice, tmp_path / "m.parquet", embeddings=meld_slice / "emb.npy",
                      columns={"dialogue": ("Season", "Episode", "Dialogue_ID")}, resplit=0.2, split_seed=1)
    data = load_dataset(path)
    assert data.meta["split_seed"] == 1
    assert data.splits["train"].num_dialogues + data.splits["valid"].num_dialogues == 49
    assert all(d.count("/") == 2 for d in data.splits["test"].dialogue_ids)


def test_from_csv_errors(meld_slice, tmp_path):
    with pytest.raises(DataError, match=r"train_sent_emo\.csv: missing column 'Feeling'"):
        import_csv(meld_slice, tmp_path / "x.parquet", embeddings=meld_slice / "emb.npy",
                   columns={"label": "Feeling"})
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((10, 384), dtype=np.float32))
    with pytest.raises(DataError, match=r"short\.npy: embeddings have shape \(10, 384\)"):
        import_csv(meld_slice, tmp_path / "x.parquet", embeddings=short)
    with pytest.raises(DataError, match=r"no such file"):
        import_csv(tmp_path, tmp_path / "x.parquet", embeddings=short)
