"""The stability rule: its formulas (hand-computed), the collapse detector on series with known collapse steps,
the constant fits recovering known constants, the held-out and 1/S checks, `stalecast study stability` end to
end (a synthetic trainer for the whole grid, the real one for a single run) and `stalecast plan --lr`."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.config import ConfigError, Instability, load_config, parse_config
from sim.stability import (StabilityConstants, applied_lr, constants_from_config, constants_from_fit,
                           detect_collapse, fit_clip_radius, fit_rule, fit_update_norm, predict, read_fit,
                           staleness_of, write_fit)
from studies import stability as study
from validate import stability as check
from test_studies import SMALL as STUDY_SMALL  # the same small 0.5B-on-H100 config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
WARMUP = 5


# --------------------------------------------------------------------------- the rule
def test_rule_formulas_by_hand():
    c = StabilityConstants(r_batch=0.2, g_upd=10.0, r_crit=5.0, scale=0.5)
    assert c.staleness_threshold == pytest.approx(0.01)      # 0.5 * 0.2 / 10
    assert c.drift_threshold == pytest.approx(0.25)          # 0.5 * 5 / 10

    p = predict(c, lr=1e-3, staleness=4, horizon=200)
    assert p.staleness_lr == pytest.approx(2.5e-3)           # 0.01 / 4
    assert p.horizon_lr == pytest.approx(1.25e-3)            # 0.25 / 200
    assert p.max_stable_lr == pytest.approx(1.25e-3) and p.binding == "horizon"
    assert p.margin == pytest.approx(1.25) and p.stable

    p = predict(c, lr=2e-3, staleness=8, horizon=100)        # 0.01/8 = 1.25e-3 < 0.25/100 = 2.5e-3
    assert p.binding == "staleness" and p.margin == pytest.approx(0.625) and not p.stable
    assert not predict(c, lr=1e-3, staleness=10, horizon=100).stable   # exactly at the bound: not stable

    sync = predict(c, lr=1e-3, staleness=0, horizon=100)     # no staleness: only the horizon term
    assert sync.staleness_lr == math.inf and sync.binding == "horizon" and sync.margin == pytest.approx(2.5)


def test_staleness_statistic_of_a_histogram():
    assert staleness_of({"0": 50, "1": 45, "3": 5}) == 3
    assert staleness_of({0: 990, 5: 10}, "max") == 5
    assert staleness_of({0: 990, 5: 10}, "p99") == 0                   # one straggler in a hundred
    assert staleness_of({0: 989, 5: 11}, "p99") == 5
    expanded = np.repeat([0, 1, 2, 7], [500, 300, 195, 5])
    hist = {str(s): int(n) for s, n in zip(*np.unique(expanded, return_counts=True))}
    assert staleness_of(hist, "p99") == np.quantile(expanded, 0.99, method="inverted_cdf")
    with pytest.raises(ValueError, match="empty"):
        staleness_of({})


def test_applied_lr_by_schedule():
    base = parse_config(yaml.safe_load(TINY.read_text()))
    aware = base.with_overrides({"optim.schedule": "staleness_aware", "optim.staleness_alpha": 0.5, "optim.lr": 1e-3})
    assert applied_lr(aware.optim, 2.0) == pytest.approx(1e-3 / 2.0)
    assert applied_lr(base.optim, 2.0) == base.optim.lr
    assert applied_lr(base.with_overrides({"optim.schedule": "ess_coupled"}).optim, 2.0) == base.optim.lr


def test_constants_from_config_and_fit_file(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    assert constants_from_config(parse_config(data)) is None        # not known
    known = parse_config({**data, "stability": {"r_batch": 0.2, "g_upd": 10, "r_crit": 5}})
    assert constants_from_config(known) == (StabilityConstants(0.2, 10.0, 5.0, 1.0), "max")

    fit = tmp_path / "fit.json"
    write_fit(fit, {"staleness_statistic": "p99", "constants": {"r_batch": 0.3, "g_upd": 2.0, "r_crit": math.inf,
                                                                "scale": 0.5}})
    assert json.loads(fit.read_text())["constants"]["r_crit"] is None   # unbounded is written as null
    assert read_fit(fit) == (StabilityConstants(0.3, 2.0, math.inf, 0.5), "p99")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**data, "stability": {"fit": "fit.json", "r_crit": 7.0}}))
    constants, statistic = constants_from_config(load_config(cfg_path))  # the config's own values win
    assert constants == StabilityConstants(0.3, 2.0, 7.0, 0.5) and statistic == "p99"

    with pytest.raises(ConfigError, match=r"stability: give all of r_batch, g_upd and r_crit \(only r_batch given\)"):
        parse_config({**data, "stability": {"r_batch": 0.2}})
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "stalecast.stability-fit/1", "constants": {}}))
    with pytest.raises(ValueError, match="bad.json: not a stability fit file"):
        read_fit(tmp_path / "bad.json")
    cfg_path.write_text(yaml.safe_dump({**data, "stability": {"fit": "absent.json"}}))
    with pytest.raises(ConfigError, match="stability.fit: file not found: absent.json"):
        load_config(cfg_path)


def test_simulate_summary_shows_the_rule(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", str(TINY), "--steps", "20", "--no-sync-baseline", "--out", str(out),
                 "--set", "stability.r_batch=0.5", "--set", "stability.g_upd=50", "--set", "stability.r_crit=20"]) == 0
    printed = capsys.readouterr().out
    assert "stability rule" in printed and "largest stable lr" in printed and "margin" in printed
    saved = json.loads((out / "metrics.json").read_text())["stability"]
    s = saved["staleness"]                                           # the simulated max staleness
    assert saved["staleness_lr"] == pytest.approx(0.5 / 50 / s)
    assert saved["horizon_lr"] == pytest.approx(20 / 50 / 20)
    assert saved["lr"] == load_config(TINY).optim.lr                    # constant schedule: the base lr
    assert saved["margin"] == pytest.approx(min(0.01 / s, 0.02) / saved["lr"])


# --------------------------------------------------------------------------- collapse detection
def series(n, reward=None, grad=None, kl=None, loss=None):
    """metrics.jsonl-like rows; each argument maps step -> value over a calm baseline."""
    rows = []
    for t in range(n):
        rows.append({"step": t, "reward/mean": (reward or {}).get(t, 0.3 + 0.004 * t + 0.01 * (t % 3)),
                     "grad_norm": (grad or {}).get(t, 1.0 + 0.1 * (t % 4)), "kl/k3": (kl or {}).get(t, 0.01),
                     "loss": (loss or {}).get(t, -0.05)})
    return rows


@pytest.mark.parametrize("rows,expected", [
    (series(40), None),
    # 0.05 from step 20: the 5-step average falls below half its best at 22 and stays there
    (series(40, reward={t: 0.05 for t in range(20, 40)}), 22),
    (series(40, reward={t: 0.05 for t in range(20, 24)}), None),      # the average fell for 4 steps, then recovered
    (series(40, reward={t: 0.05 for t in range(36, 40)}), None),      # fell too late to stay fallen 5 steps
    (series(40, grad={13: 40.0}), None),                               # a grad-norm spike alone is not a collapse
    (series(40, kl={30: 2.5}), 30),
    (series(40, kl={2: 2.5}), None),                                   # during warm-up: not a collapse
    (series(40, loss={2: math.nan}), 2),                               # a non-finite loss always is
    (series(40, loss={9: None}), 9),                                   # ... also as JSON writes it (null)
], ids=["calm", "reward-fall", "recovered", "fell-at-the-end", "grad-spike", "kl", "warm-up", "nan-loss",
        "null-loss"])
def test_collapse_detector_finds_known_collapse_steps(rows, expected):
    cfg = Instability(warmup_steps=WARMUP, reward_drop=0.5, reward_window=5, recover_window=5, kl_max=1.0)
    step, reason = detect_collapse(rows, cfg)
    assert step == expected and (reason is None) == (expected is None)


# --------------------------------------------------------------------------- fitting
G_TRUE, R_BATCH_TRUE, EPS = 20.0, 0.05, 0.2


def stale_rows(S, lr, steps, seed, log_update=True, collapse_at=None, schedule_factor=1.0):
    """Rows of a run whose consumed staleness ramps up to S, with update norms G·lr·u (u in [0.9, 1]) and, for
    each staleness range, KL = (k·drift)²/2 with k = log(1 + eps)/R_batch (up to 5 % noise on the spread)."""
    rng = np.random.default_rng(seed)
    k = math.log1p(EPS) / R_BATCH_TRUE
    rows = []
    for t in range(steps):
        applied = lr * schedule_factor
        s = min(t, S)
        row = {"step": t, "lr": applied, "staleness/hist": {str(s): 32}, "reward/mean": 0.2 + 0.003 * t,
               "grad_norm": 1.0, "kl/k3": 0.01, "loss": -0.1, "ess/token": 1 - 0.02 * s, "ess/seq": 1 - 0.1 * s}
        if log_update:
            row["update_norm"] = G_TRUE * applied * rng.uniform(0.9, 1.0)
        drift = sum(rows[t - j].get("update_norm", G_TRUE * rows[t - j]["lr"]) for j in range(1, s + 1))
        spread = k * drift * rng.uniform(0.95, 1.05)
        row.update({f"by_staleness/{s}/n_samples": 32, f"by_staleness/{s}/kl/k3": spread ** 2 / 2,
                    f"by_staleness/{s}/ess/token": 1 - 0.02 * s, f"by_staleness/{s}/ess/seq": 1 - 0.1 * s,
                    f"by_staleness/{s}/grad_norm": 1.0})
        if collapse_at is not None and t >= collapse_at:
            row.update({"kl/k3": 5.0, "reward/mean": 0.01})
        rows.append(row)
    return rows


def test_fit_update_norm_recovers_g_upd():
    runs = [stale_rows(2, lr, 40, seed) for seed, lr in enumerate([1e-3, 3e-3, 1e-2])]
    g = fit_update_norm(runs)
    assert g.value == pytest.approx(G_TRUE, rel=0.03) and g.low <= g.value <= g.high and g.n == 120
    assert fit_update_norm([stale_rows(2, 1e-3, 10, 0, log_update=False)]) is None


@pytest.mark.parametrize("log_update", [True, False], ids=["update-norms", "g-times-lr"])
def test_fit_clip_radius_recovers_r_batch(log_update):
    runs = [stale_rows(S, lr, 30, seed, log_update) for seed, (S, lr) in enumerate([(1, 1e-3), (2, 3e-3), (4, 1e-3)])]
    r = fit_clip_radius(runs, EPS, g_upd=G_TRUE)
    assert r.value == pytest.approx(R_BATCH_TRUE, rel=0.03) and r.low <= R_BATCH_TRUE <= r.high
    assert fit_clip_radius([stale_rows(0, 1e-3, 10, 0)], EPS) is None     # no stale samples


A_TRUE, B_TRUE, T = 0.02, 1.0, 60


def true_collapse(S, lr):
    """The known rule: a staleness collapse right after warm-up, a horizon collapse at b/η, else stable."""
    if S * lr >= A_TRUE:
        return WARMUP + 1
    if lr * T >= B_TRUE:
        return math.ceil(B_TRUE / lr)
    return math.nan


def grid_cells(bounds=(0, 1, 2, 4, 8), lrs=tuple(np.geomspace(1e-3, 1e-1, 9)), rule=true_collapse):
    rows = [{"pipeline.max_staleness": S, "optim.schedule": "constant", "optim.lr": lr, "S": float(S),
             "lr/applied": lr, "steps": T, "collapse_step": rule(S, lr)} for S in bounds for lr in lrs]
    return pd.DataFrame(rows)


def test_fit_rule_recovers_known_thresholds():
    cells = grid_cells()
    fit = fit_rule(cells["S"], cells["lr/applied"], cells["steps"], cells["collapse_step"], WARMUP)
    assert fit.errors == 0 and fit.n == len(cells)
    # a lies between the largest stable and the smallest collapsed S·η of the grid
    x = cells["S"] * cells["lr/applied"]
    collapsed_by_staleness = x >= A_TRUE
    assert x[~collapsed_by_staleness].max() < fit.staleness_threshold.value <= x[collapsed_by_staleness].min()
    assert fit.drift_threshold.value == pytest.approx(B_TRUE, rel=0.1)       # from the collapse steps
    for e, truth in ((fit.staleness_threshold, A_TRUE), (fit.drift_threshold, B_TRUE)):
        assert e.low <= e.value <= e.high and e.low <= truth * 1.3 and truth / 1.3 <= e.high


def test_constants_from_fit_keep_the_thresholds():
    cells = grid_cells()
    fit = fit_rule(cells["S"], cells["lr/applied"], cells["steps"], cells["collapse_step"], WARMUP, n_boot=0)
    g, r = fit_update_norm([stale_rows(2, 1e-3, 20, 0)]), fit_clip_radius([stale_rows(2, 1e-3, 20, 0)], EPS, G_TRUE)
    constants, units = constants_from_fit(fit, g, r)
    assert units == "parameter L2 norm" and constants.r_batch == r.value and constants.g_upd == g.value
    assert constants.scale == pytest.approx(fit.staleness_threshold.value * g.value / r.value)
    assert constants.staleness_threshold == pytest.approx(fit.staleness_threshold.value)
    assert constants.drift_threshold == pytest.approx(fit.drift_threshold.value)
    unmeasured, units = constants_from_fit(fit, None, None)
    assert "units of G_upd" in units and unmeasured.g_upd == 1.0 and unmeasured.scale == 1.0


def test_no_collapse_means_no_limit_is_claimed():
    cells = grid_cells(lrs=(1e-4, 2e-4), rule=lambda S, lr: math.nan)
    fit = fit_rule(cells["S"], cells["lr/applied"], cells["steps"], cells["collapse_step"], WARMUP, n_boot=20)
    assert fit.staleness_threshold.value == math.inf and fit.drift_threshold.value == math.inf


# --------------------------------------------------------------------------- held-out and 1/S checks
def test_heldout_agreement_and_inverse_staleness_on_a_rule_following_grid():
    cells = grid_cells(bounds=(0, 1, 2, 4), lrs=tuple(np.geomspace(1e-3, 3e-2, 8)))
    analysis = check.analyse(cells, [], EPS, WARMUP, n_boot=20)
    for scheme in ("run", "bound"):
        pred = analysis.heldout[scheme]
        assert check.agreement(pred) >= 0.85, scheme
        assert check.confusion(pred).to_numpy().sum() == len(cells)
    (scaling,) = analysis.scaling
    assert scaling.consistent and scaling.slope == pytest.approx(-1, abs=0.35)
    text = "\n".join(check.markdown(analysis, "max"))
    assert "Leave one run out" in text and "consistent with 1/S" in text


def test_inverse_staleness_check_rejects_a_staleness_free_limit():
    # Collapse at lr >= 0.01 whatever S: the largest stable lr does not fall with S.
    cells = grid_cells(bounds=(1, 2, 4, 8), lrs=tuple(np.geomspace(1e-3, 3e-2, 8)),
                       rule=lambda S, lr: WARMUP + 1 if lr >= 0.01 else math.nan)
    cells["steps"] = 10_000  # a horizon term that never binds, so the fit can only use S·η
    fit = fit_rule(cells["S"], cells["lr/applied"], cells["steps"], cells["collapse_step"], WARMUP, n_boot=0)
    (scaling,) = check.scaling_checks(cells, fit)
    assert scaling.consistent is False and abs(scaling.slope) < 0.3


# --------------------------------------------------------------------------- the study
A_STUDY, B_STUDY, STEPS = 0.004, 0.2, 40


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces real training with rows that follow a known rule (a staleness collapse at step 6 where
    S·η >= 0.004, a horizon collapse at 0.2/η otherwise): counts calls; `fail` names a run label to fail once."""
    calls = {"n": 0, "fail": None}

    def train(run, scratch, timeout, on_step=None):
        calls["n"] += 1
        if run.label == calls["fail"]:
            calls["fail"] = None
            return {"status": "failed", "error": "TimeoutError: the run passed its time limit", "steps": [],
                    "metrics": {}, "compute_s": 0.0}
        factor = 0.8 if run.schedule == "ess_coupled" and run.bound > 0 else 1.0
        lr = run.lr * factor
        collapse = WARMUP + 1 if run.bound * lr >= A_STUDY else (
            math.ceil(B_STUDY / lr) if lr * STEPS >= B_STUDY else None)
        rows = stale_rows(run.bound, run.lr, run.cfg.run.steps, calls["n"], collapse_at=collapse,
                          schedule_factor=factor)
        for row in rows:
            if on_step is not None:
                on_step(None, row["step"], row)
        return {"status": "ok", "error": None, "steps": rows, "compute_s": 0.01,
                "metrics": {"staleness/mean": run.bound * 0.8, "staleness/max": run.bound,
                            "throughput/samples_per_s": 100.0, "time/step_s": 0.3}}

    monkeypatch.setattr(study, "train_run", train)
    return calls


