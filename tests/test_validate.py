"""`modelplane validate`: passes the four examples, fails broken models with messages a data scientist can act on."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from control import validate
from conftest import FIXTURES, MODELS, ROOT, requires_r

BROKEN = FIXTURES / "validate"


def run_validate(*dirs, timeout: float = 60.0) -> tuple[int, str]:
    out = io.StringIO()
    code = validate.run([str(d) for d in dirs], timeout=timeout, stream=out)
    return code, out.getvalue()


@pytest.mark.parametrize("name", [
    "donor-propensity",
    "churn-risk",
    pytest.param("major-gift", marks=requires_r),
    pytest.param("member-retention", marks=requires_r),
])
def test_example_model_is_valid(name):
    code, out = run_validate(MODELS / name)
    assert code == 0, out
    assert "✗" not in out
    assert f"manifest: {name} " in out
    if name in ("donor-propensity", "major-gift"):
        assert "POST /predict (sample.csv as CSV): 20 rows → 20 finite scores" in out
        assert f"POST /v2/models/{name}/infer (Open Inference Protocol): 20 finite scores" in out
        assert "✓ stopped the adapter and the model" in out
    else:
        assert "batch run on sample.csv: status succeeded, 20 rows" in out
        assert "scores.csv: a header and 20 finite scores" in out
    assert out.rstrip().splitlines()[-1].startswith("✓ 1 model(s) valid")


def test_invalid_manifest_names_file_line_and_field():
    code, out = run_validate(BROKEN / "bad-manifest")
    assert code == 1
    assert "✗ manifest (1 problem(s))" in out
    assert f"{BROKEN / 'bad-manifest' / 'model.yaml'}:7: features[0].type:" in out
    assert "got 'float'" in out
    assert "started" not in out      # nothing is run for a manifest that cannot be used


def test_missing_folder_says_a_manifest_is_needed(tmp_path):
    code, out = run_validate(tmp_path / "nowhere")
    assert code == 1
    assert "no model.yaml here" in out


def test_model_crashing_at_start_shows_its_stderr():
    code, out = run_validate(BROKEN / "crash-at-start")
    assert code == 1
    assert "✗ failed to start: the model exited" in out
    assert "coefficients.json is missing (did you commit it?)" in out
    assert "POST /predict" not in out


def test_model_never_healthy_is_bounded_and_stopped(tmp_path, monkeypatch):
    pidfile = tmp_path / "model.pid"
    monkeypatch.setenv("VALIDATE_FIXTURE_PIDFILE", str(pidfile))
    monkeypatch.setenv("MODELPLANE_MODEL_ENV", "VALIDATE_FIXTURE_PIDFILE")   # models get nothing else of ours
    monkeypatch.setenv("MODELPLANE_SANDBOX", "off")   # the model writes its pid where the test reads it
    code, out = run_validate(BROKEN / "never-healthy", timeout=2)
    assert code == 1
    assert "✗ never became healthy within 2 s" in out
    assert "answered 503" in out
    assert "✓ stopped the adapter and the model" in out
    model_pid = int(pidfile.read_text())
    assert not validate._alive(model_pid), "validate left the model process running"


def test_wrong_number_of_scores_is_reported():
    code, out = run_validate(BROKEN / "wrong-count")
    assert code == 1
    assert "✓ started; ready" in out
    assert "✗ POST /predict (sample.csv as CSV)" in out
    assert "answered 1 score(s) for 3 row(s)" in out
    assert "✗ POST /v2/models/wrong-count/infer" in out


def test_batch_model_with_wrong_number_of_scores_is_reported():
    code, out = run_validate(BROKEN / "batch-wrong-count")
    assert code == 1
    assert "✗ batch run failed" in out
    assert "wrote 2 score(s) for 3 input row(s)" in out


def test_one_failure_fails_the_run_and_names_the_folder():
    code, out = run_validate(MODELS / "donor-propensity", BROKEN / "bad-manifest")
    assert code == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("✗ 1 of 2 model(s) failed:")
    assert str(BROKEN / "bad-manifest") in last


def test_a_folder_of_models_expands_to_each_model():
    assert validate.model_dirs([BROKEN]) == sorted(p for p in BROKEN.iterdir() if (p / "model.yaml").exists())
    assert validate.model_dirs([MODELS / "churn-risk"]) == [MODELS / "churn-risk"]


def test_module_entry_point_exit_status():
    proc = subprocess.run([sys.executable, "-m", "control.validate", str(BROKEN / "bad-manifest")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                          timeout=60)
    assert proc.returncode == 1
    assert "features[0].type" in proc.stdout


def test_shell_glob_of_models_checks_only_model_folders(tmp_path):
    """`modelplane validate models/*` meets README.md and train.py beside the folders."""
    (tmp_path / "README.md").write_text("# not a model\n")
    (tmp_path / "train.py").write_text("print('not a model')\n")
    out = io.StringIO()
    code = validate.run([tmp_path / "README.md", tmp_path / "train.py", BROKEN / "bad-manifest"], stream=out)
    text = out.getvalue()
    assert code == 1
    assert "README.md" not in text and "train.py" not in text
    assert "1 of 1 model(s) failed" in text


def test_a_sample_without_the_passthrough_column_is_named(tmp_path):
    import shutil

    folder = tmp_path / "donor-propensity"
    shutil.copytree(MODELS / "donor-propensity", folder)
    with open(folder / "model.yaml", "a") as f:
        f.write("passthrough: [contact_id]\n")
    code, out = run_validate(folder)
    assert code == 1
    assert "required passthrough column 'contact_id' is missing" in out
    assert "started" not in out


def test_the_passthrough_columns_come_back_in_every_answer(tmp_path):
    """A realtime example with an id column: validate checks the ids come back beside the scores
    (JSON and v2), and a batch one's scores.csv starts with them."""
    import shutil

    folder = tmp_path / "donor-propensity"
    shutil.copytree(MODELS / "donor-propensity", folder)
    with open(folder / "model.yaml", "a") as f:
        f.write("passthrough: [{name: contact_id, type: integer}]\n")
    lines = (folder / "sample.csv").read_text().splitlines()
    (folder / "sample.csv").write_text("\n".join([f"contact_id,{lines[0]}"] + [f"{i},{line}" for i, line in
                                                                               enumerate(lines[1:], 1)]) + "\n")
    code, out = run_validate(folder)
    assert code == 0, out
    assert "POST /v2/models/donor-propensity/infer (Open Inference Protocol): 20 finite scores" in out
    folder = tmp_path / "churn-risk"
    shutil.copytree(MODELS / "churn-risk", folder)
    with open(folder / "model.yaml", "a") as f:
        f.write("passthrough: [customer]\n")
    lines = (folder / "sample.csv").read_text().splitlines()
    (folder / "sample.csv").write_text("\n".join([f"customer,{lines[0]}"] + [f"c{i},{line}" for i, line in
                                                                             enumerate(lines[1:], 1)]) + "\n")
    code, out = run_validate(folder)
    assert code == 0, out
    assert "scores.csv: a header and 20 finite scores" in out
