"""The stability rule: its formulas (hand-computed), the collapse detector on series with known collapse steps, the
KL threshold's calibration, the logistic fit recovering known coefficients, the S exponent's interval, the
baselines on held-out splits, `stalecast study stability` end to end (a synthetic trainer for the grid, the real
one for a single run, resumable) and `stalecast plan --lr` / `stalecast simulate` with a fit that has or has no
S dependence."""

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
from sim.stability import (StabilityConstants, StabilityFit, applied_lr, calibrate_kl, detect_collapse, fit_logistic,
                           log_loss, predict, read_fit, rule_from_config, staleness_of, without_kl,
                           write_fit)
from studies import stability as study
from validate import stability as check
from test_studies import SMALL as STUDY_SMALL  # the same small 0.5B-on-H100 config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
WARMUP = 5


# --------------------------------------------------------------------------- the rule with given constants
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


# --------------------------------------------------------------------------- the KL threshold
def test_kl_threshold_is_calibrated_on_the_runs_stable_by_reward_and_loss():
    cfg = Instability(warmup_steps=WARMUP, reward_drop=0.5, reward_window=5, recover_window=5, kl_max=0.5)
    runs = {
        "calm": series(40, kl={10: 0.2, 3: 9.0}),             # stable; its 9.0 is in the warm-up: not counted
        "drifting": series(40, kl={25: 0.7}),                 # stable by reward: its 0.7 is the largest stable KL
        "falls": series(40, reward={t: 0.05 for t in range(20, 40)}, kl={30: 40.0}),   # reward collapse: not used
        "nan": series(40, loss={12: math.nan}, kl={14: 30.0}),                         # loss collapse: not used
        # falling when it ends (too late to be confirmed): neither stable nor collapsed, not used
        "late": series(40, reward={t: 0.05 for t in range(34, 40)}, kl={36: 20.0}),
    }
    # with the config's kl_max = 0.5 the drifting run would count as collapsed: calibration turns KL off first
    assert detect_collapse(runs["drifting"], cfg)[0] == 25
    cal = calibrate_kl(runs, cfg, factor=2.0)
    assert cal.threshold == pytest.approx(1.4) and cal.largest_stable_kl == pytest.approx(0.7)
    assert detect_collapse(runs["late"], without_kl(cfg)) == (None, None)     # stable by reward and loss alone
    assert cal.at == "drifting" and cal.stable_runs == 2 and cal.falling == 1 and cal.runs == 5
    assert calibrate_kl(runs, cfg, factor=3.0).threshold == pytest.approx(2.1)
    # no stable run: no threshold, the KL criterion stays off
    none = calibrate_kl({"falls": runs["falls"]}, cfg)
    assert none.threshold is None and none.stable_runs == 0


# --------------------------------------------------------------------------- the logistic fit
def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(7)
    n = 20_000
    X = np.column_stack([rng.uniform(-7, -3, n), np.log(rng.choice([1, 2, 4, 8, 16], n)), rng.normal(0, 1, n)])
    truth = np.array([12.0, 2.5, 1.5, -0.7])                     # intercept, log_lr, log_S, a third feature
    y = rng.uniform(size=n) < 1 / (1 + np.exp(-(truth[0] + X @ truth[1:])))
    fit = fit_logistic(X, y, ("log_lr", "log_S", "x"), ridge=1.0)
    se = fit.standard_errors()
    for name, value, true in zip(("intercept", "log_lr", "log_S", "x"), (fit.intercept, *fit.coef), truth):
        assert abs(value - true) < 4 * se[name], name               # within 4 standard errors
        assert value == pytest.approx(true, rel=0.1), name
    # separable data stay finite under the ridge; one class gives the smoothed rate
    sep = fit_logistic(np.arange(10.0)[:, None], np.arange(10) >= 5, ("x",))
    assert math.isfinite(sep.coef[0]) and sep.coef[0] > 0 and sep.proba(np.array([[2.0]]))[0] < 0.5
    flat = fit_logistic(np.ones((3, 1)), [0, 0, 0], ("x",))
    assert flat.constant and flat.proba(np.array([[1.0]]))[0] == pytest.approx(0.5 / 4)
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))


LRS = tuple(1e-3 * 2 ** (k / 2) for k in range(12))