def test_study_writes_map_fit_and_check_and_resumes(tmp_path, fake_training, capsys):
    out = tmp_path / "study"
    args = ["study", "stability", str(TINY), "--out", str(out), "--bounds", "0,1,2,4", "--lrs", "1e-3,3e-3,1e-2",
            "--schedules", "constant,ess_coupled", "--steps", str(STEPS)]
    fake_training["fail"] = "S=2 lr=0.001 constant"
    assert main(args) == 1                                      # one run failed: reported, not stored
    runs = 3 * (1 + 3 * 2)                                      # sync once per lr; 3 bounds x 2 schedules
    assert fake_training["n"] == runs
    table = pd.read_csv(out / "table.csv")
    assert len(table) == runs and (table["status"] == "failed").sum() == 1
    assert "TimeoutError" in (out / "summary.md").read_text()

    assert main(args) == 0                                      # finished runs are not redone; the failed one is
    assert fake_training["n"] == runs + 1
    capsys.readouterr()

    for name in ("table.parquet", "table.csv", "by_staleness.parquet", "by_staleness.csv", "fit.json",
                 "stability_map.png", "stability_map.svg", "collapse.png", "collapse.svg", "ess_staleness.png",
                 "ess_staleness.svg", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_parquet(out / "table.parquet")
    assert (table["status"] == "ok").all()
    row = table[(table["pipeline.max_staleness"] == 4) & (table["optim.lr"] == 3e-3)
                & (table["optim.schedule"] == "constant")].iloc[0]
    assert row["collapse_step"] == WARMUP + 1 and row["S"] == 4 and row["lr/applied"] == pytest.approx(3e-3)
    sync = table[(table["pipeline.max_staleness"] == 0) & (table["optim.lr"] == 1e-2)].iloc[0]
    assert sync["pipeline.mode"] == "sync" and sync["collapse_step"] == 20      # 0.2 / 0.01
    assert table[(table["optim.lr"] == 1e-3) & (table["pipeline.max_staleness"] == 1)]["collapsed"].eq(False).all()
    for bound, group in table[table["pipeline.max_staleness"] > 0].groupby("pipeline.max_staleness"):
        assert group["collapsed"].any() and not group["collapsed"].all(), bound
    ess = table[table["optim.schedule"] == "ess_coupled"]
    assert (ess["lr/applied"] < ess["optim.lr"]).all()
    for col in ("reward/final", "reward/auc", "grad_norm/max", "kl/k3", "ess/token"):
        assert table[col].notna().all(), col
    ranges = pd.read_csv(out / "by_staleness.csv")
    assert {"staleness", "ess/token", "kl/k3", "n_samples"} <= set(ranges.columns) and ranges["staleness"].max() == 4

    fit = json.loads((out / "fit.json").read_text())
    assert fit["heldout_agreement"]["run"] >= 0.85
    assert fit["measured"]["g_upd"]["value"] == pytest.approx(G_TRUE, rel=0.05)
    constants, statistic = read_fit(out / "fit.json")
    assert statistic == "max"
    assert constants.staleness_threshold == pytest.approx(fit["thresholds"]["staleness"]["value"])
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# stability study") and "Made by: `stalecast study stability" in summary
    assert "Prediction check (held out)" in summary and "scale like 1/S" in summary


def test_study_rejects_bad_grids(tmp_path, capsys):
    base = ["study", "stability", str(TINY), "--out", str(tmp_path / "o")]
    assert main([*base, "--schedules", "cosine"]) == 2
    assert "unknown schedule(s) cosine" in capsys.readouterr().err
    assert main([*base, "--lrs", "-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main([*base, "--set", "pipeline.mode=one_step_off"]) == 2
    assert "only async mode" in capsys.readouterr().err


def test_real_single_run_study(tmp_path):
    """One real training run through the study (the full grid runs with the synthetic trainer above)."""
    out = tmp_path / "real"
    assert main(["study", "stability", str(TINY), "--out", str(out), "--bounds", "1", "--lrs", "1e-3",
                 "--schedules", "constant", "--steps", "4", "--set", "cluster.rollout_workers=1",
                 "--set", "real.warm_start_steps=0"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 1 and table["status"].iloc[0] == "ok" and table["steps"].iloc[0] == 4
    assert table["S"].iloc[0] <= 1 and table["lr/applied"].iloc[0] == pytest.approx(1e-3)
    assert (out / "stability_map.png").exists() and (out / "fit.json").exists()


@pytest.mark.learning
def test_real_reduced_grid(tmp_path):
    """2 bounds x 1 lr x 1 schedule x 6 steps on the real trainer, end to end (about 30 s on 2 cores)."""
    out = tmp_path / "grid"
    assert main(["study", "stability", str(TINY), "--out", str(out), "--bounds", "0,2", "--lrs", "1e-3",
                 "--schedules", "constant", "--steps", "6"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["pipeline.mode"]) == ["sync", "async"] and (table["status"] == "ok").all()
    assert table["S"].iloc[0] == 0 and 0 < table["S"].iloc[1] <= 2
    assert (out / "summary.md").read_text().count("| sync |") == 1


# --------------------------------------------------------------------------- plan --lr
SMALL = {**STUDY_SMALL, "name": "small-plan", "run": {"steps": 100}}


def test_plan_excludes_configurations_unstable_at_the_lr(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    # a = 0.0025: at lr 1e-3, S <= 2 is stable and S >= 3 is not; b/T = 1/100 never binds.
    path.write_text(yaml.safe_dump({**copy.deepcopy(SMALL),
                                    "stability": {"r_batch": 0.0025, "g_upd": 1.0, "r_crit": 1.0}}))
    out = tmp_path / "plan"
    assert main(["plan", str(path), "--gpus", "6", "--bounds", "1,4", "--steps", "10", "--lr", "1e-3",
                 "--jobs", "1", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "Stability at learning rate 0.001" in printed and "Largest stable learning rate by bound" in printed
    plan = pd.read_csv(out / "plan.csv")
    ok = plan[plan["status"] == "ok"]
    unstable = ok["staleness/max"] >= 3
    assert unstable.any(), "the S=4 runs should reach staleness 3 or more"
    assert (ok["stable_at_lr"] == ~unstable).all() and not ok[unstable]["feasible"].any()
    assert f"{unstable.sum()} of {len(ok)} configurations are predicted unstable" in printed
    assert plan[plan["rank"] == 1].iloc[0]["staleness/max"] < 3

    # without constants --lr cannot exclude anything: it says so instead of ignoring the lr
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(SMALL))
    assert main(["plan", str(bare), "--lr", "1e-3", "--out", str(tmp_path / "bare")]) == 2
    assert "--stability-fit" in capsys.readouterr().err
    fit = tmp_path / "fit.json"
    write_fit(fit, {"staleness_statistic": "max",
                    "constants": {"r_batch": 1.0, "g_upd": 1.0, "r_crit": 1.0, "scale": 1.0}})
    assert main(["plan", str(bare), "--gpus", "6", "--bounds", "1,4", "--steps", "10", "--lr", "1e-3",
                 "--stability-fit", str(fit), "--jobs", "1", "--out", str(out)]) == 0
    assert "none of the" in " ".join(capsys.readouterr().out.split())
