"""The `JDLORA` peft type.

PEFT's `PeftType` is a closed enum and `register_peft_method` only accepts its members, so JDLORA is a member of an
enum of our own. It must be a `str` Enum (not a plain string): transformers' `load_adapter` calls `.value` on it, and
PEFT looks it up in its mappings by the string `"JDLORA"` read from `adapter_config.json`.
"""

import enum


class JDLoraPeftType(str, enum.Enum):
    JDLORA = "JDLORA"

    def __str__(self) -> str:
        return self.value


JDLORA = JDLoraPeftType.JDLORA
