"""Developer commands: `nox -s tests`, `nox -s lint`, `nox -s smoke`; slow ones run only when named."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

SHARED_CIFAR = "../shared/data/cifar10-jpeg"


def install(session: nox.Session, *extras: str) -> None:
    """The project, editable, with the given extras (torch comes from the machine's pip index)."""
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite (posargs go to pytest)."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "bench", "tests", "noxfile.py", *session.posargs)


@nox.session(python="3.11")
def smoke(session: nox.Session) -> None:
    """A 2-trial, 1-epoch study on generated data, then its report."""
    install(session)
    tmp = session.create_tmp()
    session.run("python", "-m", "bench.fixtures", f"{tmp}/tiny")
    session.run("python", "-m", "bench.run", "--trials", "2", "--max-epochs", "1", "--dataset", f"{tmp}/tiny",
                "--study-name", "smoke", "--storage", f"sqlite:///{tmp}/smoke.db", "--cache-dir", f"{tmp}/cache",
                *session.posargs)


@nox.session(python="3.11", default=False)
def perf(session: nox.Session) -> None:
    """Classic per-image pipeline vs the harness, side by side (posargs go to bench.perf)."""
    install(session)
    session.run("python", "-m", "bench.perf", "--dataset", SHARED_CIFAR, *session.posargs)
