from __future__ import annotations

import pytest

from bench.errors import redact


@pytest.mark.parametrize("text, secret", [
    ("postgresql://bench:s3cret@127.0.0.1:5432/db", "s3cret"),
    ("cannot open postgresql://u:p@ss:w/rd@dbhost/db; check the URL", "p@ss:w/rd"),
    ("postgresql://dbhost/db?user=u&password=hunter2&sslmode=require", "hunter2"),
    ("postgresql+psycopg://u@dbhost/db?PASSWORD=Hunter2", "Hunter2"),
])
def test_passwords_are_masked(text, secret):
    shown = redact(text)
    assert secret not in shown and "***" in shown
    assert "dbhost" in shown or "127.0.0.1" in shown  # only the password goes


def test_text_without_passwords_is_unchanged():
    for text in ("sqlite:///studies/bench.db", "journal:///studies/a.journal", "postgresql://u@h/db?sslmode=require"):
        assert redact(text) == text
