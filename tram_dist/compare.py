"""Compare methods on the same data, seeds and budget: one launcher run per (method, seed[, sweep
value]), then a Table-3-style table with cost, ascent size and paired tests against AdamW.

    python launch/compare.py --methods adamw,sam,tram-theta-prev --seeds 3 --output-dir runs/cmp

`launch/compare.py` parses the flags; everything else lives here so that it can be tested and
reused: `expand_runs` (methods x sweeps x seeds), `method_takes` (does a method take a
method option), `run_all` (the launcher processes, sequential or N at a time), `load_run` /
`run_summary` (one run folder's eval.json, metrics.jsonl, evals.jsonl), `aggregate` (rows, mean
and std over seeds, paired t-tests), `format_markdown`, `write_plot`, and `mean_std` /
`paired_t_test` / `t_sf` (the statistics, no scipy needed).

Per run, from its folder `OUTPUT/runs/<method>[-<sweep>]-seed<k>/` (its output in
`OUTPUT/logs/<name>.log`):

- perplexities and ZS Avg. from eval.json (the evaluation the launcher selected by the training
  domain's validation perplexity);
- wall time: the launcher process's (start-up, data, training, evaluation, saving; on a machine
  without CUDA the runs fork from a forkserver that imported torch and transformers once, so
  their import time is not in it);
- step time: mean `step_time_s` over the steps of metrics.jsonl except the first (warm-up),
  reported as a ratio to AdamW's;
- peak memory: the largest `peak_mem_mb` (CUDA peak allocated, or on CPU the process's peak RSS);
- the ascent: mean `radius`, mean applied ||eps|| (`eps_applied`) and mean loss increase at
  theta + eps (`perturbed_loss - loss`) over the steps that report them (AdamW: none);
- the regularizers' penalty: mean KL term (`penalty`) of TRPO, R3F, MESA, where metrics.jsonl
  has it (a column only then);
- with --analysis: epsilon-sharpness and CKA to the start, averaged over the domains.

A row's cell is the mean over its seeds (± the sample standard deviation with 2 or more). Each
row is tested against AdamW (same seeds, paired): the mean difference in ZS Avg. and in-domain
perplexity and the two-sided p-value of the paired t-test (n/a with fewer than 2 pairs).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .evaluate import json_safe
from .run.processes import start_launcher

BASELINE = "adamw"
SIGMA = "sigma"  # the launcher's --sigma flag (tram-x, tram-fisher, r3f input noise), sweepable too
# Beside the run folders (the launcher refuses an --output-dir that already holds files):
# OUTPUT/logs/<name>.log is the launcher's stdout + stderr, OUTPUT/logs/<name>.json what compare
# knows about the run (command, exit code, wall time).
LOGS = "logs"
TAIL_LINES = 20


class CompareError(ValueError):
    """A bad option; printed as one line."""


def say(line: str) -> None:
    """The default progress printer: flushed, so piped output shows each run as it ends."""
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n - 1); std is None below 2 values, both None for
    none."""
    xs = [float(v) for v in values]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    return 1.0 - t_sf(t, df)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired two-sided t-test of a - b (pairs in order). Returns n, mean_diff (mean of a - b),
    std_diff, t, df and p; with fewer than 2 pairs t, df and p are None. A zero spread of the
    differences gives t = +-inf and p = 0 (or t = 0, p = 1 when every difference is 0)."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    out = {"n": n, "mean_diff": mean, "std_diff": std, "t": None, "df": None, "p": None}
    if n < 2:
        return out
    df = n - 1
    if std == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    out.update(t=t, df=df, p=min(1.0, 2.0 * t_sf(abs(t), df)))
    return out


# ---------------------------------------------------------------------------------------------
# which method takes which option; sweeps
# ---------------------------------------------------------------------------------------------
def parse_value(text: str):
    """A sweep / method-arg value: int, float (1e2 too), true/false, else the string."""
    t = text.strip()
    if re.fullmatch(r"[-+]?\d+", t):
        return int(t)
    try:
        return float(t)
    except ValueError:
        pass
    return {"true": True, "false": False}.get(t.lower(), t)