def counts_grid(exponent, seeds=4, lags=(1, 2, 4, 8, 16), slope=3.0, edge=1e-2):
    """Collapse outcomes with no sampling noise: in each (S, lr) cell, round(seeds x P) of the seeds collapse,
    P = σ(slope·(log lr - log edge - exponent·log S)), i.e. the largest stable lr is edge·S^exponent."""
    rows = []
    for S in lags:
        for lr in LRS:
            p = 1 / (1 + math.exp(-slope * (math.log(lr) - math.log(edge) - exponent * math.log(S))))
            k = round(seeds * p)
            for seed in range(seeds):
                rows.append({"run": f"{S}-{lr:.4g}-{seed}", "seed": seed, "S": S, "lr": lr, "T": 60,
                             "collapsed": seed < k})
    return pd.DataFrame(rows)


def random_grid(exponent, seeds, rng, lags=(1, 2, 4, 8, 16), slope=3.0, edge=1e-2, horizons=None, kt=0.0):
    """Outcomes drawn from that logistic (a run's horizons share one uniform draw, as prefixes of one run)."""
    rows = []
    for seed in range(seeds):
        for S in lags:
            for lr in LRS:
                u = rng.uniform()
                for T in (horizons or (60,)):
                    z = slope * (math.log(lr) - math.log(edge) - exponent * math.log(S) - kt * math.log(T / 60))
                    rows.append({"run": f"{S}-{lr:.4g}-{seed}", "seed": seed, "S": S, "lr": lr, "T": T,
                                 "collapsed": bool(u < 1 / (1 + math.exp(-z)))})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("make,truth", [
    (lambda: counts_grid(-1.0), -1.0),
    (lambda: random_grid(-1.0, 6, np.random.default_rng(3)), -1.0),
], ids=["counts", "drawn"])
def test_exponent_interval_contains_minus_one_when_the_rule_holds(make, truth):
    a = check.analyse(make(), n_boot=300, seed=1)
    assert a.k.contains(truth) and not a.k.contains(0.0) and a.k.low < a.k.value < a.k.high
    assert a.k.value == pytest.approx(truth, abs=0.15)
    assert a.verdict_kind == "rule" and a.staleness_effect and "consistent with the rule" in a.verdict


@pytest.mark.parametrize("make", [lambda: counts_grid(0.0), lambda: random_grid(0.0, 6, np.random.default_rng(4))],
                         ids=["counts", "drawn"])
def test_exponent_interval_contains_zero_without_an_s_effect(make):
    a = check.analyse(make(), n_boot=300, seed=1)
    assert a.k.contains(0.0) and not a.k.contains(-1.0)
    assert a.verdict_kind == "none" and not a.staleness_effect and "no measurable effect" in a.verdict


def test_horizon_exponent_is_estimated_where_t_varies():
    obs = random_grid(-1.0, 6, np.random.default_rng(5), lags=(1, 4), horizons=(30, 60, 120), kt=-1.0, edge=1.5e-2)
    a = check.analyse(obs, n_boot=300, seed=2)
    assert a.horizon_varied and a.k_T is not None
    assert a.k_T.contains(-1.0) and not a.k_T.contains(0.0) and a.k.contains(-1.0)
    assert "lr and T, no S" in a.scores["seed"].index


def test_rule_beats_the_baselines_when_s_matters():
    a = check.analyse(counts_grid(-1.0), n_boot=0)
    for split in ("seed", "S"):
        s = a.scores[split]
        assert set(s.index) == {"majority class", "lr only", "S only", check.RULE}
        assert (s["n"] == 5 * 12 * 4).all()                         # every observation predicted, on the same split
        rule = s.loc[check.RULE]
        for baseline in ("majority class", "lr only", "S only"):
            assert rule["accuracy"] > s.loc[baseline, "accuracy"] + 0.05, (split, baseline)
            assert rule["log_loss"] < s.loc[baseline, "log_loss"], (split, baseline)


def test_lr_only_wins_when_the_s_effect_does_not_repeat_across_seeds():
    # Seeds 1-3 collapse at lr >= 8e-3 whatever S; seed 0 collapses at lr >= 8e-3 / S. The S effect is one seed's,
    # so a fit with S, trained with seed 0, mispredicts the high-S runs of seeds 1-3 just below 8e-3.
    rows = []
    for seed in range(4):
        for S in (1, 2, 4, 8, 16):
            for lr in LRS:
                edge = 8e-3 / S if seed == 0 else 8e-3
                rows.append({"run": f"{S}-{lr:.4g}-{seed}", "seed": seed, "S": S, "lr": lr, "T": 60,
                             "collapsed": lr >= edge * 0.999})
    a = check.analyse(pd.DataFrame(rows), n_boot=0)
    s = a.scores["seed"]
    assert s.loc["lr only", "accuracy"] > s.loc[check.RULE, "accuracy"]
    assert s.loc["lr only", "log_loss"] < s.loc[check.RULE, "log_loss"]
    for baseline in ("majority class", "S only"):
        assert s.loc["lr only", "accuracy"] > s.loc[baseline, "accuracy"] + 0.2


