"""Where the commands write, and how, so that no input and no user file is ever lost.

- A new output folder (`--out`) is written through `peft_jdlora.bundle.atomic_output_dir`: it appears complete or not
  at all, and an existing one is replaced only with `--overwrite`. `refuse_output_over_inputs` refuses an `--out` that
  is, contains or lies inside a folder the command reads (a source adapter, the bundle, the base model), because
  replacing it would delete that input.
- `--in-place` (`staged_bundle_update`) replaces only the bundle's own files in the folder; everything else there
  (`.git/`, notes, other files) stays as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from .errors import UsageError
from .signals import held_signals

# The file names of a bundle (and of a PEFT adapter folder), as `peft_jdlora.bundle` names them: the tools keep their
# own copy because the commands parse their arguments without importing torch (tests/test_hub_push.py checks that
# both agree).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False): sources only
REPORT_NAME = "jdlora_report.json"
CARD_NAME = "README.md"
# The files a bundle consists of: what `--in-place` replaces and what a push uploads; nothing else in a folder is ours.
BUNDLE_FILES = (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME, CARD_NAME)
STAGING_PREFIX = ".jdlora-update.tmp-"


def _real(path: Union[str, os.PathLike]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def refuse_output_over_inputs(out: Path, inputs: Iterable[tuple[str, Optional[Path]]]) -> None:
    """Raise `UsageError` if `out` is, contains or lies inside one of the `(description, folder)` inputs. Paths are
    compared after resolving symlinks, `..` and `~`."""
    target = _real(out)
    for what, folder in inputs:
        if folder is None:
            continue
        real = _real(folder)
        if target == real:
            problem = "is"
            consequence = "writing the output there would replace it"
        elif real.is_relative_to(target):
            problem = "contains"
            consequence = "replacing it would delete that input"
        elif target.is_relative_to(real):
            problem = "lies inside"
            consequence = "the output would be written into an input folder"
        else:
            continue
        hint = " (or --in-place to update the bundle folder itself)" if what == "the bundle being changed" else ""
        raise UsageError(
            f"--out {out} {problem} {what} ({folder}): {consequence}. Choose an --out outside the inputs{hint}."
        )


@contextmanager
def staged_bundle_update(folder: Path) -> Iterator[Path]:
    """Yield an empty staging folder inside the bundle folder `folder`. When the block succeeds, the bundle files
    written there replace their namesakes in `folder`; every other file in `folder` stays. On failure (or a signal)
    the staging folder is removed and `folder` is left as it was.

    Each file moves with one atomic rename; the renames run with signals held, and if one fails the files already
    replaced are put back, so `folder` never holds a mix of old and new bundle files. (Only a crash of the machine
    between two renames, microseconds apart, could; the config and the weights then disagree on the number of
    adapters and the bundle refuses to load rather than loading wrong.) The staging folder lives inside `folder` so
    that the renames never cross a file system, even when `folder` is a mount point.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--in-place needs an existing bundle folder; {folder} is not one.")
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
        unknown = sorted(p.name for p in staging.iterdir() if p.name not in BUNDLE_FILES)
        if unknown:  # a bug in a command: only bundle files may replace files in a user's folder
            raise RuntimeError(f"refusing to move files that are not bundle files into {folder}: {unknown}")
        with held_signals():
            _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, folder: Path) -> None:
    """Move the bundle files of `staging` over those of `folder` (weights first, card last), all or none."""
    backup = staging / ".previous"
    backup.mkdir()
    names = [n for n in (WEIGHTS_NAME, CONFIG_NAME, REPORT_NAME, CARD_NAME) if (staging / n).is_file()]
    kept: dict[str, bool] = {}  # name -> whether `folder` held it before (and `backup` holds that version now)
    for name in names:
        old = folder / name
        kept[name] = old.is_file()
        if kept[name]:
            try:
                os.link(old, backup / name)  # a second name for the old file: nothing is copied
            except OSError:  # file systems without hard links
                shutil.copy2(old, backup / name)
    done: list[str] = []
    try:
        for name in names:
            os.replace(staging / name, folder / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            if kept[name]:
                os.replace(backup / name, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        raise
