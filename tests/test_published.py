"""The published result (studies/cifar10-matrix.db, reports/cifar10-matrix/, README's tables) cannot drift apart."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import optuna
import pytest

from bench.report import write_report

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "cifar10-matrix.db"
REPORT = ROOT / "reports" / "cifar10-matrix"
START, END = "<!-- results:matrix -->", "<!-- /results:matrix -->"

pytestmark = pytest.mark.skipif(not STUDY.exists() or not (REPORT / "matrix.csv").exists(),
                                reason="no published study in this checkout")


def test_matrix_csv_regenerates_from_the_committed_study(tmp_path):
    db = tmp_path / "copy.db"  # never write to the committed file; a consistent snapshot while a matrix run writes it
    with closing(sqlite3.connect(f"file:{STUDY}?mode=ro", uri=True)) as src, closing(sqlite3.connect(db)) as dst:
        src.backup(dst)
    study = optuna.load_study(study_name="cifar10-matrix", storage=f"sqlite:///{db}")
    write_report(study, tmp_path / "out", fmt="markdown")
    for name in ("matrix.csv", "cumulative.csv", "cost.csv", "trials.csv", "matrix.md"):
        if (REPORT / name).exists() or (tmp_path / "out" / name).exists():
            assert (tmp_path / "out" / name).read_text() == (REPORT / name).read_text(), f"{name} drifted from the study"


def test_readme_tables_equal_the_published_matrix_md():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme
    block = readme.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == (REPORT / "matrix.md").read_text(encoding="utf-8").strip()
