"""launch/compare.py end to end on the shipped pretrained tiny GPT-2 (2 steps, tiny batches), and
its option handling: sweeps, bad methods, method args, the plot with and without matplotlib."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tram_dist import compare as C
from tram_dist.data.pretrained import PRETRAINED_TINY

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "compare.py"
spec = importlib.util.spec_from_file_location("compare_script", SCRIPT)
compare_script = importlib.util.module_from_spec(spec)
sys.modules["compare_script"] = compare_script
spec.loader.exec_module(compare_script)

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """adamw and tram-theta-prev on 2 seeds (2 steps of 2 blocks of 32 tokens, evaluated at steps
    1 and 2 on 2 domains, with the Table 5 analysis), 2 at a time; tram-x fails (--sigma 0 is
    refused for tram-x only)."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    cmd = [sys.executable, str(SCRIPT), "--methods", "adamw,tram-theta-prev,tram-x", "--seeds", "2",
           "--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-interval", "1",
           "--jobs", "2", "--analysis", "--output-dir", str(out), "--", "--sigma", "0", "--eval-domains", "math",
           "art", "--eval-batch-size", "32", "--cache-dir", str(out.parent / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    return out, proc


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_compare_writes_table_and_reports_failed_runs(compared):
    out, proc = compared
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # tram-x failed
    text = proc.stdout
    # one progress line per run, the failed ones with their log tail, then the table
    assert sum(line.startswith("[") and "/6] " in line for line in text.splitlines()) == 6
    assert text.count("FAILED (exit 2)") == 2 and "must be > 0 for tram-x" in text
    assert "| adamw |" in text and "2 of 6 runs failed" in text
    for name in ("adamw-seed0", "adamw-seed1", "tram-theta-prev-seed0", "tram-theta-prev-seed1"):
        assert (out / "runs" / name / "eval.json").is_file()
        assert (out / "logs" / f"{name}.log").is_file() and (out / "logs" / f"{name}.json").is_file()

    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    for col in ("math", "art", "ZS Avg.", "wall (s)", "step time / AdamW",
                "peak mem (MiB)", "radius", "applied ‖ε‖", "L(θ+ε) − L(θ)", "ε-sharpness %", "CKA to start"):
        assert col in header, col
    assert "| tram-x (2 failed) |" in md and "Failed runs (2)" in md
    assert "| tram-theta-prev | 2 |" in md  # the paired-test table

    rep = json.loads((out / "compare.json").read_text())
    assert sorted(rep["failed"]) == ["tram-x-seed0", "tram-x-seed1"]
    assert "must be > 0" in next(r for r in rep["runs"] if r["name"] == "tram-x-seed0")["log_tail"]
    agg = rep["aggregate"]
    assert agg["train_domain"] == "math" and agg["zs_domains"] == ["art"]
    rows = {r["name"]: r for r in agg["rows"]}
    assert list(rows) == ["adamw", "tram-theta-prev", "tram-x"]
    for name in ("adamw", "tram-theta-prev"):
        c = rows[name]["cells"]
        assert rows[name]["seeds"] == [0, 1]
        for key in ("in_domain_ppl", "zs_avg", "wall_s", "step_time_s", "peak_mem_mb", "sharpness", "cka"):
            assert c[key]["n"] == 2 and _finite(c[key]["mean"]) and _finite(c[key]["std"]), (name, key)
        for dom in ("math", "art"):
            assert _finite(c["domains"][dom]["mean"])
        assert c["zs_avg"]["values"] == pytest.approx(c["domains"]["art"]["values"])  # one ZS domain
    assert rows["adamw"]["step_time_ratio"] == pytest.approx(1.0)
    assert _finite(rows["tram-theta-prev"]["step_time_ratio"])
    assert rows["adamw"]["cells"]["radius"]["mean"] is None  # no ascent
    tram = rows["tram-theta-prev"]["cells"]
    for key in ("radius", "eps_applied", "loss_increase", "divergence"):
        assert _finite(tram[key]["mean"]), key
    assert tram["radius"]["mean"] >= 1e-5  # d + nu
    assert rows["adamw"]["paired_vs_adamw"] is None
    for key in ("zs_avg", "in_domain_ppl"):
        t = rows["tram-theta-prev"]["paired_vs_adamw"][key]
        assert t["n"] == 2 and t["df"] == 1 and t["seeds"] == [0, 1]
        assert _finite(t["mean_diff"]) and 0.0 <= t["p"] <= 1.0
    assert rows["tram-x"]["failed_seeds"] == [0, 1] and rows["tram-x"]["cells"]["zs_avg"]["mean"] is None
    assert rows["tram-x"]["paired_vs_adamw"]["zs_avg"]["p"] is None
    # per-eval-point curves (--eval-interval 1: steps 1 and 2)
    evals = C.load_run(out / "runs" / "adamw-seed0")["evals"]
    assert [e["step"] for e in evals] == [1, 2]

    if HAVE_MPL:
        assert (out / "compare.png").stat().st_size > 1000
    else:
        assert "pip install matplotlib" in text and not (out / "compare.png").exists()


def test_resume_existing_skips_finished_runs(compared):
    out, _ = compared
    before = (out / "runs" / "adamw-seed0" / "metrics.jsonl").read_bytes()
    cmd = [sys.executable, str(SCRIPT), "--methods", "adamw,tram-theta-prev", "--seeds", "2",
           "--max-steps", "2", "--output-dir", str(out), "--resume-existing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("exists, skipped") == 4
    assert (out / "runs" / "adamw-seed0" / "metrics.jsonl").read_bytes() == before
    rep = json.loads((out / "compare.json").read_text())
    assert rep["failed"] == [] and [r["name"] for r in rep["aggregate"]["rows"]] == ["adamw", "tram-theta-prev"]


def test_plot_without_matplotlib_says_how(compared, monkeypatch, tmp_path):
    out, _ = compared
    rep = json.loads((out / "compare.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    said = []
    assert C.write_plot(rep, tmp_path / "compare.png", log=said.append) is False
    assert len(said) == 1 and "pip install matplotlib" in said[0]
    assert not (tmp_path / "compare.png").exists()


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (optional)")
def test_plot_with_matplotlib(compared, tmp_path):
    out, _ = compared
    rep = json.loads((out / "compare.json").read_text())
    assert C.write_plot(rep, tmp_path / "p.png", log=lambda s: None) is True
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_row_of_table_3_has_its_own_look_in_the_plot():
    """14 rows (Table 3) and more: matplotlib's 10-colour cycle alone repeats, so rows 10+ differ
    in line style and marker."""
    looks = [tuple(sorted(C.row_style(k).items())) for k in range(40)]
    assert len(set(looks)) == 40
    assert C.row_style(0)["color"] == C.row_style(10)["color"] and C.row_style(0) != C.row_style(10)


# --- how a run's process starts (tram_dist.run.processes) -------------------------------------
# A stand-in launcher: what a run's process sees (argv, environment, intra-op threads), in its log.
FAKE_LAUNCHER = """
import os, sys, torch
print("argv", sys.argv[1:])
print("threads", torch.get_num_threads(), "marker", os.environ.get("TRAM_TEST_MARKER"))
sys.exit(3)
"""


@pytest.mark.parametrize("start", ["subprocess", "forkserver"])
def test_a_run_gets_its_argv_environment_threads_and_log(tmp_path, start):
    """Both ways of starting a run (fresh interpreter; forked from the preloaded forkserver)
    give the launcher its flags, the run's environment (OMP_NUM_THREADS applied even though
    the forkserver loaded torch with another), its log, and its exit code."""
    launcher = tmp_path / "fake_launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAM_TEST_MARKER=f"m-{start}")
    said = []
    (result,) = C.run_all(C.expand_runs(["sam"], 1), launcher=launcher, output_dir=tmp_path / "out",
                          common=["--max-steps", "2"], env=env, start=start, log=said.append)
    assert result.status == "failed" and result.returncode == 3, said
    log = result.log_path.read_text()
    assert log.startswith(f"$ {sys.executable} {launcher} --method sam --seed 0"), log
    assert "'--method', 'sam', '--seed', '0', '--output-dir'" in log and "'--max-steps', '2'" in log
    assert f"threads 1 marker m-{start}" in log, log
    assert said[0].startswith("[1/1] sam-seed0: FAILED (exit 3)")


def test_forked_runs_do_not_rerun_the_callers_script(tmp_path):
    """multiprocessing re-runs the caller's __main__ in each child unless told otherwise; a
    script that calls run_all without a __main__ guard must still start each run once."""
    launcher = tmp_path / "fake_launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    script = tmp_path / "no_guard.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom tram_dist import compare as C\n"
        f"res = C.run_all(C.expand_runs(['adamw'], 2), launcher={str(launcher)!r}, "
        f"output_dir={str(tmp_path / 'out')!r}, start='forkserver')\n"
        "print('exit codes', [r.returncode for r in res])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit codes [3, 3]" in proc.stdout and proc.stdout.count("/2] adamw-seed") == 2, proc.stdout
    assert "bootstrapping phase" not in proc.stderr


def test_runs_start_fresh_interpreters_where_cuda_is_visible(monkeypatch):
    from tram_dist.run import processes

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert processes.default_start() == "subprocess"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert processes.default_start() == "forkserver"
    with pytest.raises(ValueError, match="start must be one of auto, forkserver, subprocess"):
        processes.start_launcher(["python", "x.py"], None, {}, start="thread")


# --- options, no runs ------------------------------------------------------------------------
def _main(capsys, *argv):
    rc = compare_script.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_bad_methods_is_one_error_line(capsys, tmp_path):
    rc, out, err = _main(capsys, "--methods", "adamw,tram-bogus", "--output-dir", str(tmp_path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --methods: unknown method 'tram-bogus'")
    assert "tram-theta-prev" in err  # the choices
    assert not (tmp_path / "runs").exists()


def test_sweep_nobody_takes_is_one_error_line(capsys, tmp_path):
    rc, out, err = _main(capsys, "--methods", "adamw,sam", "--sweep", "radius_scale=1,100",
                         "--output-dir", str(tmp_path))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: --sweep radius_scale: none of the methods adamw, sam takes radius_scale")
    rc, _, err = _main(capsys, "--methods", "adamw", "--sweep", "lr=1,2", "--output-dir", str(tmp_path))
    assert rc == 2 and err.startswith("error: --sweep lr: not a method option") and err.count("\n") == 1
    rc, _, err = _main(capsys, "--methods", "adamw", "--sweep", "rho", "--output-dir", str(tmp_path))
    assert rc == 2 and "must be NAME=v1,v2" in err


def test_method_arg_rejected_by_a_method_is_one_error_line(capsys, tmp_path):
    rc, _, err = _main(capsys, "--methods", "adamw,tram-x", "--method-arg", "radius_scale=100",
                       "--output-dir", str(tmp_path))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: --method-arg radius_scale=100: adamw rejects it") and "--sweep" in err


def test_sweep_expansion():
    rho = C.parse_sweep("rho=0.01,0.1", ("rho", "radius_scale", "sigma"))
    specs = C.expand_runs(["adamw", "sam", "tram-x"], 2, [rho])
    # adamw and tram-x accept rho silently but it changes nothing: they run once per seed
    assert [s.name for s in specs] == ["adamw-seed0", "adamw-seed1", "sam-rho0.01-seed0",
                                       "sam-rho0.01-seed1", "sam-rho0.1-seed0", "sam-rho0.1-seed1",
                                       "tram-x-seed0", "tram-x-seed1"]
    assert specs[2].row == "sam rho=0.01"
    cmd = C.launcher_command(specs[2], "launch/train_m2d2.py", "/tmp/o", ["--max-steps", "2"])
    assert cmd[-2:] == ["--method-arg", "rho=0.01"] and cmd[1:3] == ["launch/train_m2d2.py", "--method"]

    # two sweeps: the product for a method that takes both; sigma goes to --sigma
    lam = C.parse_sweep("radius_scale=1e2,1e4", ("rho", "radius_scale", "sigma"))
    sig = C.parse_sweep("sigma=1e-5,1e-3", ("rho", "radius_scale", "sigma"))
    specs = C.expand_runs(["sam", "tram-x", "tram-theta-prev"], 1, [lam, sig])
    names = [s.name for s in specs]
    assert names == ["sam-seed0",
                     "tram-x-radius_scale100.0-sigma1.0e-05-seed0", "tram-x-radius_scale100.0-sigma0.001-seed0",
                     "tram-x-radius_scale10000.0-sigma1.0e-05-seed0", "tram-x-radius_scale10000.0-sigma0.001-seed0",
                     "tram-theta-prev-radius_scale100.0-seed0", "tram-theta-prev-radius_scale10000.0-seed0"]
    cmd = C.launcher_command(specs[1], "l.py", "/tmp/o")
    assert cmd[-4:] == ["--method-arg", "radius_scale=100.0", "--sigma", "1.0e-05"]

    with pytest.raises(C.CompareError, match=r"--sweep rho=-1: sam rejects it"):
        C.expand_runs(["sam"], 1, [C.parse_sweep("rho=0.1,-1", ("rho",))])
    with pytest.raises(C.CompareError, match="none of the methods adamw takes radius_scale"):
        C.expand_runs(["adamw"], 1, [lam])
    with pytest.raises(C.CompareError, match="lists a value twice"):
        C.parse_sweep("rho=0.1,1e-1", ("rho",))


def test_sweep_values_survive_the_launchers_yaml():
    for text in ("1e2", "1e-5", "0.05", "3", "1.5e+20", "normal", "true"):
        value = C.parse_value(text)
        assert yaml.safe_load(C.format_value(value)) == value, text
    assert C.format_value(C.parse_value("1e-5")) == "1.0e-05"


def test_the_default_comparison_is_every_trained_row_of_table_3():
    """Issue 10: the main command covers the full Table 3 (its 14 trained rows, in its order)."""
    table3 = ["adamw", "sam", "asam", "fsam", "trpo", "r3f", "mesa", "asam+trpo", "asam+r3f", "asam+mesa",
              "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher"]
    assert C.parse_methods(compare_script.DEFAULT_METHODS, compare_script.METHODS) == table3
    assert compare_script.DEFAULT_SEEDS == 3


def test_default_model_is_the_shipped_pretrained_folder():
    args = compare_script.build_parser().parse_args([])
    assert Path(args.model) == PRETRAINED_TINY and PRETRAINED_TINY.is_dir()
    assert set(C.parse_methods(args.methods, compare_script.METHODS)) >= {
        "adamw", "sam", "asam", "tram-theta-prev", "tram-x", "tram-theta0"}


def test_a_preset_gives_the_runs_its_own_settings(tmp_path, monkeypatch):
    """--config: the flags compare passes to every run are the preset's, not the tiny defaults."""
    preset = ROOT / "configs" / "gpt2_s2orc_math.yaml"
    seen = {}

    def fake_compare(methods, **kw):
        seen.update(kw)
        return {"failed": []}

    monkeypatch.setattr(compare_script, "compare", fake_compare)
    assert compare_script.main(["--config", str(preset), "--methods", "adamw", "--max-steps", "7"]) == 0
    common = seen["common"]
    flags = dict(zip(common[::2], common[1::2]))
    assert flags["--config"] == str(preset) and flags["--model"] == "gpt2"
    assert (flags["--train-domain"], flags["--lr"], flags["--batch-size"], flags["--block-size"]) == (
        "math_l1", "2e-05", "16", "1024")
    assert flags["--max-steps"] == "7" and flags["--eval-interval"] == "5000"  # a flag beats the preset
