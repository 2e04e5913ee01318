"""shardrun report: plots that open as images, a page that shows them, restarts, numbers, user errors."""

import json
import math
import sys

import pytest
from helpers import tiny_spec
from PIL import Image

from shardrun import config
from shardrun.errors import UserError
from shardrun.report import draw, format_summary, main, read_run, report


def _rec(t, step, loss, tokens_per_s, grad_norm=0.5):
    return {"time": t, "step": step, "samples": step * 8, "tokens": step * 256, "loss": loss, "lr": 1e-3,
            "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / 32, "step_time": 0.25,
            "data_wait_fraction": 0.05, "grad_norm": grad_norm, "mfu": None}


# Steps 10-30, then the group restarts from the checkpoint at step 20 and logs step 30 again.
RECORDS = [_rec(100.0, 10, 5.0, 100.0), _rec(110.0, 20, 4.0, 1000.0), _rec(120.0, 30, 3.5, 1000.0),
           _rec(150.0, 30, 3.6, 900.0), _rec(160.0, 40, 3.0, 1100.0)]


def _write_run(run_dir, records, spec=None):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if spec is not None:
        (run_dir / "job.yaml").write_text(spec.to_yaml())
    return run_dir


@pytest.fixture(scope="module")
def gpt_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    spec = config.parse(tiny_spec(tmp / "data", tmp / "runs"))  # byte-level GPT: vocab 256
    run_dir = _write_run(tmp / "runs" / "tiny", RECORDS, spec)
    (run_dir / "summary.json").write_text(json.dumps({"final_step": 40, "restarts": 1}))
    return run_dir, report(str(run_dir))


def test_pngs_open_as_images_and_the_page_shows_them(gpt_report):
    run_dir, summary = gpt_report
    out = run_dir / "report"
    assert summary["report"] == str(out / "report.html")
    assert summary["plots"] == ["loss.png", "throughput.png", "step_time.png", "data_wait.png", "lr.png",
                                "grad_norm.png"]  # no MFU: none was logged
    page = (out / "report.html").read_text()
    for name in summary["plots"]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (800, 360)
            image.verify()
        assert f'<img src="{name}"' in page
    assert "<h2>Job spec (job.yaml)</h2>" in page and "vocab_size: 256" in page
    assert "<h2>summary.json</h2>" in page


def test_summary_numbers(gpt_report):
    _, summary = gpt_report
    expected = {"run": "tiny", "records": 5, "first_step": 10, "final_step": 40, "first_loss": 5.0,
                "last_loss": 3.0, "mean_tokens_per_s": 1000.0, "restarts": 1, "restart_steps": [30],
                "logged_seconds": 60.0}
    assert {k: summary[k] for k in expected} == expected
    assert summary["first_bits_per_byte"] == pytest.approx(5.0 / math.log(2))
    assert summary["last_bits_per_byte"] == pytest.approx(3.0 / math.log(2))
    text = format_summary(summary)
    assert text.startswith("tiny: step 40 (5 records), loss 5.0000 -> 3.0000 (bits per byte 7.213 -> 4.328)")
    assert "1,000 tokens/s" in text and "1 restart (logging again from step 30)" in text
    assert "1m00s from the first record to the last" in text


def test_a_restart_replaces_the_steps_it_trains_again(tmp_path):
    # the group died after logging step 30 and resumed from step 10: its steps 20 and 30 were lost
    records = RECORDS[:3] + [_rec(150.0, 20, 4.2, 900.0), _rec(160.0, 30, 3.7, 900.0)]
    run = read_run(str(_write_run(tmp_path / "run", records)))
    assert [(r["step"], r["loss"]) for r in run.curve] == [(10, 5.0), (20, 4.2), (30, 3.7)]
    assert run.restarts == [20] and not run.byte_level and run.name == "run"


def test_table_run_behind_a_uri_plots_samples_per_s_into_a_local_folder(tmp_path, monkeypatch, capsys):
    records = [{**_rec(float(i), 5 * i, 1.0 / i, 0.0, grad_norm=None), "samples_per_s": 50.0 * i}
               for i in range(1, 4)]
    _write_run(tmp_path / "runs" / "tab", records)
    monkeypatch.chdir(tmp_path)
    assert main([f"file://{tmp_path}/runs/tab"]) == 0
    out = tmp_path / "tab-report"
    assert sorted(p.name for p in out.iterdir()) == ["data_wait.png", "loss.png", "lr.png", "report.html",
                                                     "step_time.png", "throughput.png"]
    printed = capsys.readouterr().out
    assert "125 samples/s" in printed and "tokens/s" not in printed and "bits per byte" not in printed
    assert f"report: {out / 'report.html'} (5 plots)" in printed


def test_missing_or_empty_metrics_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"nothing/metrics.jsonl does not exist \(nor does the run dir\); RUN is"):
        report(str(tmp_path / "nothing"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=r"run/metrics.jsonl has no records yet; .* every run.log_every steps"):
        report(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "report").exists()


def test_a_half_written_last_line_is_left_out_and_a_bad_line_is_named(tmp_path):
    run_dir = _write_run(tmp_path / "run", RECORDS[:2])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"time": 130.0, "step": 3')
    assert len(read_run(str(run_dir)).records) == 2
    (run_dir / "metrics.jsonl").write_text("{oops\n" + json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl, line 1: not a JSON record"):
        read_run(str(run_dir))


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    run = read_run(str(_write_run(tmp_path / "run", RECORDS)))
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UserError, match=r"pip install 'shardrun\[report\]'"):
        draw(run, tmp_path)
