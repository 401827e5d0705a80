"""What deployers run: docker/ (image and compose file), app.json and the Procfile.

No Docker engine runs here, so these check what can be checked without one: the compose
file against the Compose Specification's JSON schema (``compose_spec.json`` beside this
file, taken unchanged from the ``docker-compose`` 1.29.2 wheel on PyPI, Apache-2.0), the
image's entrypoint (a real shell script, run here) resolving each service to its Procfile
line, the Dockerfile's shape, the package the image installs, and app.json against the
Procfile and the settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.harness import read_procfile

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROCFILE = read_procfile(ROOT)
OUTLAST_SERVICES = {"release", "web", "worker", "beat", "flower"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_file_is_valid_compose_specification(compose):
    schema = json.loads((Path(__file__).with_name("compose_spec.json")).read_text())
    # The file names draft 2019-09 (as "…/draft/2019-09/schema#", a spelling jsonschema
    # does not look up by itself).
    validator = jsonschema.Draft201909Validator(schema)

    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))

    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert set(compose["services"]) == {"postgres", "redis"} | OUTLAST_SERVICES


def test_compose_runs_every_procfile_process_from_one_image(compose):
    services = compose["services"]
    outlast = {name: services[name] for name in OUTLAST_SERVICES}

    assert set(PROCFILE) == OUTLAST_SERVICES
    for name, service in outlast.items():
        assert service["command"] == [name], f"{name} must run the Procfile's {name} line"
        assert service["image"] == "outlast:local"
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert service["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:")
    # Migrations first; the long-running processes wait for them to succeed.
    assert services["release"]["restart"] == "no"
    for name in OUTLAST_SERVICES - {"release"}:
        assert outlast[name]["depends_on"]["release"] == {
            "condition": "service_completed_successfully"
        }
    assert services["flower"]["environment"]["OUTLAST_FLOWER_BASIC_AUTH"].startswith("${")


@pytest.fixture
def fake_outlast(tmp_path: Path) -> dict[str, str]:
    """A PATH whose ``outlast`` reports what it was run with (argv, pid, environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "outlast"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'pid': os.getpid(),"
        " 'remap': os.environ.get('REMAP_SIGTERM')}))\n"
    )
    script.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "PROCFILE": str(ROOT / "Procfile"),
    }


def _entrypoint(env: dict[str, str], *args: str) -> tuple[dict, int]:
    proc = subprocess.Popen(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return json.loads(out), proc.pid


@pytest.mark.parametrize("process", sorted(OUTLAST_SERVICES))
def test_image_entrypoint_execs_the_procfile_line(fake_outlast, process):
    ran, pid = _entrypoint(fake_outlast, process)

    line = PROCFILE[process]
    assignments = dict(w.split("=", 1) for w in line.split() if re.fullmatch(r"[A-Z_]+=\S*", w))
    command = [w for w in line.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    assert ["outlast", *ran["argv"]] == command
    assert ran["remap"] == assignments.get("REMAP_SIGTERM")
    # Every hop is an exec: the server is the process the platform signals.
    assert ran["pid"] == pid


def test_image_entrypoint_runs_any_other_command_as_given(fake_outlast):
    ran, _ = _entrypoint(fake_outlast, "outlast", "tenants", "create", "acme")

    assert ran["argv"] == ["tenants", "create", "acme"]


def test_dockerfile_is_one_small_non_root_image_running_procfile_lines():
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    final = stages[-1]

    assert len(stages) == 2, "a build stage and a run stage"
    assert all(stage.split()[0] == "python:3.11-slim" for stage in stages)
    assert re.search(r"^USER outlast$", final, re.M)
    assert re.search(r"useradd .*--uid 10001", final)
    assert 'ENTRYPOINT ["outlast-entrypoint"]' in final
    assert 'CMD ["web"]' in final
    assert "COPY Procfile /app/Procfile" in final
    assert "COPY docker/entrypoint.sh /usr/local/bin/outlast-entrypoint" in final
    assert "apt-get" not in text and "gcc" not in text  # wheels only, nothing compiled
    for source in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY of missing {path}"
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text()
    for path in (
        "outlast/",
        "app/",
        "workers/",
        "tasks/",
        "migrations/",
        "Procfile",
        "docker/entrypoint.sh",
    ):
        assert f"!{path}" in ignored, f"{path} would be left out of the build context"


def test_package_the_image_installs_holds_code_migrations_and_the_cli(tmp_path):
    source = tmp_path / "src"
    for name in ("outlast", "app", "workers", "tasks", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source / name)

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
    )

    (wheel,) = (tmp_path / "dist").glob("outlast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "migrations/alembic.ini",
        "migrations/env.py",
        "migrations/script.py.mako",
        "migrations/versions/0001_initial.py",
        "workers/make_celery.py",
        "tasks/steps.py",
        "workers/wsgi.py",
        "app/cli/caller.py",
        "outlast/__init__.py",
        "outlast/client.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "outlast = app.launcher:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_app_json_matches_the_procfile_and_the_settings():
    app_json = json.loads((ROOT / "app.json").read_text())
    settings_source = (ROOT / "app" / "settings.py").read_text()

    # Every long-running Procfile process has a formation entry, and nothing else does;
    # "release" is Heroku's release phase (migrations before each deploy), not a dyno.
    assert PROCFILE["release"] == "outlast db upgrade"
    assert set(app_json["formation"]) == set(PROCFILE) - {"release"}
    assert app_json["formation"]["web"]["quantity"] >= 1
    assert app_json["formation"]["worker"]["quantity"] >= 1
    assert app_json["formation"]["beat"]["quantity"] == 1  # exactly one scheduler
    plans = {a if isinstance(a, str) else a["plan"] for a in app_json["addons"]}
    assert plans == {"heroku-postgresql", "heroku-redis"}
    for name in app_json["env"]:
        assert f'"{name}"' in settings_source, f"{name} is not a setting Outlast reads"
    assert app_json["scripts"]["postdeploy"].startswith("outlast ")
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert ".[server]" in requirements  # the buildpack installs the package with the service


def test_app_json_postdeploy_is_a_real_cli_command():
    from click import Context

    from app.cli import main

    words = json.loads((ROOT / "app.json").read_text())["scripts"]["postdeploy"].split()
    command = main
    for word in words[1:]:
        if not hasattr(command, "get_command"):
            break
        found = command.get_command(Context(command), word)
        assert found is not None, f"`{' '.join(words)}`: no command {word!r}"
        command = found
