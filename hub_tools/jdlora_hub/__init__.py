"""jdlora_hub: the command line tools and Hub I/O of peft-jdlora.

`jdlora-convert` compresses a collection of PEFT LoRA adapters (local folders, Hub repos, Hub globs such as
`org/task-*`) into a verified JD-LoRA bundle with a model card and pushes it to the Hub in one commit; `jdlora`
inspects, exports, grows and shrinks bundles. The same operations are Python functions in `jdlora_hub.pipeline`.
Importing this package does not import torch; the commands import it when they need it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