def test_no_s_effect_gives_s_nothing_to_add():
    # The same outcomes at every S: the fit with S equals the lr-only fit (c_S = 0), on every held-out split.
    a = check.analyse(counts_grid(0.0), n_boot=0)
    assert a.rule.get("log_S") == pytest.approx(0.0, abs=1e-9)
    for split in ("seed", "S"):
        s = a.scores[split]
        assert s.loc[check.RULE, "accuracy"] == pytest.approx(s.loc["lr only", "accuracy"])
        assert s.loc[check.RULE, "log_loss"] == pytest.approx(s.loc["lr only", "log_loss"], abs=1e-9)
        assert s.loc["S only", "accuracy"] == pytest.approx(s.loc["majority class", "accuracy"])


# --------------------------------------------------------------------------- fit files and the rule of a config
def fit_file(path: Path, staleness_effect: bool, edge: float = 2.5e-3, exponent: float = -1.0,
             no_s_edge: float = 2e-3) -> Path:
    """A fit.json whose largest stable lr (T = 100, not varied) is edge·S^exponent with S, no_s_edge without."""
    coef = {"intercept": -math.log(edge), "log_lr": 1.0, "log_S": -exponent, "log_T": None}
    k = (exponent, exponent - 0.2, exponent + 0.2) if staleness_effect else (-0.05, -0.3, 0.2)
    write_fit(path, {"source": "test", "staleness_statistic": "max", "kl_threshold": {"value": 1.5},
                     "rule": {"coefficients": coef,
                              "coefficients_without_S": {"intercept": -math.log(no_s_edge), "log_lr": 1.0,
                                                         "log_T": None},
                              "staleness_effect": staleness_effect, "verdict": "test",
                              "staleness_exponent": dict(zip(("value", "low", "high"), k)),
                              "range": {"lr": [1e-4, 1e-2], "S": [1, 16], "T": [100, 100]}}})
    return path


def test_fit_file_round_trip_and_predictions(tmp_path):
    fit = read_fit(fit_file(tmp_path / "fit.json", True))
    assert isinstance(fit, StabilityFit) and fit.staleness_effect and fit.kl_threshold == 1.5
    p = fit.predict(1e-3, 4, 100)
    assert p.max_stable_lr == pytest.approx(2.5e-3 / 4) and not p.stable and p.binding == "fit"
    assert p.collapse_probability == pytest.approx(1 / (1 + 2.5e-3 / 4 / 1e-3))   # σ(log(lr/η*)) with c_lr = 1
    assert fit.predict(1e-3, 2, 100).stable and not fit.predict(1e-3, 2, 100).notes
    sync = fit.predict(1e-3, 0, 100)                                     # below the fit's S range: as S = 1
    assert sync.max_stable_lr == pytest.approx(2.5e-3) and "predicted as S = 1" in sync.notes[0]
    assert any("T = 50" in n for n in fit.predict(1e-3, 2, 50).notes)   # one horizon fitted: said so
    assert fit.with_probability(0.1).predict(1e-3, 2, 100).max_stable_lr == pytest.approx(2.5e-3 / 2 / 9)

    flat = read_fit(fit_file(tmp_path / "flat.json", False))
    for S in (1, 4, 16):                                                  # no S effect: the bound without S
        p = flat.predict(1e-3, S, 100)
        assert p.max_stable_lr == pytest.approx(2e-3) and p.binding == "fit without S"

    (tmp_path / "old.json").write_text(json.dumps({"schema": "stalecast.stability-fit/1", "constants": {}}))
    with pytest.raises(ValueError, match="old.json: not a stability fit file.*older study"):
        read_fit(tmp_path / "old.json")


