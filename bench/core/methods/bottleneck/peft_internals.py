"""What registering BOTTLENECK needs from peft beyond its documented API, in one place, checked at import.

bench/private_apis.py lists these names with the peft range they were tested on (pyproject.toml pins it); a peft
release that changes them stops the import with one ImportError that says what changed and what to install, not an
AttributeError deep inside peft.
"""
from __future__ import annotations

import peft

from bench.private_apis import PEFT_LAYER_HOOKS, PEFT_TUNER_HOOKS, PEFT_TYPE_ENUM, TESTED


def tested_peft() -> str:
    """The peft range this project declares (pyproject.toml), the one the suite has run."""
    return TESTED["peft"]


def _internals_changed(what: str) -> ImportError:
    return ImportError(f"bench.core.methods.bottleneck: peft {peft.__version__} changed what the BOTTLENECK registration "
                       f"relies on ({what}); install the tested range: pip install '{tested_peft()}'")


try:  # peft internals the registration uses (tests/test_bottleneck.py: test_peft_internals_*)
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType, register_peft_method
except ImportError as e:
    raise _internals_changed(f"cannot import {e.name or e}") from e

__all__ = ["PEFT_TYPE", "PREFIX", "BaseTuner", "BaseTunerLayer", "PeftConfig", "check_peft_internals", "register",
           "tested_peft"]


def check_peft_internals() -> None:
    """Raise one clear ImportError if peft no longer offers what registering BOTTLENECK relies on: a closed str enum
    PeftType whose member tables can take a new member, register_peft_method(name, config_cls, model_cls, prefix),
    the two type-to-class mappings, and the BaseTuner / BaseTunerLayer hooks the classes override or call."""
    import enum
    import inspect
    problems = []
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum) and all(
            isinstance(getattr(PeftType, a, None), t) for a, t in zip(PEFT_TYPE_ENUM.names, (list, dict, dict)))):
        problems.append(f"peft.utils.PeftType is no longer a str Enum with {', '.join(PEFT_TYPE_ENUM.names)}")
    missing = {"name", "config_cls", "model_cls", "prefix"} - set(inspect.signature(register_peft_method).parameters)
    if missing:
        problems.append(f"register_peft_method has no parameter {', '.join(sorted(missing))}")
    if not (isinstance(PEFT_TYPE_TO_CONFIG_MAPPING, dict) and isinstance(PEFT_TYPE_TO_TUNER_MAPPING, dict)):
        problems.append("peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING / PEFT_TYPE_TO_TUNER_MAPPING are no longer dicts")
    for owner, hooks in ((BaseTuner, PEFT_TUNER_HOOKS), (BaseTunerLayer, PEFT_LAYER_HOOKS)):
        problems += [f"{owner.__name__}.{hook} is gone" for hook in hooks.names
                     if not callable(getattr(owner, hook, None))]
    if "tuner_layer_cls" not in getattr(BaseTuner, "__annotations__", {}):
        problems.append("BaseTuner no longer declares tuner_layer_cls")
    if problems:
        raise _internals_changed("; ".join(problems))


check_peft_internals()

_NAME = "bottleneck"  # register_peft_method wants the lower-case name; the peft_type is its upper-case form
PREFIX = "adapter_"  # every adapter attribute on the tuner layers starts with this


def _ensure_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is missing.

    ``register_peft_method`` only accepts names whose upper-case form is already a member of the closed
    ``PeftType`` enum (it raises "please add an entry to peft.utils.peft_types.PeftType" otherwise), and Python
    enums cannot be extended through a public API. So we add the member the same way ``EnumType`` does when it
    builds the class. Because ``PeftType`` is a ``str`` enum, the member equals and hashes like the plain string
    ``"BOTTLENECK"``, so peft's dict look-ups with the string from ``adapter_config.json`` find it, and
    ``PeftType("BOTTLENECK")`` and pickling work too.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ would refuse to set a member-like name
    return member


PEFT_TYPE: PeftType = _ensure_peft_type_member(_NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register the method with peft once; registering again (importlib.reload(), or the package executed under a
    second name, which re-creates the classes) points peft at the classes given (register_peft_method itself would
    raise KeyError)."""
    if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    else:
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = model_cls