def format_value(value) -> str:
    """The value as the launcher's YAML parsing reads it back as the same type: floats always
    with a dot and a signed exponent (YAML 1.1 reads '1e-05' or '1e2' as strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        text = repr(value)
        if "e" in text:
            mant, exp = text.split("e")
            if "." not in mant:
                mant += ".0"
            if exp[0] not in "+-":
                exp = "+" + exp
            text = f"{mant}e{exp}"
        return text
    return str(value)


def _fingerprint(opt, trust_region) -> str:
    """What a built method is: its class, its defaults, its plain settings, its trust region."""
    defaults = sorted((k, repr(v)) for k, v in getattr(opt, "defaults", {}).items())
    attrs = sorted((k, repr(v)) for k, v in vars(opt).items()
                   if not k.startswith("_") and isinstance(v, (str, int, float, bool)))
    if trust_region is None:
        tr = "None"
    elif hasattr(trust_region, "__dict__"):
        tr = repr(sorted((k, repr(v)) for k, v in vars(trust_region).items()))
    else:
        tr = repr(trust_region)
    text = repr((type(opt).__name__, defaults, attrs, type(trust_region).__name__, tr))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _build(method: str, **kwargs):
    import torch

    from .methods import build_method

    return build_method(method, [torch.nn.Parameter(torch.zeros(1))], lr=1e-3, **kwargs)


def _probe(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value * 0.5 if value else 0.5


def method_takes(method: str, name: str, values: Sequence) -> tuple[bool, dict]:
    """Whether `method` takes the option `name`, and {value: error} for the values it rejects.

    A method takes `name` when build_method accepts it (a ValueError means it does not) AND the
    value changes what is built (build_method ignores some options silently, e.g. adamw's rho).
    `divergence` is TrainStep's, not build_method's: taken by the methods that measure a d."""
    if name == "divergence":
        opt, _ = _build(method)
        takes = bool(getattr(opt, "needs_divergence", False))
        bad = {}
        if takes:
            from .divergence import get_divergence

            for v in values:
                try:
                    get_divergence(v)
                except (ValueError, TypeError, KeyError) as e:
                    bad[v] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return takes, bad
    prints, bad = set(), {}
    try:
        prints.add(_fingerprint(*_build(method)))
    except (ValueError, TypeError):
        pass
    accepted = []
    for v in list(values) + [p for p in map(_probe, values) if p is not None]:
        try:
            prints.add(_fingerprint(*_build(method, **{name: v})))
            accepted.append(v)
        except TypeError:
            return False, {}  # not an option of build_method at all
        except ValueError as e:
            bad[v] = str(e).splitlines()[0] if str(e) else "rejected"
    takes = bool(accepted) and len(prints) > 1
    return takes, ({v: e for v, e in bad.items() if v in values} if takes else {})


@dataclass(frozen=True)
class Sweep:
    name: str
    values: tuple  # parsed values
    texts: tuple  # as passed to the launcher


def parse_sweep(spec: str, allowed: Sequence[str]) -> Sweep:
    """`NAME=v1,v2,...` -> Sweep; NAME must be a launcher method option or sigma."""
    if "=" not in spec:
        raise CompareError(f"--sweep {spec!r} must be NAME=v1,v2,... (e.g. --sweep radius_scale=1,100)")
    name, _, raw = spec.partition("=")
    name = name.strip().replace("-", "_")
    texts = [t.strip() for t in raw.split(",") if t.strip()]
    if not texts:
        raise CompareError(f"--sweep {name}= has no values; give NAME=v1,v2,...")
    if name not in allowed:
        raise CompareError(f"--sweep {name}: not a method option; use one of {', '.join(allowed)}")
    values = tuple(parse_value(t) for t in texts)
    if len(set(values)) != len(values):
        raise CompareError(f"--sweep {name} lists a value twice: {raw}")
    return Sweep(name, values, tuple(format_value(v) for v in values))


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise CompareError("--methods is empty; give a comma-separated list, e.g. adamw,sam,tram-theta-prev")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise CompareError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise CompareError(f"--methods lists a method twice: {text}")
    return methods


def check_method_args(pairs: Sequence[str], methods: Sequence[str]) -> None:
    """--method-arg KEY=VALUE goes to every run: refuse one that a listed method rejects."""
    for pair in pairs:
        if "=" not in pair:
            raise CompareError(f"--method-arg {pair!r} must be KEY=VALUE, e.g. --method-arg nu=1e-4")
        key, _, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key == "divergence":
            continue
        value = parse_value(text)
        for m in methods:
            try:
                _build(m, **{key: value})
            except TypeError:
                raise CompareError(f"--method-arg {key}: not an option of build_method") from None
            except ValueError as e:
                raise CompareError(f"--method-arg {key}={text}: {m} rejects it ({str(e).splitlines()[0]}); "
                                   f"use --sweep {key}={text} to give it only to the methods that take it") from None


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    sweep: tuple = ()  # ((name, text), ...)

    @property
    def row(self) -> str:
        return " ".join([self.method] + [f"{n}={t}" for n, t in self.sweep])

    @property
    def name(self) -> str:
        return "-".join([self.method] + [f"{n}{t}" for n, t in self.sweep] + [f"seed{self.seed}"])


def expand_runs(methods: Sequence[str], seeds: int, sweeps: Sequence[Sweep] = (),
                takes: Callable[[str, str, Sequence], tuple] = method_takes) -> list[RunSpec]:
    """Every (method, sweep values it takes, seed). A method that takes none of the swept
    options runs once per seed; one that takes several runs their product. A sweep that no
    listed method takes, or a value a taking method rejects, is a CompareError."""
    if seeds < 1:
        raise CompareError(f"--seeds {seeds} must be >= 1")
    names = [s.name for s in sweeps]
    if len(set(names)) != len(names):
        raise CompareError(f"--sweep {names[0]} given twice; list all its values in one --sweep")
    per_method = {m: [] for m in methods}
    for s in sweeps:
        takers = []
        for m in methods:
            ok, bad = takes(m, s.name, s.values)
            if ok:
                if bad:
                    v, err = next(iter(bad.items()))
                    raise CompareError(f"--sweep {s.name}={format_value(v)}: {m} rejects it ({err})")
                takers.append(m)
                per_method[m].append(s)
        if not takers:
            raise CompareError(f"--sweep {s.name}: none of the methods {', '.join(methods)} takes "
                               f"{s.name}; add a method that does or drop the sweep")
    specs = []
    for m in methods:
        grids = [[(s.name, t) for t in s.texts] for s in per_method[m]]
        for combo in itertools.product(*grids) if grids else [()]:
            for seed in range(seeds):
                specs.append(RunSpec(m, seed, tuple(combo)))
    return specs


def launcher_command(spec: RunSpec, launcher: str | os.PathLike, out_dir: str | os.PathLike,
                     common: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, str(launcher), "--method", spec.method, "--seed", str(spec.seed),
           "--output-dir", str(out_dir), *common]
    for name, text in spec.sweep:
        cmd += ["--sigma", text] if name == SIGMA else ["--method-arg", f"{name}={text}"]
    return cmd + list(extra)


@dataclass
class RunResult:
    spec: RunSpec
    dir: Path
    status: str  # "ok", "failed", "skipped" (--resume-existing)
    returncode: int | None = None
    wall_s: float | None = None
    log_tail: str = ""
    summary: dict = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.dir.parent.parent / LOGS / f"{self.spec.name}.log"


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep the last state of each line
    rows = [r.split("\r")[-1] for r in text.splitlines()]
    return "\n".join(rows[-lines:])


def _finished(result: RunResult) -> str:
    s = result.summary
    if result.status == "failed":
        return f"FAILED (exit {result.returncode}) after {result.wall_s:.1f} s"
    zs, ind = s.get("zs_avg"), s.get("in_domain_ppl")
    wall = f"{result.wall_s:.1f} s" if result.wall_s is not None else "? s"
    what = "exists, skipped: " if result.status == "skipped" else ""
    return f"{what}ZS Avg {_num(zs, 2)}, in-domain {_num(ind, 2)}, {wall}"


def run_all(specs: Sequence[RunSpec], *, launcher: str | os.PathLike, output_dir: str | os.PathLike,
            common: Sequence[str] = (), extra: Sequence[str] = (), jobs: int = 1,
            resume_existing: bool = False, log: Callable[[str], None] = say,
            env: Mapping[str, str] | None = None, start: str = "auto") -> list[RunResult]:
    """Launch every run (at most `jobs` at a time), each into OUTPUT/runs/<name>/ with its
    output in OUTPUT/logs/<name>.log; print one line per finished run. With `jobs` > 1 and no
    OMP_NUM_THREADS in the environment each run gets cores // jobs threads. `start`: how a run's
    process starts (tram_dist.run.processes: "auto" forks runs from a preloaded forkserver on a
    machine without CUDA, and starts fresh interpreters otherwise)."""
    runs_dir, logs_dir = Path(output_dir) / "runs", Path(output_dir) / LOGS
    runs_dir.mkdir(parents=True, exist_ok=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    if jobs > 1 and "OMP_NUM_THREADS" not in base_env:
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    base_env.setdefault("TQDM_MININTERVAL", "5")
    results: list[RunResult | None] = [None] * len(specs)
    pending = list(range(len(specs)))
    running: dict[int, tuple[object, float, object]] = {}  # a Popen or a ForkedRun
    done = 0

    def finish(i: int, result: RunResult) -> None:
        nonlocal done
        done += 1
        results[i] = result
        log(f"[{done}/{len(specs)}] {result.spec.name}: {_finished(result)}")
        if result.status == "failed":
            log(f"    last lines of {result.log_path}:")
            for line in (result.log_tail or "(no output)").splitlines():
                log(f"    | {line}")

    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i = pending.pop(0)
                spec = specs[i]
                out = runs_dir / spec.name
                record = logs_dir / f"{spec.name}.json"
                if resume_existing and (out / "eval.json").is_file():
                    rec = _read_json(record) or {}
                    finish(i, RunResult(spec, out, "skipped", rec.get("returncode", 0), rec.get("wall_s"),
                                        summary=run_summary(load_run(out, record))))
                    continue
                if out.exists():  # a stale or unfinished run: start clean
                    shutil.rmtree(out)
                record.unlink(missing_ok=True)
                cmd = launcher_command(spec, launcher, out, common, extra)
                logf = open(logs_dir / f"{spec.name}.log", "w")
                logf.write("$ " + " ".join(cmd) + "\n")
                logf.flush()
                proc = start_launcher(cmd, logf, base_env, start)
                running[i] = (proc, time.perf_counter(), logf)
            time.sleep(0.2)
            for i, (proc, t0, logf) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                wall = time.perf_counter() - t0
                logf.close()
                del running[i]
                spec, out = specs[i], runs_dir / specs[i].name
                record = logs_dir / f"{spec.name}.json"
                record.write_text(json.dumps(
                    {"command": launcher_command(spec, launcher, out, common, extra),
                     "returncode": rc, "wall_s": wall}, indent=2) + "\n")
                ok = rc == 0 and (out / "eval.json").is_file()
                result = RunResult(spec, out, "ok" if ok else "failed", rc, wall)
                if ok:
                    result.summary = run_summary(load_run(out, record))
                else:
                    result.log_tail = _tail(result.log_path)
                finish(i, result)
    finally:  # interrupted: do not leave launchers running
        for proc, _, logf in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------------
# reading a run folder
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # a line cut by a killed run
    except OSError:
        pass
    return out


def load_run(folder: str | os.PathLike, record: str | os.PathLike | None = None) -> dict:
    """A run folder's eval.json, metrics.jsonl and evals.jsonl (+ compare's record of it)."""
    folder = Path(folder)
    record = Path(record) if record else folder.parent.parent / LOGS / f"{folder.name}.json"
    return {"eval": _read_json(folder / "eval.json") or {},
            "metrics": _read_jsonl(folder / "metrics.jsonl"),
            "evals": _read_jsonl(folder / "evals.jsonl"),
            "record": _read_json(record) or {}}


def _finite(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _mean(values: Iterable) -> float | None:
    xs = _finite(values)
    return sum(xs) / len(xs) if xs else None


def run_summary(run: Mapping) -> dict:
    """One run's numbers (see the module doc); None where a run does not have one."""
    ev, metrics = run.get("eval") or {}, run.get("metrics") or []
    rest = metrics[1:]  # step time: the first step warms up (allocations, lazy init)
    analysis = ev.get("analysis") or {}
    increase = [m["perturbed_loss"] - m["loss"] for m in metrics
                if len(_finite([m.get("perturbed_loss"), m.get("loss")])) == 2]
    return {
        "train_domain": ev.get("train_domain"),
        "domains": {k: v for k, v in (ev.get("domains") or {}).items()},
        "in_domain_ppl": ev.get("in_domain_ppl"),
        "zs_avg": ev.get("zs_avg"),
        "selected_step": ev.get("step"),
        "steps": len(metrics),
        "wall_s": (run.get("record") or {}).get("wall_s"),
        "step_time_s": _mean(m.get("step_time_s") for m in rest),
        "peak_mem_mb": max(_finite(m.get("peak_mem_mb") for m in metrics), default=None),
        "radius": _mean(m.get("radius") for m in metrics),
        "eps_applied": _mean(m.get("eps_applied") for m in metrics),
        "loss_increase": _mean(increase),
        "divergence": _mean(m.get("divergence") for m in metrics),
        "penalty": _mean(m.get("penalty") for m in metrics),
        "sharpness": _mean((analysis.get("sharpness") or {}).values()),
        "cka": _mean((analysis.get("cka") or {}).values()),
    }


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------
SCALARS = ("in_domain_ppl", "zs_avg", "wall_s", "step_time_s", "peak_mem_mb", "radius",
           "eps_applied", "loss_increase", "divergence", "penalty", "sharpness", "cka")


