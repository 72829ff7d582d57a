"""Every input Struct bounds what a client can make the server hold: each text, list, map and byte field
has a maximum length, at any depth. A new Wire type without one fails here, not in production."""

from __future__ import annotations

import importlib
import pkgutil

import msgspec
import msgspec.inspect as mi
import pytest

import app
from app.accounts.schemas import MePatch
from app.schemas import Wire

# Fields allowed without a length limit, each with the reason (keep it empty where possible).
ALLOWED: dict[str, str] = {}

SIZED = (mi.StrType, mi.FrozenDictType, mi.BytesType, mi.ByteArrayType, mi.MemoryViewType, mi.ListType, mi.SetType,
         mi.FrozenSetType, mi.VarTupleType, mi.DictType)


def wire_types() -> list[type[Wire]]:
    for module in pkgutil.walk_packages(app.__path__, "app."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[Wire]] = []
    todo = list(Wire.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def unbounded(t: mi.Type, where: str, seen: set[type]) -> list[str]:
    """Paths under `t` that hold text, bytes or a collection with no max_length."""
    if isinstance(t, SIZED) and t.max_length is None and where not in ALLOWED:
        return [where]
    found: list[str] = []
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        found += unbounded(t.item_type, f"{where}[]", seen)
    elif isinstance(t, mi.DictType):
        found += unbounded(t.key_type, f"{where}{{key}}", seen) + unbounded(t.value_type, f"{where}{{}}", seen)
    elif isinstance(t, mi.TupleType):
        for i, item in enumerate(t.item_types):
            found += unbounded(item, f"{where}[{i}]", seen)
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            found += unbounded(member, where, seen)
    elif isinstance(t, mi.Metadata):  # a description or an example around the real type
        found += unbounded(t.type, where, seen)
    elif isinstance(t, mi.StructType) and t.cls not in seen:
        seen.add(t.cls)
        for f in t.fields:
            found += unbounded(f.type, f"{t.cls.__name__}.{f.name}", seen)
    elif isinstance(t, mi.AnyType):
        found.append(f"{where} (Any)")
    return found


def test_the_walk_finds_every_domain() -> None:
    names = {cls.__module__ for cls in wire_types()}
    assert {"app.accounts.schemas", "app.scheduling.schemas", "app.consultations.schemas",
            "app.chat.schemas"} <= names


@pytest.mark.parametrize("cls", wire_types(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_wire_field_has_a_max_length(cls: type[Wire]) -> None:
    assert unbounded(mi.type_info(cls), cls.__name__, set()) == []


def test_the_walk_catches_an_unbounded_field() -> None:
    class Loose(Wire):
        note: str
        tags: list[str] = msgspec.field(default_factory=list)

    assert unbounded(mi.type_info(Loose), "Loose", set()) == ["Loose.note", "Loose.tags"]


def test_a_questionnaire_is_bounded_in_encoded_size() -> None:
    answers = {f"q{i}": "x" * 1000 for i in range(100)}  # each value within bounds, the whole far too large
    with pytest.raises(msgspec.ValidationError, match="questionnaire"):
        msgspec.json.decode(msgspec.json.encode({"questionnaire": answers}), type=MePatch)
    fine = {"allergies": ["penicillin"], "smoker": False, "height_cm": 172, "notes": "x" * 500}
    assert msgspec.json.decode(msgspec.json.encode({"questionnaire": fine}), type=MePatch).questionnaire == fine
