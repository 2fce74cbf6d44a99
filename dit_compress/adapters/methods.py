"""The toolchain's adapter methods, registered with peft as peft methods.

peft keeps three tables per peft type: its config class, its tuner class and its parameter
prefix. `peft.utils.register_peft_method` fills them, but only for names of peft's closed
`PeftType` enum (it is how peft registers the tuners it ships), so a tuner outside peft gets the
same three entries written here, keyed by a plain-string peft type, which peft's configs accept
(`PeftConfig.peft_type: str | PeftType`). From then on peft resolves the `peft_type` of an
`adapter_config.json` to our classes: `PeftModel.from_pretrained`, `PeftModel.load_adapter`,
`inject_adapter_in_model` and `get/set_peft_model_state_dict` treat TD-LoRA and DiffScaler as
they treat LoRA. Importing `dit_compress.adapters` registers them.
"""

from __future__ import annotations

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PeftType
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

from .diffscaler import DIFFSCALER, DiffScalerConfig, DiffScalerModel
from .td_lora import TD_LORA, TDLoraConfig, TDLoraModel


def register(peft_type: str, config_cls: type, tuner_cls: type) -> None:
    """Enter a tuner in peft's tables, with the uniqueness checks `register_peft_method` makes."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is tuner_cls:
        return
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING or peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise KeyError(f"peft already has a method of type {peft_type!r}")
    if tuner_cls.prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"peft already has a method with the parameter prefix {tuner_cls.prefix!r}")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls


register(TD_LORA, TDLoraConfig, TDLoraModel)
register(DIFFSCALER, DiffScalerConfig, DiffScalerModel)

# The toolchain's method name -> its peft type. Plain LoRA is peft's own.
PEFT_TYPES: dict[str, str] = {"lora": PeftType.LORA.value, "td_lora": TD_LORA, "diffscaler": DIFFSCALER}
# method -> (config class, tuner class), as peft resolves them.
METHODS = {m: (PEFT_TYPE_TO_CONFIG_MAPPING[t], PEFT_TYPE_TO_TUNER_MAPPING[t]) for m, t in PEFT_TYPES.items()}


def method_for(peft_type) -> str | None:
    """The toolchain's name for a peft type (an enum member or its string), None if it serves no such method."""
    value = getattr(peft_type, "value", peft_type)
    return next((m for m, t in PEFT_TYPES.items() if t == value), None)