def _cell(values: Sequence) -> dict:
    xs = _finite(values)
    m, s = mean_std(xs)
    return {"mean": m, "std": s, "n": len(xs), "values": xs}


def aggregate(results: Sequence[RunResult]) -> dict:
    """Rows (one per method and sweep value, in the order run), cells over seeds, the step time
    ratio to AdamW and the paired tests against AdamW."""
    ok = [r for r in results if r.status in ("ok", "skipped")]
    order: list[tuple] = []
    for r in results:
        key = (r.spec.method, r.spec.sweep)
        if key not in order:
            order.append(key)
    train = next((r.summary.get("train_domain") for r in ok if r.summary.get("train_domain")), None)
    domains: list[str] = []
    for r in ok:
        for d in r.summary.get("domains", {}):
            if d not in domains:
                domains.append(d)
    if train in domains:
        domains.remove(train)
    rows = []
    for method, sweep in order:
        mine = [r for r in ok if (r.spec.method, r.spec.sweep) == (method, sweep)]
        spec = RunSpec(method, 0, sweep)
        cells = {k: _cell([r.summary.get(k) for r in mine]) for k in SCALARS}
        cells["domains"] = {d: _cell([r.summary.get("domains", {}).get(d) for r in mine])
                            for d in ([train] if train else []) + domains}
        rows.append({"name": spec.row, "method": method, "sweep": dict(sweep),
                     "seeds": sorted(r.spec.seed for r in mine),
                     "failed_seeds": sorted(r.spec.seed for r in results
                                            if r.status == "failed" and (r.spec.method, r.spec.sweep) == (method, sweep)),
                     "cells": cells, "_runs": {r.spec.seed: r.summary for r in mine}})
    base = next((row for row in rows if row["method"] == BASELINE and not row["sweep"]), None)
    for row in rows:
        t, bt = row["cells"]["step_time_s"]["mean"], base["cells"]["step_time_s"]["mean"] if base else None
        row["step_time_ratio"] = t / bt if t is not None and bt else None
        row["paired_vs_adamw"] = None
        if base is not None and row is not base:
            tests = {}
            for key in ("zs_avg", "in_domain_ppl"):
                seeds = sorted(s for s in row["_runs"] if s in base["_runs"]
                               and len(_finite([row["_runs"][s].get(key), base["_runs"][s].get(key)])) == 2)
                tests[key] = {"seeds": seeds, **paired_t_test([row["_runs"][s][key] for s in seeds],
                                                              [base["_runs"][s][key] for s in seeds])}
            row["paired_vs_adamw"] = tests
    for row in rows:
        del row["_runs"]
    return {"train_domain": train, "zs_domains": domains, "rows": rows,
            "baseline": BASELINE if base is not None else None}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _num(v, digits: int = 2, style: str = "f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}{style}}"


def _pm(cell: Mapping, digits: int = 2, style: str = "f") -> str:
    if cell["mean"] is None:
        return "-"
    text = _num(cell["mean"], digits, style)
    if cell["std"] is not None:
        text += " ± " + _num(cell["std"], digits if style == "f" else 2, style)
    return text


def _signed(v, digits: int = 2) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.{digits}f}"


