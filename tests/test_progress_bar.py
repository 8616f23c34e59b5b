"""The progress bar of long work (prepare, embed, index build): log records emitted while it is
drawn get their own lines above it instead of landing on the bar's line, as "index Flat: 0%| ...
shard-00000.faiss: filled 2175 vectors" did in ``make demo``."""

import logging
import sys

from reidscale.progress import progress_bar


def _lines(err: str) -> list[str]:
    return err.replace("\r", "\n").split("\n")


def test_a_record_logged_while_the_bar_is_drawn_gets_a_line_of_its_own(capsys, monkeypatch):
    # the root logger as a job sets it up (cli.run_job: basicConfig at INFO, bare messages)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    monkeypatch.setattr(logging.root, "handlers", [handler])
    monkeypatch.setattr(logging.root, "level", logging.INFO)
    with progress_bar(10, "index Flat", "vec") as bar:
        bar.update(4)
        bar.refresh()  # the bar is on screen when the record comes
        logging.getLogger("reidscale.index.build").info("shard-00000.faiss: filled 4 vectors")
        bar.update(6)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert "shard-00000.faiss: filled 4 vectors" in lines, repr(err)
    assert any(line.startswith("index Flat: 100%") and "10/10" in line for line in lines), repr(err)
    assert logging.root.handlers == [handler]  # the job's handler is back once the bar closes


def test_the_bar_counts_against_its_total_in_its_unit(capsys):
    with progress_bar(3, "embed gallery", "img") as bar:
        for _ in range(3):
            bar.update(1)
    last = [line for line in _lines(capsys.readouterr().err) if line.startswith("embed gallery")][-1]
    assert "3/3" in last and "img" in last, last
