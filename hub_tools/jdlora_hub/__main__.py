"""`python -m jdlora_hub COMMAND ...` runs `jdlora COMMAND ...`."""

from .cli import main

raise SystemExit(main())