def _p(p) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def format_markdown(report: Mapping) -> str:
    """compare.md: the settings, the Table-3-style table, the paired tests, failed runs."""
    agg = report["aggregate"]
    train, zs = agg["train_domain"] or "in-domain", agg["zs_domains"]
    analysis = any(row["cells"]["sharpness"]["mean"] is not None or row["cells"]["cka"]["mean"] is not None
                   for row in agg["rows"])
    penalty = any(row["cells"]["penalty"]["mean"] is not None for row in agg["rows"])
    s = report["settings"]
    lines = [f"# Method comparison: fine-tuning on {train}", ""]
    lines.append(f"{len(report['runs'])} runs ({', '.join(s['methods'])}; seeds 0..{s['seeds'] - 1}"
                 + (f"; sweeps {', '.join(s['sweeps'])}" if s.get("sweeps") else "") + f"), "
                 f"{s['jobs']} at a time, {_num(report.get('wall_s'), 0)} s in all. Launcher flags: "
                 f"`{' '.join(s['common'] + s['extra'])}`")
    lines += ["", "Perplexity (lower is better; mean ± std over seeds). ZS Avg. = mean over the "
              "zero-shot domains. Step time: mean over steps but the first, relative to AdamW. "
              "Ascent: mean over steps of the radius, the applied ||eps|| and L(theta + eps) - "
              "L(theta)." + (" Penalty KL: the regularizers' KL term (TRPO, R3F, MESA), mean over steps."
                             if penalty else "") + (" Wall times overlap when runs go in parallel." if s["jobs"] > 1 else ""), ""]
    head = ["run", train, *zs, "ZS Avg.", "wall (s)", "step time / AdamW", "peak mem (MiB)",
            "radius", "applied ‖ε‖", "L(θ+ε) − L(θ)"]
    if penalty:
        head.append("penalty KL")
    if analysis:
        head += ["ε-sharpness %", "CKA to start"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in agg["rows"]:
        c = row["cells"]
        vals = [_pm(c["domains"].get(train, {"mean": None, "std": None})) if train in c["domains"] else "-"]
        vals += [_pm(c["domains"][d]) if d in c["domains"] else "-" for d in zs]
        vals += [_pm(c["zs_avg"]), _pm(c["wall_s"], 0), _num(row["step_time_ratio"], 2),
                 _pm(c["peak_mem_mb"], 0), _pm(c["radius"], 3, "g"), _pm(c["eps_applied"], 3, "g"),
                 _pm(c["loss_increase"], 3, "g")]
        if penalty:
            vals.append(_pm(c["penalty"], 3, "g"))
        if analysis:
            vals += [_pm(c["sharpness"], 3, "g"), _pm(c["cka"], 4)]
        name = row["name"] + (f" ({len(row['failed_seeds'])} failed)" if row["failed_seeds"] else "")
        lines.append("| " + " | ".join([name, *vals]) + " |")
    tested = [row for row in agg["rows"] if row.get("paired_vs_adamw")]
    if tested:
        lines += ["", "Paired over seeds against AdamW (difference = run - AdamW; negative is "
                  "better; two-sided paired t-test, n/a below 2 seeds):", "",
                  "| run | seeds | Δ ZS Avg. | p | Δ " + train + " | p |", "|---|---:|---:|---:|---:|---:|"]
        for row in tested:
            z, i = row["paired_vs_adamw"]["zs_avg"], row["paired_vs_adamw"]["in_domain_ppl"]
            lines.append(f"| {row['name']} | {z['n']} | {_signed(z['mean_diff'])} | {_p(z['p'])} | "
                         f"{_signed(i['mean_diff'])} | {_p(i['p'])} |")
    elif agg["baseline"] is None:
        lines += ["", "No AdamW row: no paired tests (add adamw to --methods)."]
    failed = [r for r in report["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["", f"Failed runs ({len(failed)}): " + ", ".join(
            f"{r['name']} (exit {r['returncode']}, see {r['log']})" for r in failed)]
    return "\n".join(lines) + "\n"


def build_report(results: Sequence[RunResult], settings: Mapping, wall_s: float | None) -> dict:
    runs = [{"name": r.spec.name, "method": r.spec.method, "seed": r.spec.seed,
             "sweep": dict(r.spec.sweep), "dir": str(r.dir), "status": r.status,
             "returncode": r.returncode, "wall_s": r.wall_s, "summary": r.summary,
             "log": str(r.log_path),
             **({"log_tail": r.log_tail} if r.status == "failed" else {})} for r in results]
    return {"settings": dict(settings), "wall_s": wall_s, "runs": runs,
            "failed": [r["name"] for r in runs if r["status"] == "failed"],
            "aggregate": aggregate(results)}


def write_report(report: Mapping, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "compare.json", out / "compare.md"
    js.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    md.write_text(format_markdown(report))
    return js, md


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def _curve(runs: Sequence[list[dict]], key: str, step_key: str = "step") -> tuple[list, list]:
    """Mean over seeds of `key` at each step that every seed reports."""
    per = []
    for records in runs:
        per.append({r[step_key]: r[key] for r in records
                    if step_key in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])})
    if not per:
        return [], []
    steps = sorted(set.intersection(*(set(p) for p in per)))
    return steps, [sum(p[s] for p in per) / len(per) for s in steps]


