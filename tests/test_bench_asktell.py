"""The ask/tell benchmark at a tiny size: what it prints, not how fast it ran."""

from __future__ import annotations

import pytest

from bench.asktell import main
from bench.postgres import unavailable


def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[start].split() == ["case", "storage", "n", "median", "p95", "p99", "commits",
                                    "writes"]  # fmt: skip
    rows = {}
    for line in lines[start + 1 : -1]:
        case, storage, rest = line[:28].strip(), line[28:42].strip(), line[42:].split()
        rows[(case, storage)] = rest
    return rows


def _timed(row: list[str], n: int) -> None:
    assert int(row[0]) == n
    median, p95, p99 = (float(v) for v in row[1:4])
    assert 0 < median <= p95 <= p99


def test_without_postgresql_each_case_times_every_trial(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--trials", "12", "--no-postgres"]) == 0
    out = capsys.readouterr().out

    assert out.startswith("machine: ") and "optuna 5." in out and "12 trials per case" in out
    rows = _rows(out)
    assert set(rows) == {(case, storage) for case in ("edgetune loop", "optuna")
                         for storage in ("journal", "memory")}  # fmt: skip
    for row in rows.values():
        _timed(row, 12)
        assert row[4:] == ["-", "-"]  # no database to count commits on
    assert out.splitlines()[-1].endswith("not measured, no PostgreSQL")


@pytest.mark.integration
@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_on_postgresql_the_commits_per_trial_are_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--trials", "5"]) == 0
    out = capsys.readouterr().out

    assert "PostgreSQL 1" in out and "fsync on" in out
    rows = _rows(out)
    loop, plain = rows[("edgetune loop", "postgresql")], rows[("optuna", "postgresql")]
    journal, plain_journal = rows[("edgetune loop", "pg journal")], rows[("optuna", "pg journal")]
    for row in (loop, plain, rows[("edgetune loop", "pg, sync off")], journal, plain_journal):
        _timed(row, 5)
    # on the journal, Optuna's ask/tell appends once per call that writes: the trial, 3
    # attributes, 5 parameters, the tell; the loop's events (several attributes each) are
    # one append each, as they are one transaction each on Optuna's tables
    assert float(plain_journal[5]) == 10 and float(journal[5]) <= float(loop[5])
    replay = rows[("open: replay whole journal", "pg journal")]
    assert int(replay[0]) == 3 and replay[4:] == ["-", "-"]
    # plain ask/tell: the trial created, 3 attributes, 5 parameters, the tell; its study
    # created and read once besides
    assert 10 <= float(plain[5]) <= float(plain[4])
    assert float(loop[5]) <= float(loop[4])
    last = out.splitlines()[-1]
    assert last.startswith("goal (edgetune loop on PostgreSQL, p95 <= 50 ms): ")
    journal_part, tables_part = last.split(": ", 1)[1].split("; ")
    assert journal_part.split(" on ")[0] in ("met", "missed")
    assert journal_part.split(", p95 ")[0].endswith("on the journal in PostgreSQL")
    assert tables_part.split(", p95 ")[0].endswith("on Optuna's tables")
    assert float(journal_part.split("p95 ")[1].removesuffix(" ms")) == float(journal[2])
