"""The sampler table and the exports agree: adding a sampler is one function in its family's file and one row in
``names.INFO``, and nothing else can be forgotten."""

import torchdiffusion as td
from torchdiffusion.names import DEFAULT_SAMPLER_NAME, INFO
from torchdiffusion.samplers import DEFAULT_SAMPLER, SAMPLER_FUNCTIONS


def _function(fn):
    return getattr(fn, "func", fn)  # a row may bind knobs with functools.partial


def test_every_sampler_function_has_a_row_and_every_row_a_function():
    in_table = {_function(info.fn) for info in INFO.values()}
    missing = sorted(name for name, fn in SAMPLER_FUNCTIONS.items() if fn not in in_table)
    assert not missing, f"sampler functions without a row in names.INFO: {missing}"
    assert in_table <= set(SAMPLER_FUNCTIONS.values())


def test_the_top_level_exports_every_sampler_by_name():
    for name, fn in SAMPLER_FUNCTIONS.items():
        assert getattr(td, name) is fn and name in td.__all__
    assert td.DEFAULT_SAMPLER is DEFAULT_SAMPLER and INFO[DEFAULT_SAMPLER_NAME].fn is DEFAULT_SAMPLER
    assert "langevin_dynamics" in td.__all__
