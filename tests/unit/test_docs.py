"""The docs name every setting, metric, route and CLI flag the code has: drift fails here."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from sightstream.cli import parser
from sightstream.config import Settings
from sightstream.metrics import Metrics

ROOT = Path(__file__).parent.parent.parent
DOCS = {name: (ROOT / name).read_text() for name in
        ("README.md", "docs/contract.md", "docs/operations.md", "docs/http.md", "docs/models.md")}


def settings_of(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += settings_of(kind, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_every_setting_is_in_the_contract():
    contract = DOCS["docs/contract.md"]
    config = contract[contract.index("## Configuration"):]
    missing = [name for name in settings_of(Settings) + [f"pipelines.{n}" for n in settings_of(
        Settings.model_fields["pipelines"].annotation.__args__[0])]  # type: ignore[union-attr]
        if name not in ("pipelines", "models") and not re.search(rf"(^|\s|\[){re.escape(name.split('.')[-1])}\s*=",
                                                                   config, re.M)]
    assert not missing, f"settings missing from docs/contract.md's Configuration: {missing}"


def test_every_metric_is_in_operations():
    operations = DOCS["docs/operations.md"]
    names = {m.name.removeprefix("sightstream_") for m in Metrics().registry.collect()}
    missing = sorted(n for n in names if n not in operations)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


def test_every_route_is_in_the_http_docs(tmp_path):
    from sightstream.control.app import APIS

    http = DOCS["docs/http.md"] + DOCS["docs/contract.md"]
    routes = {op.path for api in APIS for op in api.operations}
    missing = sorted(p for p in routes if re.sub(r"{\w+}", "{", p).split("{")[0].rstrip("/") not in http)
    assert not missing, f"routes missing from docs/http.md: {missing}"


def test_every_cli_flag_is_in_the_contract():
    contract = DOCS["docs/contract.md"]
    cli = contract[contract.index("## CLI"):contract.index("## Configuration")]
    top = parser()
    missing = []
    for action in top._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        command, sub = action
        if f"sightstream {command}" not in cli:
            missing.append(command)
        for option in sub._actions:
            for flag in option.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--config") and flag not in cli:
                    missing.append(f"{command} {flag}")
    assert not missing, f"CLI commands and flags missing from docs/contract.md's CLI: {missing}"


def test_the_docs_agree_on_how_soon_new_streams_join():
    said = {name: re.findall(r"join(?:ed)? within `?(\d+) ?s`?", text) for name, text in DOCS.items()}
    values = {v for found in said.values() for v in found}
    assert len(values) == 1, f"the docs disagree on when new streams join: {said}"
