"""Developer commands: `nox -s tests`, `nox -s lint`, `nox -s smoke`; slow ones run only when named."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

import nox

nox.options.sessions = ["lint", "tests", "postgres"]
nox.options.reuse_existing_virtualenvs = True

SHARED_CIFAR = "../shared/data/cifar10-jpeg"


def install(session: nox.Session, *extras: str) -> None:
    """The project, editable, with the given extras (torch comes from the machine's pip index)."""
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite on every core, each test file whole on one worker (posargs go to pytest; `-n 0`: serially)."""
    install(session, "test", "postgres")
    # loadfile: a module's tests run in order in one process, so module fixtures (the search simulations, the recorded
    # table) are built once and the tests that read what an earlier one wrote still find it
    session.run("pytest", "-n", "auto", "--dist", "loadfile", *session.posargs)


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned directory."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@nox.session(python="3.11")
def postgres(session: nox.Session) -> None:
    """Distributed-run tests on a real PostgreSQL server on 127.0.0.1 (installed with apt-get when missing)."""
    install(session, "test", "postgres")
    if postgres_bin("initdb") is None:
        session.run("apt-get", "update", "-q", external=True)
        session.run("apt-get", "install", "-y", "-q", "postgresql", external=True)
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    data = tempfile.mkdtemp(prefix="bench-pg-")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
    port = "54329"
    session.run(*as_postgres, initdb, "-D", data, "-A", "trust", "-U", "bench", external=True, silent=True)
    session.run(*as_postgres, pg_ctl, "-D", data, "-w", "-l", f"{data}/server.log", "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start", external=True)
    try:
        session.run("createdb", "-h", "127.0.0.1", "-p", port, "-U", "bench", "benchtest", external=True)
        url = f"postgresql://bench:s3cret-pw@127.0.0.1:{port}/benchtest"  # trust auth; the password tests redaction
        session.run("pytest", "tests/test_parallel.py", "-k", "postgres", *session.posargs, env={"BENCH_PG_URL": url})
    finally:
        session.run(*as_postgres, pg_ctl, "-D", data, "-m", "fast", "stop", external=True)
        shutil.rmtree(data, ignore_errors=True)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff, and the import layers ([tool.importlinter]) with import-linter."""
    session.install(*nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["lint"])
    session.run("ruff", "check", "bench", "tests", "scripts", "noxfile.py", *session.posargs)
    session.run("lint-imports", "--no-cache")


@nox.session(python="3.11")
def smoke(session: nox.Session) -> None:
    """A 2-trial, 1-epoch study on generated data, then its report (posargs go to bench.run)."""
    install(session)
    tmp = session.create_tmp()
    session.run("python", "-m", "bench.sample_data", f"{tmp}/tiny")
    storage = f"sqlite:///{tmp}/smoke.db"
    session.run("python", "-m", "bench.run", "--trials", "2", "--max-epochs", "1", "--dataset", f"{tmp}/tiny",
                "--study-name", "smoke", "--storage", storage, "--cache-dir", f"{tmp}/cache", *session.posargs)
    session.run("python", "-m", "bench.report", "--study", "smoke", "--storage", storage, "--out", f"{tmp}/report")


@nox.session(python="3.11", default=False)
def layout(session: nox.Session) -> None:
    """Check a report page fits 1400 px without horizontal scrolling in headless Chromium (posargs: the pages)."""
    if not session.posargs:
        session.error("name the report pages: nox -s layout -- reports/NAME/index.html")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        session.run("apt-get", "update", "-q", external=True)
        session.run("apt-get", "install", "-y", "-q", "chromium", external=True)
    for page in session.posargs:
        session.run("python", "scripts/layout_check.py", page)


@nox.session(python="3.11", default=False)
def perf(session: nox.Session) -> None:
    """Classic per-image pipeline vs the harness, side by side (posargs go to bench.perf)."""
    install(session, "perf")
    session.run("python", "-m", "bench.perf", "--dataset", SHARED_CIFAR, *session.posargs)
