"""Registers JDLORA with PEFT as soon as `peft` has been imported, without the user importing peft_jdlora.

Run at interpreter start by the installed `peft_jdlora_autoload.pth`, so it must stay cheap: it is a top-level module
(importing anything inside peft_jdlora would pull in torch) that imports neither torch nor peft; it only watches for
the `peft` package to finish loading and then imports peft_jdlora, which registers. PEFT_JDLORA_NO_AUTOLOAD=1 turns it
off; then PEFT fails on a bundle with `KeyError: 'JDLORA'` until `import peft_jdlora`.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings


class _RegisterAfterPeft:
    """A meta-path finder that only intercepts `peft`, to run registration right after it loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                import peft_jdlora  # noqa: F401  (registers JDLORA)
            except Exception as err:  # never break `import peft` for users of other adapters
                warnings.warn(f"peft-jdlora could not register the JDLORA peft type: {err!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if os.environ.get("PEFT_JDLORA_NO_AUTOLOAD") == "1" or "peft" in sys.modules:
        return
    if not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


install()
