"""Every model family satisfies the written contract (core/families/contract.py), member by
member, with the same parameters, so the trainer can rely on it and new families land on it."""
import inspect

import pytest

from loralab.core.families import SUPPORTED, get_family
from loralab.core.families.contract import ModelFamily

MEMBERS = [name for name, value in vars(ModelFamily).items()
           if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("name", SUPPORTED)
def test_family_satisfies_the_contract(name):
    family = get_family(name)
    assert isinstance(family, ModelFamily)
    assert family.name == name and isinstance(family.LORA_TARGETS, str)
    for member in MEMBERS:
        wanted = list(inspect.signature(getattr(ModelFamily, member)).parameters)[1:]  # less self
        given = list(inspect.signature(getattr(family, member)).parameters)
        assert given[:len(wanted)] == wanted, f"{name}.{member}{tuple(given)} != {tuple(wanted)}"
