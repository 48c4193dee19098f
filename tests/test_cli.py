"""Bad input at the command line: one clear error line, non-zero exit, no traceback."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # papermill runs and subprocesses: `make test-fast` leaves this file out


def qlib(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qlib", *args], capture_output=True, text=True,
                          env=env)


def _one_clear_line(r, needle):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlab: error:") and needle in lines[0], r.stderr


def test_unknown_profile():
    _one_clear_line(qlib("run", "--profile", "turbo"), "unknown profile 'turbo'")


def test_unknown_notebook():
    _one_clear_line(qlib("run", "99_nothing", "--profile", "smoke"), "unknown notebook '99_nothing'")


def test_gpu_profile_on_a_cpu_machine_is_one_line():
    _one_clear_line(qlib("run", "--profile", "gpu"), "the gpu profile measures a CUDA GPU")


def test_gpu_profile_covers_only_the_random_init_studies():
    _one_clear_line(qlib("run", "02", "06", "--profile", "gpu", "-p", "device", "cpu"),
                    "no gpu profile for 02_ptq, 06_switchable_precision")
    from qlib.cli import notebooks
    from qlib.config import GPU_STUDIES
    from qlib.core.errors import QlabError
    from qlib.studies import ptq

    assert [nb.stem[:2] for nb in notebooks(list(GPU_STUDIES))] == ["01", "04", "05", "07"]
    with pytest.raises(QlabError, match=r"ptq.Config has no 'gpu' profile.*01, 04, 05, 07"):
        ptq.config("gpu")


def test_missing_and_corrupt_checkpoint(tmp_path):
    _one_clear_line(qlib("inspect", str(tmp_path / "gone")), "checkpoint folder not found")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    _one_clear_line(qlib("inspect", str(tmp_path)), "corrupt weights")


def test_unknown_model_id_offline(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from qlib.cli import main; from qlib import assets\n"
                        "from qlib.config import QlabError\n"
                        "try:\n assets.resolve_model('encoder', 'no-org/no-model')\n"
                        "except QlabError as e:\n print(e); sys.exit(2)"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "'no-org/no-model'" in r.stdout and "offline" in r.stdout


def test_assets_lists_registry():
    r = qlib("assets")
    assert r.returncode == 0
    assert "minilm" in r.stdout and "mr-polarity" in r.stdout and "bert-base-uncased" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["01", "-p", "model_id", "no-org/no-model"], "'no-org/no-model' is not in the local Hugging Face cache"),
    (["05", "-p", "ladder_model_id", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
    (["06", "-p", "block_model_id", "no-org/no-model"], "role 'llama-arch'"),
    (["01", "04", "-p", "dataset_id", "no-org/no-data"], "no-org/no-data"),
    (["05", "-p", "dataset_id", "/nonexistent/data"], "dataset folder not found: /nonexistent/data"),
])
def test_unknown_model_and_dataset_ids_are_refused_before_papermill_starts(tmp_path, args, needle):
    """Resolved before any notebook runs: one line naming the id, nothing executed or written."""
    r = qlib("run", *args, "--profile", "smoke", env=_root_with_notebooks(tmp_path))
    _one_clear_line(r, needle)
    assert "[qlab] running" not in r.stdout and not (tmp_path / "results").exists()


def test_a_failing_notebook_does_not_stop_the_others(tmp_path):
    data = tmp_path / "data"  # resolves (a folder), then fails inside both notebooks: it has no label column
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text('{"sentence": "a"}\n' * 4)
    r = qlib("run", "01", "04", "--profile", "smoke", "-p", "dataset_id", str(data), env=_root_with_notebooks(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("[qlab] failed:")]
    assert len(failed) == 2 and "01_baseline.ipynb" in failed[0] and "04_qlora_bert.ipynb" in failed[1]
    assert r.stderr.strip().splitlines()[-1] == (
        "qlab: error: 2 of 2 notebooks failed: 01_baseline, 04_qlora_bert (errors above)")


def _root_with_notebooks(tmp_path):
    """An empty results/outputs root that sees the repository's notebooks."""
    import os
    from pathlib import Path

    (tmp_path / "notebooks").symlink_to(Path(__file__).resolve().parent.parent / "notebooks")
    return {**os.environ, "QLAB_ROOT": str(tmp_path)}


