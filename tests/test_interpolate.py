"""${VAR} substitution in manifests (agent/interpolate.py), alone and through the loader."""

from __future__ import annotations

import textwrap

import pytest

from meshctl.agent.errors import ManifestError
from meshctl.agent.interpolate import referenced_names, substitute
from meshctl.agent.manifest import parse_manifest

ENV = {"TOKEN": "s3cret", "EMPTY": "", "HOST": "db.local"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer ${TOKEN}", "Bearer s3cret"),
        ("${MISSING:-fallback}", "fallback"),
        ("${MISSING:-}", ""),
        ("${EMPTY:-x}", ""),  # set but empty is set, as in docker compose without ':'
        ("${HOST}:${MISSING:-5432}", "db.local:5432"),
        ("costs $$5", "costs $5"),
        ("$$TOKEN", "$TOKEN"),
        ("--port $PORT", "--port $PORT"),  # no braces: the instance's, at start
        ("--port ${PORT}", "--port ${PORT}"),
        ("${MESH_INSTANCE}", "${MESH_INSTANCE}"),
        ("${CART_URL}/items", "${CART_URL}/items"),  # an upstream's URL: run time
        ("^/items/[0-9]+$", "^/items/[0-9]+$"),
    ],
)
def test_values(value: str, expected: str) -> None:
    document = {"services": {"cart": {}}, "value": value}
    assert list(substitute(document, ENV)) == []
    assert document["value"] == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${MISSING}", "${MISSING} is not set in the environment meshctl runs in: export MISSING, "
                       "or write ${MISSING:-default}"),
        ("${}", "'${}' is not a variable reference"),
        ("${A B}", "'${A B}' is not a variable reference"),
        ("${UNCLOSED", "'${UNCLOSED' is not a variable reference"),
    ],
)
def test_problems_name_the_path(value: str, message: str) -> None:
    document = {"a": [{"b": value}]}
    [(path, problem)] = list(substitute(document, ENV))
    assert path == ("a", 0, "b")
    assert problem.startswith(message)


def test_referenced_names() -> None:
    assert referenced_names("a: ${A}\nb: ${B:-x} $C $${D}\n") == {"A", "B"}  # $${D} is a literal


MANIFEST = """\
    mesh: shop
    observability:
      tracing:
        otlp:
          endpoint: http://127.0.0.1:4318/v1/traces
          headers: {x-api-key: "${API_KEY}"}
    services:
      web:
        command: python app.py --port $PORT
        env: {DSN: "postgres://${DB_USER:-app}@localhost/${DB_NAME}"}
"""


def test_the_loader_fills_values_from_the_given_environment() -> None:
    manifest = parse_manifest(
        textwrap.dedent(MANIFEST), "mesh.yaml", base_dir="/srv", environ={"API_KEY": "k", "DB_NAME": "shop"}
    )
    assert dict(manifest.service("web").versions[0].env) == {"DSN": "postgres://app@localhost/shop"}
    assert manifest.observability.otlp is not None
    assert dict(manifest.observability.otlp.headers)["x-api-key"] == "k"
    assert manifest.service("web").versions[0].command == ("python", "app.py", "--port", "$PORT")


def test_an_unset_variable_is_a_problem_with_file_and_line() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(textwrap.dedent(MANIFEST), "mesh.yaml", base_dir="/srv", environ={"DB_NAME": "x"})
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.path) == ("mesh.yaml", 6, "observability.tracing.otlp.headers.x-api-key")
    assert "${API_KEY} is not set" in problem.message
