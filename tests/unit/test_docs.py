"""The documentation stays true of the code: every setting, command and route it names exists, and every one
that exists is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from litestar.routes import HTTPRoute, WebSocketRoute

from app.__main__ import build_parser
from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
API = DOCS / "api.md"
PAGES = sorted(DOCS.glob("*.md"))
# the names settings_from_env reads: the upper-cased fields of Settings
SETTINGS = {field.upper(): field for field in Settings.__struct_fields__}
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", re.MULTILINE)
ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE|WS) (/[^\s`|),]*)")


def subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


def documented_settings() -> dict[str, str]:
    """The settings tables of operations.md: variable → its default cell."""
    return dict(ROW.findall(OPERATIONS.read_text()))


def test_the_pages_exist() -> None:
    assert {p.name for p in PAGES} >= {"domain.md", "architecture.md", "api.md", "operations.md", "security.md"}


def test_every_setting_is_documented_in_operations() -> None:
    missing = sorted(set(SETTINGS) - set(documented_settings()))
    assert not missing, f"settings of app/settings.py missing from docs/operations.md: {missing}"


def test_operations_documents_no_setting_that_does_not_exist() -> None:
    unknown = sorted(set(documented_settings()) - set(SETTINGS))
    assert not unknown, f"docs/operations.md documents settings app/settings.py does not have: {unknown}"


def rendered(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_documented_defaults_are_the_code_defaults() -> None:
    defaults = Settings()
    wrong = []
    for name, cell in documented_settings().items():
        if name not in SETTINGS:
            continue
        expected = rendered(getattr(defaults, SETTINGS[name]))
        cell = cell.strip()
        ok = cell.startswith(("unset", "empty")) if expected is None else cell == f"`{expected}`"
        if not ok:
            wrong.append(f"{name}: documented {cell!r}, code {expected!r}")
    assert not wrong, wrong


def test_commands_named_in_docs_and_readme_are_real_and_all_are_documented() -> None:
    real = subcommands()
    named: set[str] = set()
    for page in [*PAGES, ROOT / "README.md"]:
        named |= set(re.findall(r"python -m app (\w[\w-]*)", page.read_text()))
    assert named - real == set(), f"documented commands `python -m app` does not accept: {named - real}"
    operations = OPERATIONS.read_text()
    assert {c for c in real if f"python -m app {c}" not in operations} == set()


def shape(path: str) -> str:
    """A route with its parameters unnamed: /a/{consultation_id:uuid} and /a/{id} are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str]]:
    settings = Settings(data_dir=str(tmp_path_factory.mktemp("docs")), jwt_keys="k1=" + "x" * 40,
                        secret_key="s" * 40)
    routes: set[tuple[str, str]] = set()
    for route in create_app(settings).routes:
        if isinstance(route, WebSocketRoute):
            routes.add(("WS", shape(route.path)))
        elif isinstance(route, HTTPRoute):
            routes |= {(m, shape(route.path)) for m in route.methods if m not in ("OPTIONS", "HEAD")}
    return routes


def test_routes_in_the_api_guide_exist(app_routes: set[tuple[str, str]]) -> None:
    documented = {(m, shape(p)) for m, p in ROUTE.findall(API.read_text())}
    assert documented - app_routes == set(), "docs/api.md names routes the app does not serve"


def test_every_route_of_the_app_is_in_the_api_guide(app_routes: set[tuple[str, str]]) -> None:
    documented = {(m, shape(p)) for m, p in ROUTE.findall(API.read_text())}
    # the interactive schema's own pages are the framework's, documented as /schema
    served = {(m, p) for m, p in app_routes if not p.startswith("/schema/")}
    assert served - documented == set(), "routes missing from docs/api.md"


def test_no_page_points_outside_the_repository() -> None:
    for page in [*PAGES, ROOT / "README.md", ROOT / "infra" / "README.md"]:
        text = page.read_text()
        assert "/work/" not in text, page.name
        assert "../shared" not in text, page.name
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            assert (page.parent / target).resolve().is_relative_to(ROOT), f"{page.name}: {target}"
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_every_metric_of_the_project_is_documented() -> None:
    from prometheus_client import REGISTRY

    import app.main  # imports every module that registers a metric
    import app.rtc.sfu.node  # noqa: F401  (the SFU node's own, when it has any)

    text = OPERATIONS.read_text()
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("clinic_")}
    assert names
    missing = sorted(n for n in names if f"`{n}" not in text)  # a counter is documented with its _total
    assert missing == []