def test_a_cuda_request_without_cuda_is_refused_before_any_notebook_runs(tmp_path):
    r = qlib("run", "01", "07", "--profile", "smoke", "-p", "device", "cuda", env=_root_with_notebooks(tmp_path))
    _one_clear_line(r, "device 'cuda' was asked for but no CUDA GPU is visible")
    assert "[qlab] running" not in r.stdout and not (tmp_path / "results").exists()


@pytest.mark.parametrize("args, needle", [
    (["01", "-p", "epoch", "3"], "unknown parameter(s) for 01_baseline: epoch; valid: seed, model_id"),
    (["01", "02", "-p", "epochs", "3"], "unknown parameter(s) for 02_ptq: epochs"),
    (["01", "-p", "epochs", "-1"], "parameter epochs must be greater than 0, got -1"),
    (["01", "-p", "lr", "abc"], "parameter lr must be a finite number, got 'abc'"),
    (["01", "-p", "batch_size", "0"], "parameter batch_size must be at least 1, got 0"),
    (["06", "-p", "budget", "-1"], "parameter budget must be between 0 and 1, got -1"),
    (["04", "-p", "ranks", "8,x"], "parameter ranks must be a list of integers, got '8,x'"),
    (["06", "-p", "widths", "2,3"], "unsupported bit width 3"),
    (["01", "-p", "profile", "default"], "profile is not a -p parameter: pass it as --profile"),
    (["01", "-p", "device", "tpu"], "unknown device 'tpu': use auto, cpu or cuda[:N]"),
    (["01", "-p", "seed", "-1"], "parameter seed must be at least 0, got -1"),
    (["01", "-p", "seed", "5000000000"], "parameter seed must be below 2**32"),
])
def test_bad_parameters_are_refused_before_anything_runs(tmp_path, args, needle):
    _one_clear_line(qlib("run", *args, "--profile", "smoke", env=_root_with_notebooks(tmp_path)), needle)
    assert not (tmp_path / "results").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("budget", ["-1", "nan", "1.5"])
def test_search_budget_outside_0_1_is_refused(budget):
    _one_clear_line(qlib("search", "--profile", "smoke", "--budget", budget), "parameter budget must be")


