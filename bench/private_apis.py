"""Every private or undocumented attribute of another library that bench/ relies on, and the range it was tested on.

A library may change these in any release. Each one has no public API that does the same job (the `used_by` text
says why), its library is pinned in pyproject.toml to the range in TESTED, and a test (`guard`) fails with one line
naming the attribute, its user and the tested range when an installed release no longer has it
(tests/test_private_apis.py checks every entry, and that TESTED is what pyproject.toml pins). Add an entry here
before touching another private name. transformers and mlflow: nothing private is used. Optuna: only the trial id a
sweep hands to its run's worker process (`trial._trial_id`, an instance attribute, so not an entry here: the one way
to open another process's running trial, optuna.trial.Trial(study, trial_id), for the pruner; guarded by
tests/test_sweep.py::test_the_trial_id_the_pruning_hook_passes_opens_the_same_trial).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

# the ranges the suite ran on, written as in pyproject.toml's dependencies (tests/test_private_apis.py holds them equal)
TESTED = {"peft": "peft>=0.21,<0.22", "hydra-core": "hydra-core>=1.3,<1.4", "optuna": "optuna>=4.0,<6"}


@dataclass(frozen=True)
class PrivateApi:
    library: str            # the distribution, a key of TESTED
    owner: str              # where the names live: "module" or "module:Class"
    names: tuple[str, ...]  # what bench/ reads, sets, calls or overrides there
    used_by: str            # the file (and function) of bench/ that touches them
    why: str                # what for, and why no public API does it
    guard: str              # the test that fails, with a message, when the library changes them

    def missing(self) -> list[str]:
        """The names the installed library no longer has (all of them if the owner itself is gone)."""
        module, _, cls = self.owner.partition(":")
        try:
            obj = importlib.import_module(module)
            obj = getattr(obj, cls) if cls else obj
        except (ImportError, AttributeError):
            return list(self.names)
        return [n for n in self.names if not hasattr(obj, n)]

    def changed(self, version: str, missing: list[str]) -> str:
        return (f"{self.library} {version}: {self.owner.replace(':', '.')} no longer has {', '.join(missing)}, which "
                f"{self.used_by} relies on; install the tested range: pip install '{TESTED[self.library]}' (or adapt "
                f"{self.used_by} and its entry in bench/private_apis.py)")


PEFT_TYPE_ENUM = PrivateApi(
    "peft", "peft.utils:PeftType", ("_member_names_", "_member_map_", "_value2member_map_"),
    "bench/core/methods/bottleneck/peft_internals.py",
    "adds the BOTTLENECK member to peft's closed PeftType enum the way EnumType builds one (a Python enum has no "
    "public way to gain a member, and register_peft_method takes only an existing member)",
    "tests/test_bottleneck.py::test_peft_internals_*")
PEFT_MAPPINGS = PrivateApi(
    "peft", "peft.mapping", ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING"),
    "bench/core/methods/bottleneck/peft_internals.py: register",
    "points them at the current classes when the package is executed a second time (register_peft_method raises "
    "KeyError on a second registration); public names, but not documented as an API",
    "tests/test_bottleneck.py::test_import_twice_is_idempotent")
PEFT_TUNER_HOOKS = PrivateApi(
    "peft", "peft.tuners.tuners_utils:BaseTuner",
    ("_create_and_replace", "_replace_module", "_check_merge_allowed", "_check_target_module_exists",
     "_mark_only_adapters_as_trainable"),
    "bench/core/methods/bottleneck/model.py: BottleneckModel",
    "overrides the first three, peft's extension points for a tuner (protected by name only; every built-in method "
    "overrides them), and inherits the other two",
    "tests/test_bottleneck.py::test_peft_internals_*")
PEFT_LAYER_HOOKS = PrivateApi(
    "peft", "peft.tuners.tuners_utils:BaseTunerLayer",
    ("_get_base_layer_device_and_dtype", "_move_adapter_to_device_of_base_layer", "_cast_input_dtype"),
    "bench/core/methods/bottleneck/layer.py: BottleneckLayer",
    "overrides the first (a wrapped container has no .weight) and calls the other two as peft's own layers do, so a "
    "new adapter follows the base layer's device and dtype and peft's public disable_input_dtype_casting applies",
    "tests/test_bottleneck.py::test_peft_internals_*")
PEFT_BOFT_KERNEL = PrivateApi(
    "peft", "peft.tuners.boft.layer", ("_FBD_CUDA", "get_fbd_cuda"),
    "bench/core/methods/__init__.py: _no_boft_cuda_build, _no_boft_kernel (meta-device builds: validation, plan)",
    "sets get_fbd_cuda()'s cache to False on a machine without CUDA, so BOFT takes peft's own fallback instead of "
    "compiling a CUDA kernel that could never run (peft offers no switch); without the name it does nothing",
    "tests/test_private_apis.py::test_boft_kernel_cache_short_circuits_the_build")
PEFT_MODULES_TO_SAVE = PrivateApi(
    "peft", "peft.utils:ModulesToSaveWrapper", ("adapter_layer_names", "init_modules"),
    "bench/core/multitask.py: fit_heads",
    "replaces one adapter's entry of the wrapper's per-adapter ModuleDict (the attribute adapter_layer_names names, "
    "modules_to_save, made by init_modules) with a head of that task's size before load_adapter fills it: peft copies "
    "the base model's head for every adapter and offers no way to give one adapter a head of another size",
    "tests/test_multitask.py::test_peft_keeps_one_head_per_adapter_in_modules_to_save")
HYDRA_PARSER = PrivateApi(
    "hydra-core", "hydra._internal.utils", ("get_args_parser",),
    "bench/__main__.py: _hydra_parser",
    "takes Hydra's own argument parser, so `python -m bench` accepts Hydra's flags as Hydra defines them (hydra_argv "
    "also reads the parser's _actions, argparse's, Python's own)",
    "tests/test_reliability.py::test_hydra_private_parser_still_offers_what_main_reads")

PRIVATE_APIS = (PEFT_TYPE_ENUM, PEFT_MAPPINGS, PEFT_TUNER_HOOKS, PEFT_LAYER_HOOKS, PEFT_BOFT_KERNEL, PEFT_MODULES_TO_SAVE,
                HYDRA_PARSER)