def test_rule_from_config(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    assert rule_from_config(parse_config(data)) is None                 # not known
    known = parse_config({**data, "stability": {"r_batch": 0.2, "g_upd": 10, "r_crit": 5}})
    assert rule_from_config(known) == StabilityConstants(0.2, 10.0, 5.0, 1.0)
    fit_file(tmp_path / "fit.json", True)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**data, "stability": {"fit": "fit.json", "collapse_probability": 0.2}}))
    rule = rule_from_config(load_config(cfg_path))
    assert isinstance(rule, StabilityFit) and rule.probability == 0.2
    with pytest.raises(ConfigError, match=r"stability: give all of r_batch, g_upd and r_crit \(only r_batch given\)"):
        parse_config({**data, "stability": {"r_batch": 0.2}})
    with pytest.raises(ConfigError, match="not both"):
        cfg_path.write_text(yaml.safe_dump({**data, "stability": {"fit": "fit.json", "r_batch": 1, "g_upd": 1,
                                                                  "r_crit": 1}}))
        load_config(cfg_path)
    cfg_path.write_text(yaml.safe_dump({**data, "stability": {"fit": "absent.json"}}))
    with pytest.raises(ConfigError, match="stability.fit: file not found: absent.json"):
        load_config(cfg_path)


def test_simulate_prints_the_rule_from_constants_and_from_a_fit(tmp_path, capsys):
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

    fit = fit_file(tmp_path / "fit.json", True)
    assert main(["simulate", str(TINY), "--steps", "20", "--no-sync-baseline", "--out", str(tmp_path / "sim2"),
                 "--set", f"stability.fit={fit}", "--set", "stability.horizon=100"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "fitted collapse probability" in printed and "S exponent k = -1.00" in printed
    saved = json.loads((tmp_path / "sim2" / "metrics.json").read_text())["stability"]
    assert saved["binding"] == "fit" and saved["max_stable_lr"] == pytest.approx(2.5e-3 / saved["staleness"])


# --------------------------------------------------------------------------- plan --lr
SMALL = {**STUDY_SMALL, "name": "small-plan", "run": {"steps": 100}}
PLAN = ["--gpus", "6", "--bounds", "1,4", "--steps", "10", "--lr", "1e-3", "--jobs", "1"]


def test_plan_excludes_configurations_unstable_at_the_lr(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(SMALL)))
    fit = fit_file(tmp_path / "fit.json", True)       # largest stable lr 2.5e-3/S: at 1e-3, S <= 2 only
    out = tmp_path / "plan"
    assert main(["plan", str(path), *PLAN, "--stability-fit", str(fit), "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "Stability at learning rate 0.001" in printed and "Largest stable learning rate by bound" in printed
    plan = pd.read_csv(out / "plan.csv")
    ok = plan[plan["status"] == "ok"]
    unstable = ok["staleness/max"] >= 3
    assert unstable.any(), "the S=4 runs should reach staleness 3 or more"
    assert np.allclose(ok["max_stable_lr"], 2.5e-3 / ok["staleness/max"].clip(lower=1))
    assert (ok["stable_at_lr"] == ~unstable).all() and not ok[unstable]["feasible"].any()
    assert f"{unstable.sum()} of {len(ok)} configurations are predicted unstable" in printed
    assert plan[plan["rank"] == 1].iloc[0]["staleness/max"] < 3


def test_plan_without_an_s_effect_applies_the_bound_without_s(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(SMALL)))
    for no_s_edge, excluded in ((2e-3, False), (5e-4, True)):
        fit = fit_file(tmp_path / f"flat-{no_s_edge}.json", False, no_s_edge=no_s_edge)
        out = tmp_path / f"plan-{no_s_edge}"
        assert main(["plan", str(path), *PLAN, "--stability-fit", str(fit), "--out", str(out)]) == 0
        printed = " ".join(capsys.readouterr().out.split())
        assert "found no S dependence" in printed and "applied without S" in printed
        ok = pd.read_csv(out / "plan.csv").query("status == 'ok'")
        assert np.allclose(ok["max_stable_lr"], no_s_edge) and ok["bound"].nunique() == 2   # one bound, every S
        assert (ok["stable_at_lr"] != excluded).all()
        assert ("No configuration meets" in printed) == excluded


def test_plan_lr_needs_a_rule(tmp_path, capsys):
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(SMALL))
    assert main(["plan", str(bare), "--lr", "1e-3", "--out", str(tmp_path / "bare")]) == 2
    assert "--stability-fit" in capsys.readouterr().err
    # the paper's formula with given constants still works: a = 0.0025, so S <= 2 stable at 1e-3
    path = tmp_path / "constants.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(SMALL), "stability": {"r_batch": 0.0025, "g_upd": 1.0,
                                                                          "r_crit": 1.0}}))
    assert main(["plan", str(path), *PLAN, "--out", str(tmp_path / "plan")]) == 0
    plan = pd.read_csv(tmp_path / "plan" / "plan.csv").query("status == 'ok'")
    assert (plan["stable_at_lr"] == (plan["staleness/max"] < 2.5)).all()


