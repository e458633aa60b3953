"""jdlora_hub: the command line tools and Hub I/O of peft-jdlora.

`jdlora-convert` compresses a collection of PEFT LoRA adapters (local folders, Hub repos, Hub globs such as
`org/task-*`) into a verified JD-LoRA bundle with a model card and pushes it to the Hub in one commit; `jdlora`
inspects, exports, grows and shrinks bundles. The same operations are Python functions in `jdlora_hub.pipeline`.
Importing this package does not import torch; the commands import it when they need it.
"""

from importlib.metadata import PackageNotFoundError, version

# One distribution (peft-jdlora) ships peft_jdlora, jdlora_hub and jdlora_vllm: its version is theirs. Read from the
# installed metadata, since importing peft_jdlora (where the version is written) would import torch.
try:
    __version__ = version("peft-jdlora")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "unknown"

__all__ = ["__version__"]