@pytest.mark.parametrize("args, needle", [
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["formats", "smollm2-135m", "--eval-tokens", "abc"], "argument --eval-tokens: invalid int value: 'abc'"),
    (["formats", "smollm2-135m", "--device", "tpu"], "unknown device 'tpu'"),
    (["formats", "smollm2-135m", "--seed", "-1"], "formats: seed must be in [0, 2**32), got -1"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_mistakes_are_one_qlab_line(args, needle):
    _one_clear_line(qlib(*args), needle)


def test_a_file_where_results_go_is_one_line_before_anything_runs(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "smoke").write_text("a user's notes")
    _one_clear_line(qlib("run", "07", "--profile", "smoke", env=_root_with_notebooks(tmp_path)),
                    "results/smoke is a file; move it away")
    assert (tmp_path / "results" / "smoke").read_text() == "a user's notes"


def test_report_with_a_folder_where_the_summary_goes_is_one_line(tmp_path):
    import shutil
    from pathlib import Path

    kept = Path(__file__).resolve().parent.parent / "results" / "07_llama_scaling" / "metrics.json"
    (tmp_path / "results" / "07_llama_scaling").mkdir(parents=True)
    shutil.copy(kept, tmp_path / "results" / "07_llama_scaling")
    (tmp_path / "results" / "summary.md").mkdir()
    _one_clear_line(qlib("report", env=_root_with_notebooks(tmp_path)),
                    "summary.md: a folder of that name is in the way")
    assert (tmp_path / "results" / "summary.md").is_dir()


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_mid_notebook_is_one_line_and_leaves_no_staging(tmp_path, sig, code, word):
    import signal
    import time

    env = _root_with_notebooks(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "qlib", "run", "02", "--profile", "smoke"], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal has it
    staged = tmp_path / "results" / "smoke" / ".02_ptq.staging"
    deadline = time.time() + 120
    while not staged.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert staged.exists(), "the notebook never reached its staged run"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"qlab: {word}; nothing half-written was kept"
    left = [str(x.relative_to(tmp_path)) for x in tmp_path.rglob(".*") if x.name != "notebooks"]
    assert left == [] and not (tmp_path / "results" / "smoke" / "02_ptq").exists()


def test_an_executed_notebook_is_tidied_into_a_report(tmp_path):
    """Progress-bar refreshes become the bar's last state, consecutive streams one output, this machine's paths
    relative (the Python environment's too, where it lies outside the repository); other outputs and the order of
    streams around them are kept."""
    from qlib.core.notebook import tidy

    root = tmp_path / "repo"
    bar = [{"output_type": "stream", "name": "stderr", "text": f"\r{i}/3 |{'#' * i}" + ("\n" if i == 3 else "")}
           for i in range(4)]
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": [f"wrote {root}/results/x.json\n"]}, *bar,
        {"output_type": "display_data", "data": {"text/plain": "fig"}},
        {"output_type": "stream", "name": "stderr", "text": "\x1b[Adone\n"}]},
        {"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stderr",
                                           "text": f"{sys.prefix}/lib/site-packages/x.py:3: FutureWarning\n"}]}]}
    tidied = tidy(nb, root)["cells"]
    outs = tidied[0]["outputs"]
    assert [o["output_type"] for o in outs] == ["stream", "stream", "display_data", "stream"]
    assert outs[0]["text"] == "wrote ./results/x.json\n"
    assert outs[1]["text"] == "3/3 |###\n" and outs[3]["text"] == "done\n"
    assert tidied[1]["outputs"][0]["text"] == "<env>/lib/site-packages/x.py:3: FutureWarning\n"


def test_library_noise_is_dropped_by_name_and_the_rest_still_shows(caplog):
    """torchao's missing-CUDA-kernel lines go; another torchao warning, and the same text from another logger, stay."""
    import logging
    import warnings

    from qlib.core.quiet import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # idempotent
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so")
        logging.getLogger("torchao").warning("something real")
        logging.getLogger("mine").warning("Failed to load my file")
    assert [r.getMessage() for r in caplog.records] == ["something real", "Failed to load my file"]
    assert len(logging.getLogger("torchao").filters) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("Attempting to save a model with offloaded modules. Ensure …")
        warnings.warn("a warning of our own")
    assert [str(w.message) for w in seen] == ["a warning of our own"]


@pytest.mark.parametrize("headless", ["1", ""])
def test_headless_runs_get_text_bars(headless):
    """Under papermill or nbval (QLAB_HEADLESS=1) tqdm.auto is the text bar even where it had chosen widgets (a
    stand-in for the notebook class here); in JupyterLab it is left to choose."""
    code = ("import tqdm.auto, tqdm.std; tqdm.auto.tqdm = 'the widget bar'; import qlib; "
            "print(tqdm.auto.tqdm is tqdm.std.tqdm)")
    env = {**os.environ, "QLAB_HEADLESS": headless}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(headless == "1")


@pytest.mark.parametrize("headless", ["1", ""])
def test_headless_runs_do_not_print_tqdms_ipywidgets_warning(headless):
    """A kernel without ipywidgets (a stand-in: ipykernel's shell module present) makes tqdm.auto warn "IProgress not
    found" at import; headless, where text bars are the plan, qlib leaves it unsaid; live, the hint still shows."""
    pytest.importorskip("IPython")
    if importlib.util.find_spec("ipywidgets"):
        pytest.skip("ipywidgets is installed: tqdm has nothing to warn about")
    code = ("import IPython, sys, types, warnings; sys.modules['ipykernel.zmqshell'] = types.ModuleType('zmqshell'); "
            "warnings.simplefilter('always'); import qlib, tqdm.auto")
    env = {**os.environ, "QLAB_HEADLESS": headless}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert ("IProgress not found" in err) == (headless != "1"), err