PANELS = (  # (title, source, key, log scale)
    ("training loss", "metrics", "loss", False),
    ("in-domain valid perplexity", "evals", "valid_ppl", False),
    ("zero-shot: ZS Avg. test perplexity", "evals", "zs_avg", False),
    ("d (divergence)", "metrics", "divergence", True),
    ("radius", "metrics", "radius", True),
    ("applied ||eps||", "metrics", "eps_applied", True),
)


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def row_style(k: int) -> dict:
    """The k-th row's colour, line style and marker: matplotlib's 10 colours, then the same
    colours dashed with square markers, and so on (Table 3 has 14 rows; no two rows may look
    alike in a legend)."""
    cycle = (k // 10) % len(_LINESTYLES)
    return {"color": f"C{k % 10}", "linestyle": _LINESTYLES[cycle], "marker": _MARKERS[cycle]}


def write_plot(report: Mapping, path: str | os.PathLike, log: Callable[[str], None] = say) -> bool:
    """compare.png: one panel per PANELS entry, one line per row (mean over its seeds). Returns
    False (and says how to get it) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("compare.png not written: matplotlib is not installed (pip install matplotlib to get the plot)")
        return False
    rows: dict[str, list[str]] = {}
    for r in report["runs"]:
        if r["status"] != "failed":
            rows.setdefault(" ".join([r["method"]] + [f"{k}={v}" for k, v in r["sweep"].items()]), []).append(r["dir"])
    loaded = {name: [load_run(d) for d in dirs] for name, dirs in rows.items()}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    flat = [ax for line in axes for ax in line]
    for ax, (title, source, key, log_scale) in zip(flat, PANELS):
        drawn = 0
        for k, (name, runs) in enumerate(loaded.items()):  # a row keeps its colour in every panel
            records = [run[source] for run in runs]
            if source == "evals":  # the final evaluation point comes from eval.json when missing
                records = [rec or [{"step": run["eval"].get("step"),
                                    "valid_ppl": run["eval"].get("valid_ppl"),
                                    "zs_avg": run["eval"].get("zs_avg")}]
                           for rec, run in zip(records, runs)]
            xs, ys = _curve(records, key)
            if log_scale:
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ((), ())
            if xs:
                style = row_style(k)
                ax.plot(list(xs), list(ys), color=style["color"], linestyle=style["linestyle"],
                        marker=style["marker"] if len(xs) < 8 else None, label=name)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_scale and drawn:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    train = report["aggregate"].get("train_domain") or ""
    fig.suptitle(f"fine-tuning on {train}: one line per method (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compare(methods: Sequence[str], *, seeds: int, output_dir: str | os.PathLike,
            launcher: str | os.PathLike, common: Sequence[str] = (), extra: Sequence[str] = (),
            sweeps: Sequence[Sweep] = (), jobs: int = 1, resume_existing: bool = False,
            settings: Mapping | None = None, log: Callable[[str], None] = say) -> dict:
    """Expand, run, aggregate, write compare.json / compare.md / compare.png; return the report
    (its "failed" list is empty when every run succeeded)."""
    specs = expand_runs(methods, seeds, sweeps)
    log(f"{len(specs)} runs into {Path(output_dir) / 'runs'} ({jobs} at a time)")
    t0 = time.perf_counter()
    results = run_all(specs, launcher=launcher, output_dir=output_dir, common=common, extra=extra,
                      jobs=jobs, resume_existing=resume_existing, log=log)
    wall = time.perf_counter() - t0
    settings = {"methods": list(methods), "seeds": seeds, "jobs": jobs,
                "sweeps": [f"{s.name}={','.join(s.texts)}" for s in sweeps],
                "common": list(common), "extra": list(extra), **(settings or {})}
    report = build_report(results, settings, wall)
    js, md = write_report(report, output_dir)
    write_plot(report, Path(output_dir) / "compare.png", log=log)
    log("")
    log(md.read_text().rstrip())
    log("")
    log(f"wrote {js} and {md} ({wall:.0f} s)")
    if report["failed"]:
        log(f"{len(report['failed'])} of {len(results)} runs failed: {', '.join(report['failed'])}")
    return report


__all__ = ["CompareError", "RunSpec", "RunResult", "Sweep", "mean_std", "betainc", "t_sf", "t_cdf",
           "paired_t_test", "parse_value", "format_value", "method_takes", "parse_sweep",
           "parse_methods", "check_method_args", "expand_runs", "launcher_command", "run_all",
           "load_run", "run_summary", "aggregate", "build_report", "format_markdown",
           "write_report", "row_style", "write_plot", "compare"]
