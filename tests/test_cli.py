"""What a new user meets first: ``--help``, a misspelt key, and errors for a missing model or index
(one line that names the command that makes what is missing)."""

import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from reidscale.cli import run_job
from reidscale.config import describe
from reidscale.train.config import TrainJobConfig

REPO = Path(__file__).resolve().parents[1]


def _never_called(cfg):
    raise AssertionError("the job ran")


def _leaves(cls, prefix=""):
    """(dotted key, default) of every leaf field, walked here rather than through config.describe."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, getattr(defaults, f.name)


def _help_lines(capsys, argv, doc=""):
    assert run_job(TrainJobConfig, _never_called, argv=argv, doc=doc) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("argv", [["--help"], ["train.epochs=3", "--help"], ["train.epoch=3", "-h", "run_dir=x"]])
def test_help_anywhere_lists_every_key_with_type_default_and_comment(capsys, argv):
    lines = _help_lines(capsys, argv)
    by_key = {line.split(" (", 1)[0].strip(): line for line in lines if line.startswith("  ") and " (" in line}
    leaves = list(_leaves(TrainJobConfig))
    assert len(leaves) > 30 and [k for k, _ in leaves if k not in by_key] == []
    docs = {d.key: d for d in describe(TrainJobConfig)}
    for key, default in leaves:
        line = by_key[key]
        shown = json.dumps(default) if isinstance(default, (list, tuple, dict, str)) else str(default)
        assert f"({docs[key].type}, default {shown})" in line, line
        if docs[key].comment:
            assert line.endswith(f"  # {docs[key].comment}"), line
    # the comments are the ones written above the fields in the source (a multi-line one joined),
    # not empty strings: describe() reading no comments at all would pass the loop above
    assert by_key["data_dir"].endswith("# empty: <run_dir>/data")
    assert "random: no identity structure" in by_key["train.sampler"]
    assert "train.epochs (int, default " in by_key["train.epochs"]


def test_help_of_a_job_script_prints_its_docstring_examples_without_starting_ray():
    script = REPO / "jobs" / "train_clipreid.py"
    examples = [line.strip() for line in ast.get_docstring(ast.parse(script.read_text())).splitlines()
                if line.strip().startswith("python jobs/")]
    assert len(examples) >= 3
    # run the script as __main__ in a child, then ask whether Ray was started: --help must return before
    probe = (f"import runpy, sys; sys.argv = [{str(script)!r}, 'train.epochs=3', '--help', 'run_dir=/nonexistent']\n"
             f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "ray = sys.modules.get('ray')\n"
             "print('RAY_STARTED' if ray is not None and ray.is_initialized() else 'RAY_NOT_STARTED', code)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[-1] == "RAY_NOT_STARTED 0"
    for example in examples:
        assert example in proc.stdout
    assert any(line.startswith("  train.epochs (int, default ") for line in out)


def test_a_misspelt_key_is_refused_in_one_line_with_the_nearest_key(capsys):
    assert run_job(TrainJobConfig, _never_called, argv=["train.epoch=3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert "train.epoch" in err[0] and "did you mean train.epochs" in err[0]
    assert "Traceback" not in captured.err


def _one_line_error(capsys, config_cls, fn, argv):
    assert run_job(config_cls, fn, argv=argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    return err[0]


@pytest.mark.parametrize("made", ["nothing", "empty_dir"])
def test_a_missing_index_names_the_build_command(tmp_path, capsys, made):
    from reidscale.index.gallery import Gallery, GalleryError
    from reidscale.index.search import SearchJobConfig, run_search

    index_dir = tmp_path / "index"
    if made == "empty_dir":  # an interrupted build: the directory, no manifest
        index_dir.mkdir()
    with pytest.raises(GalleryError, match=r"python jobs/build_index\.py"):
        Gallery(index_dir)
    np.save(tmp_path / "q.npy", np.ones((2, 8), np.float32))
    line = _one_line_error(capsys, SearchJobConfig, run_search,
                           [f"index_dir={index_dir}", f"vectors={tmp_path / 'q.npy'}"])
    assert str(index_dir) in line and "python jobs/build_index.py" in line


def test_a_directory_that_is_not_an_exported_model_names_the_training_command(tmp_path, capsys):
    from reidscale.evaluate.job import EvalJobConfig, evaluate_model
    from reidscale.index.job import IndexJobConfig, build_gallery_index
    from reidscale.models import exported
    from reidscale.models.reid import load_embedding_model

    not_a_model = tmp_path / "models" / "trained"
    not_a_model.mkdir(parents=True)
    for call in (exported.read_export_config, load_embedding_model):
        with pytest.raises(FileNotFoundError, match=r"python jobs/train_clipreid\.py .*models/trained, models/best"):
            call(not_a_model)
    for config_cls, fn in ((IndexJobConfig, build_gallery_index), (EvalJobConfig, evaluate_model)):
        line = _one_line_error(capsys, config_cls, fn, [f"run_dir={tmp_path}", f"model_dir={not_a_model}"])
        assert str(not_a_model) in line and "python jobs/train_clipreid.py" in line


FAISS_JOB = """
import dataclasses, logging, sys
from reidscale.cli import run_job

@dataclasses.dataclass
class Probe:
    n: int = 1

def job(cfg):
    import faiss  # its loader logs as the library loads
    logging.getLogger("reidscale.probe").info("OUR LINE %d", faiss.get_num_gpus() + cfg.n)
    logging.getLogger("faiss.loader").warning("FAISS WARNING")
    return {}

if sys.argv[1] == "job":
    sys.exit(run_job(Probe, job, argv=[], print_summary=False))
logging.basicConfig(level=logging.INFO, format="%(message)s")  # what a job did before
import faiss
"""


def test_a_job_shows_its_own_lines_and_faiss_warnings_but_not_faiss_loader_chatter(tmp_path):
    script = tmp_path / "faiss_job.py"
    script.write_text(FAISS_JOB)

    def stderr(mode: str) -> str:
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    # the premise: with the root logger at INFO, faiss's loader prints its lines
    assert "Loading faiss" in stderr("plain")
    out = stderr("job")
    assert "OUR LINE 1" in out and "FAISS WARNING" in out, out
    assert "Loading faiss" not in out and "Could not load library" not in out, out