# --------------------------------------------------------------------------- the study
EDGE = 8e-3          # the synthetic trainer: a run collapses where lr x S >= EDGE (S = 1 for sync)


def fake_rows(run, steps):
    """A run of the synthetic trainer: reward climbs; KL is 0.01 x (1 + lag) (3.0 at step 2, in the warm-up); a
    collapsing run's KL jumps to 5 at step c - 2 and its reward falls to 0.01 at step c, c = 12 + 6 x seed index."""
    collapse = 12 + 6 * run.seed_index if run.lr * max(run.lag, 1) >= EDGE else None
    rows = []
    for t in range(steps):
        s = min(t, run.lag)
        kl, reward = (3.0 if t == 2 else 0.01 * (1 + s)), 0.2 + 0.002 * t
        if collapse is not None and t >= collapse - 2:
            kl = 5.0
        if collapse is not None and t >= collapse:
            reward = 0.01
        rows.append({"step": t, "reward/mean": reward, "kl/k3": kl, "loss": -0.1, "lr": run.lr,
                     "staleness/hist": {str(s): 64}})
    return rows


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces real training with `fake_rows`: counts calls; `fail` names a run label to fail once."""
    calls = {"n": 0, "fail": None}

    def train(run, scratch, timeout, on_step=None):
        calls["n"] += 1
        if run.label == calls["fail"]:
            calls["fail"] = None
            return {"status": "failed", "error": "TimeoutError: the run passed its time limit", "steps": [],
                    "metrics": {}, "compute_s": 0.0}
        rows = fake_rows(run, run.cfg.run.steps)
        for row in rows:
            if on_step is not None:
                on_step(None, row["step"], row)
        return {"status": "ok", "error": None, "steps": rows, "compute_s": 0.01, "metrics": {"time/step_s": 0.3}}

    monkeypatch.setattr(study, "train_run", train)
    return calls


def test_study_labels_fits_reports_and_resumes(tmp_path, fake_training, capsys):
    out = tmp_path / "study"
    args = ["study", "stability", str(TINY), "--out", str(out), "--bounds", "0,1,2,4", "--lrs", "1e-3,2e-3,4e-3,8e-3",
            "--reps", "2", "--steps", "30", "--horizons", "20,40", "--horizon-bounds", "2", "--boot", "50"]
    fake_training["fail"] = "S=2 lr=0.001 seed#1"
    assert main(args) == 1                                      # one run failed: reported, not stored
    runs = 4 * 4 * 2
    assert fake_training["n"] == runs
    assert "TimeoutError" in (out / "summary.md").read_text()
    assert main(args) == 0                                      # finished runs are not redone; the failed one is
    assert fake_training["n"] == runs + 1
    assert main(args) == 0                                      # everything stored: no training, only the analysis
    assert main([*args, "--analyse-only"]) == 0
    assert fake_training["n"] == runs + 1
    capsys.readouterr()

    for name in ("table.parquet", "table.csv", "fit.json", "collapse_map.png", "collapse_map.svg", "boundary.png",
                 "boundary.svg", "collapse_probability.png", "collapse_probability.svg", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "runs").glob("*.json"))) == runs
    table = pd.read_parquet(out / "table.parquet")
    assert (table["status"] == "ok").all() and table["run"].nunique() == runs
    assert len(table) == runs + 4 * 2 * 2                     # S = 2 runs: labelled at T = 20, 30 and 40
    s2 = table[table["S"] == 2]
    assert (s2["steps_trained"] == 40).all() and sorted(s2["T"].unique()) == [20, 30, 40]
    assert set(table.loc[table["S"] == 0, "mode"]) == {"sync"}
    assert set(table.loc[table["S"] > 0, "mode"]) == {"fixed_lag"}

    # labels: collapsed exactly where lr x max(S, 1) >= EDGE and the collapse (at c - 2 by KL) is inside the horizon
    c = 12 + 6 * table["seed_index"]
    expected = (table["lr"] * table["S"].clip(lower=1) >= EDGE) & (c - 2 < table["T"])
    assert (table["collapsed"] == expected).all()
    assert (table.loc[expected, "collapse_step"] == c[expected] - 2).all()
    assert set(table.loc[expected, "criterion"]) == {"kl"}     # KL fires before the reward's fall is confirmed
    assert table.loc[expected & (table["T"] >= 40), "reward_loss_criterion"].eq("reward").all()

    # KL threshold: twice the largest post-warm-up KL of the runs stable by reward: 0.01 x (1 + 4) at S = 4
    fit = json.loads((out / "fit.json").read_text())
    assert fit["kl_threshold"]["value"] == pytest.approx(2 * 0.05)
    assert fit["kl_threshold"]["largest_stable_kl"] == pytest.approx(0.05)
    assert fit["instability"]["kl_max"] == pytest.approx(0.1)
    full = table[table["T"] == table["steps_trained"]]
    assert fit["collapse_counts"]["first"] == {"reward": 0, "kl": int(full["collapsed"].sum()), "loss": 0}
    assert fit["rule"]["runs"] == 3 * 4 * 2 and fit["rule"]["seeds"] == 2
    assert fit["rule"]["range"] == {"lr": [1e-3, 8e-3], "S": [1, 4], "T": [20, 40]}
    rule = read_fit(out / "fit.json")
    assert rule.kl_threshold == pytest.approx(0.1) and rule.horizon_varied

    summary = (out / "summary.md").read_text()
    assert summary.startswith("# stability study") and "Made by: `stalecast study stability" in summary
    for text in ("32 real training runs", "2 seeds per cell", "KL threshold", "Leave one seed out",
                 "Leave one S out", "majority class", "lr only", "S only", "S exponent of the largest stable lr",
                 "Verdict:", "No GPU was lent"):
        assert text in summary, text


def test_study_analyses_partial_results_without_training(tmp_path, fake_training, capsys):
    out = tmp_path / "partial"
    args = ["study", "stability", str(TINY), "--out", str(out), "--bounds", "1,2", "--lrs", "1e-3,8e-3", "--reps", "2",
            "--steps", "30", "--horizons", "30", "--horizon-bounds", "1", "--boot", "20"]
    assert main([*args, "--analyse-only"]) == 1                 # nothing stored: nothing trained, nothing to fit
    assert fake_training["n"] == 0 and "No run has finished" in (out / "summary.md").read_text()
    assert main([*args, "--reps", "1"]) == 0                    # the first seed (the same runs as seed #0 of 2)
    assert fake_training["n"] == 4
    assert main([*args, "--analyse-only"]) == 1                 # seed #1 not trained yet: partial, said so
    assert fake_training["n"] == 4
    summary = (out / "summary.md").read_text()
    assert "partial results**: 4 of 8 runs not trained yet" in summary and "Verdict:" in summary
    table = pd.read_csv(out / "table.csv")
    assert (table["status"] == "missing").sum() == 4 and (table["seed_index"][table["status"] == "ok"] == 0).all()
    capsys.readouterr()


def test_study_rejects_bad_grids(tmp_path, capsys):
    base = ["study", "stability", str(TINY), "--out", str(tmp_path / "o")]
    assert main([*base, "--schedule", "cosine"]) == 2
    assert "--schedule cosine: unknown 'cosine'" in capsys.readouterr().err
    assert main([*base, "--lrs", "-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main([*base, "--bounds", "0,1", "--horizon-bounds", "4"]) == 2
    assert "4 is not one of --bounds" in capsys.readouterr().err
    assert main([*base, "--reps", "0"]) == 2
    assert "--reps 0: must be at least 1" in capsys.readouterr().err


def test_real_single_run_study(tmp_path):
    """One real training run through the study (the grid runs with the synthetic trainer above)."""
    out = tmp_path / "real"
    assert main(["study", "stability", str(TINY), "--out", str(out), "--bounds", "2", "--lrs", "1e-3",
                 "--reps", "1", "--steps", "4", "--horizons", "4", "--horizon-bounds", "2", "--boot", "0",
                 "--set", "real.warm_start_steps=0"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 1 and table["status"].iloc[0] == "ok" and table["steps"].iloc[0] == 4
    assert table["mode"].iloc[0] == "fixed_lag" and table["staleness/max_seen"].iloc[0] == 2
    assert (out / "summary.md").exists() and (out / "fit.json").exists()
