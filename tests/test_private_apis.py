"""The private library names bench/ relies on (bench/private_apis.py): each still there, on the tested range.

A library release that drops or changes one fails here with one line that names it, the code that uses it and the
range to install, before a run fails somewhere deep inside the library."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from bench import private_apis
from bench.private_apis import PRIVATE_APIS, TESTED

ROOT = Path(__file__).resolve().parents[1]


def test_tested_ranges_are_what_pyproject_pins():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {Requirement(d).name: d.replace(" ", "") for d in deps}
    for library, tested in TESTED.items():
        assert pins.get(library) == tested, (f"pyproject.toml pins {pins.get(library)!r}, bench/private_apis.py "
                                             f"TESTED says {tested!r}: change both together, after running the suite")


@pytest.mark.parametrize("library", TESTED)
def test_installed_library_is_in_its_tested_range(library):
    version = importlib.metadata.version(library)
    assert Requirement(TESTED[library]).specifier.contains(version), (
        f"{library} {version} is outside {TESTED[library]}, the range bench/private_apis.py was tested on; "
        f"pip install '{TESTED[library]}', or check every {library} entry there and widen the range")


def test_every_entry_names_its_library_and_a_guard():
    for api in PRIVATE_APIS:
        assert api.library in TESTED and api.names and api.guard.startswith("tests/"), api


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda a: a.owner)
def test_private_names_are_still_there(api):
    missing = api.missing()
    assert not missing, api.changed(importlib.metadata.version(api.library), missing)


def test_a_missing_name_is_reported_in_one_line():
    gone = private_apis.PrivateApi("peft", "peft.tuners.boft.layer", ("_NO_SUCH_NAME",), "bench/x.py: f", "why",
                                   "tests/test_private_apis.py")
    assert gone.missing() == ["_NO_SUCH_NAME"]
    message = gone.changed("9.9", gone.missing())
    assert "\n" not in message and "peft.tuners.boft.layer no longer has _NO_SUCH_NAME" in message
    assert "pip install 'peft>=" in message and "bench/x.py: f" in message


def test_boft_kernel_cache_short_circuits_the_build(monkeypatch):
    """_no_boft_cuda_build relies on get_fbd_cuda() returning its module-level cache once that is not None."""
    from peft.tuners.boft import layer

    from bench.core import methods
    monkeypatch.setattr(layer, "_FBD_CUDA", False)
    assert layer.get_fbd_cuda() is False, private_apis.PEFT_BOFT_KERNEL.changed(
        importlib.metadata.version("peft"), ["the cache get_fbd_cuda() returns (_FBD_CUDA)"])
    if not torch.cuda.is_available():
        monkeypatch.setattr(layer, "_FBD_CUDA", None)
        methods._no_boft_cuda_build()
        assert layer._FBD_CUDA is False
