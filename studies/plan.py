"""`stalecast plan`: how to split a GPU budget between rollout workers and the learner, and which staleness
bound and worker concurrency to run, for the most samples/s within staleness limits.

The search runs short simulations (`--steps`, default 40: enough for the queue and gate to reach steady
state) over lines of (GPUs per worker, concurrency, bound), each line a range of rollout worker counts R
(the learner gets the rest, at least one GPU). Throughput along a line rises while generation is the
bottleneck and falls once training is, so instead of every R:
  1. coarse: `--coarse` evenly spaced R on every line (every R when a line has no more);
  2. prune: lines whose best feasible coarse throughput is below `--keep` of the best line's are dropped;
  3. refine: around each remaining line's best feasible R (and any feasible R within `--tolerance` of it:
     40-step throughputs are noisy and the curves have dips), evaluate a few R inside the bracket of its
     evaluated neighbours, and repeat until both neighbours at distance 1 are evaluated.
Every evaluation goes through the sweep engine (stored under OUT/runs/, so a repeated plan is instant).
The ranking prefers, at equal throughput, lower mean staleness, then the smaller bound and fewer workers.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from sim.config import ConfigError, RunConfig, load_config
from sim.hardware.memory import MemoryReport, memory_report
from sim.outputs import check_out, claim
from sim.stability import StabilityFit, horizon_of, read_fit, rule_from_config
from sim.workload import workload_lengths
from studies import plots
from studies.named import add_backend_options, add_spec_options, add_study_out_options, bound_overrides, check_spec
from studies.sweep import Backend, Sweep, run_sweep

THROUGHPUT, MEAN, P99 = "throughput/samples_per_s", "staleness/mean", "staleness/p99"


@dataclass
class PlanSpec:
    gpus: int | None = field(default=None, metadata={"help": "GPU budget (default: the config's total GPUs)",
                                                     "min": 2, "why": "one for the learner, one for a rollout worker"})
    max_mean_staleness: float | None = field(default=None, metadata={"help": "largest acceptable mean staleness "
                                                                             "(versions)", "min": 0})
    max_p99_staleness: float | None = field(default=None, metadata={"help": "largest acceptable p99 staleness "
                                                                            "(versions)", "min": 0})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate the run will use: configurations the stability rule predicts unstable at it are "
                "excluded (needs the rule: --stability-fit or the config's stability section)",
        "gt": 0})
    stability_fit: str | None = field(default=None, metadata={
        "help": "fit.json from `stalecast study stability`, for --lr (default: the config's stability section)"})
    tp: list[int] | None = field(default=None, metadata={
        "help": "GPUs per rollout worker (tensor-parallel degree) to try, e.g. 1,2,4,8 (default: the config's "
                "gpus_per_worker, or 1,2,4,8 when the policy does not fit it)", "min": 1})
    bounds: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "staleness bounds to try",
                                                                                "min": 0})
    concurrency: list[int] | None = field(default=None, metadata={
        "help": "worker max_concurrency values to try (default: the config's)", "min": 1})
    steps: int = field(default=40, metadata={"help": "learner steps per search run", "min": 1})
    top: int = field(default=5, metadata={"help": "configurations to list", "min": 1})
    coarse: int = field(default=8, metadata={"help": "rollout worker counts per line in the coarse pass", "min": 2,
                                             "why": "the refining passes search between the coarse counts"})
    refine: int = field(default=3, metadata={"help": "new worker counts per line in each refining pass", "min": 1})
    tolerance: float = field(default=0.05, metadata={
        "help": "also refine around feasible counts within this fraction of a line's best throughput",
        "min": 0, "lt": 1})
    keep: float = field(default=0.6, metadata={
        "help": "refine only lines whose best coarse throughput reaches this fraction of the best line's",
        "gt": 0, "max": 1})

    def __post_init__(self):
        check_spec(self)
        if self.stability_fit is not None:
            if self.lr is None:
                raise ConfigError(f"--stability-fit {self.stability_fit}: only used with --lr (the learning rate "
                                  f"whose unstable configurations it excludes); add --lr or leave it out")
            if not Path(self.stability_fit).is_file():
                raise ConfigError(f"--stability-fit {self.stability_fit}: file not found")


@dataclass
class Plan:
    table: pd.DataFrame       # every evaluated configuration, ranked (rank NaN when infeasible)
    best: pd.Series | None
    notes: list[str]
    runs: int                 # configurations evaluated
    seconds: float


# --------------------------------------------------------------------------- the search
class _Search:
    def __init__(self, spec: PlanSpec, cfg: RunConfig, out: Path, backend: Backend, console: Console | None):
        cl = cfg.cluster
        if cl.colocated:
            raise ConfigError("plan splits GPUs between workers and learner: the config is colocated")
        self.spec, self.cfg, self.out, self.backend, self.console = spec, cfg, out, backend, console
        self.budget = spec.gpus or cl.total_gpus
        # a bound axis where the policy has a bound (`studies.named.bound_overrides` sets it in the policy's knob)
        has_bound = cfg.pipeline.mode == "async" and cfg.pipeline.staleness_control != "none"
        self.bounds = spec.bounds if has_bound else [cfg.pipeline.max_staleness]
        try:
            self.lengths = workload_lengths(cfg.workload)
        except ValueError as exc:  # an empirical trace that cannot be read
            raise ConfigError(str(exc)) from None
        self.tp_note = None
        tps = spec.tp or self.default_tps()
        tps = [tp for tp in tps if self.budget - tp >= 1]
        if not tps:
            raise ConfigError(f"a budget of {self.budget} GPUs leaves no GPU for the learner")
        # GPU memory of every split; those that do not fit are listed, never simulated (hardware.memory.check).
        self.memory: dict[tuple, MemoryReport | None] = {}
        self.excluded: dict[tuple, str] = {}  # (tp, workers) -> why it does not fit
        for tp in tps:
            for workers in range(1, self.max_workers(tp) + 1):
                report = memory_report(cfg, self.lengths, tp, workers, self.budget - workers * tp)
                self.memory[(tp, workers)] = report
                if report is not None and not report.feasible and cfg.hardware.memory.check:
                    self.excluded[(tp, workers)] = report.reason
        fitting = [tp for tp in tps if any(self.fits(tp, w) for w in range(1, self.max_workers(tp) + 1))]
        if not fitting:  # the split with the most learner GPUs (one worker) is each TP's closest to fitting
            reasons = "; ".join(f"{tp} GPU(s) per worker: {self.excluded[(tp, 1)]}" for tp in tps)
            raise ConfigError(f"no split of {self.budget} GPUs fits in GPU memory (hardware.memory): {reasons}")
        self.lines = [(tp, c, s) for tp in fitting for c in (spec.concurrency or [cl.max_concurrency])
                      for s in self.bounds]
        self.rows: dict[tuple, dict] = {}  # (tp, concurrency, bound, workers) -> table row
        self.seconds = 0.0
        self.rule = stability_rule(spec, cfg) if spec.lr is not None else None
        self.horizon = horizon_of(cfg)

    def prediction(self, row: dict):
        """The stability rule at the plan's lr, this configuration's simulated staleness (the rule's statistic, the
        maximum by default) and the config's horizon (None without --lr)."""
        if self.rule is None or row["status"] != "ok":
            return None
        return self.rule.predict(self.spec.lr, row[f"staleness/{self.rule.statistic}"], self.horizon)

    def default_tps(self) -> list[int]:
        """The config's GPUs per worker when a worker fits them; else 1, 2, 4 and 8 (within a node) and the config's."""
        cl = self.cfg.cluster
        own = memory_report(self.cfg, self.lengths, cl.gpus_per_worker, 1, max(1, self.budget - cl.gpus_per_worker))
        if own is None or own.rollout.feasible or not self.cfg.hardware.memory.check:
            return [cl.gpus_per_worker]
        self.tp_note = (f"The config's {cl.gpus_per_worker} GPU(s) per worker cannot hold the policy "
                        f"({own.rollout.problem}), so 1, 2, 4 and 8 GPUs per worker were searched.")
        return sorted({1, 2, 4, 8, cl.gpus_per_worker})

    def fits(self, tp: int, workers: int) -> bool:
        """Whether the split fits in GPU memory (or is not checked)."""
        return (tp, workers) not in self.excluded

    def max_workers(self, tp: int) -> int:
        """The most workers of tp GPUs the budget allows (whether or not they fit in memory)."""
        return (self.budget - 1) // tp

    def overrides(self, tp: int, conc: int, bound: int, workers: int) -> dict:
        pl = self.cfg.pipeline
        return {"cluster.gpus_per_worker": tp, "cluster.rollout_workers": workers,
                "cluster.learner_gpus": self.budget - workers * tp, "cluster.max_concurrency": conc,
                **bound_overrides(pl.staleness_control, pl.knobs(), bound, self.cfg.workload.batch_prompts)}

    def evaluate(self, keys: list[tuple], label: str, sync: bool = False) -> None:
        points = [self.overrides(*k) for k in keys]
        sweep = Sweep(self.cfg, points, reps=1, steps=self.spec.steps, sync_baseline=sync,
                      sync_steps=min(self.spec.steps, 20))
        result = run_sweep(sweep, self.out, self.backend, self.console, label=label)
        self.seconds += result.seconds
        for k, (_, row) in zip(keys, result.table.iterrows()):
            report = self.memory.get((k[0], k[3]))
            memory = {"memory": report.reason, **report.columns()} if report is not None else {}
            self.rows[k] = {"tp": k[0], "concurrency": k[1], "bound": k[2], "rollout_workers": k[3],
                            "rollout_gpus": k[0] * k[3], "learner_gpus": self.budget - k[0] * k[3], **row.to_dict(),
                            **memory}

    def excluded_rows(self) -> list[dict]:
        """One table row per split left out for memory (its concurrency and bound do not matter)."""
        return [{"tp": tp, "concurrency": np.nan, "bound": np.nan, "rollout_workers": w, "rollout_gpus": tp * w,
                 "learner_gpus": self.budget - tp * w, "status": "infeasible", "memory": reason}
                for (tp, w), reason in sorted(self.excluded.items())]

    def feasible(self, row: dict) -> bool:
        s = self.spec
        return (row["status"] == "ok" and (s.max_mean_staleness is None or row[MEAN] <= s.max_mean_staleness)
                and (s.max_p99_staleness is None or row[P99] <= s.max_p99_staleness)
                and (self.rule is None or self.prediction(row).stable))

    def line_best(self, line: tuple) -> tuple[int | None, float]:
        """The best feasible worker count evaluated on a line, and its throughput."""
        scored = [(self.score(row), k[3]) for k, row in self.rows.items() if k[:3] == line and self.feasible(row)]
        if not scored:
            return None, -np.inf
        score, workers = max(scored)
        return workers, score[0]

    @staticmethod
    def score(row: dict) -> tuple:
        """Higher is better: throughput, then lower staleness, then smaller bound and fewer workers."""
        return (row[THROUGHPUT], -row[MEAN], -row["bound"], -row["rollout_workers"])

    def refinements(self, line: tuple) -> set[int]:
        """Worker counts to evaluate next on a line: a few inside the bracket (nearest evaluated counts either
        side) of every feasible count within `tolerance` of the line's best, so that short-run noise or a
        dip in throughput does not stop the search at a neighbour of the optimum."""
        _, best = self.line_best(line)
        done = sorted(k[3] for k in self.rows if k[:3] == line)
        picks = set()
        for i, workers in enumerate(done):
            row = self.rows[(*line, workers)]
            if not self.feasible(row) or row[THROUGHPUT] < (1 - self.spec.tolerance) * best:
                continue
            lo = done[i - 1] if i > 0 else workers
            hi = done[i + 1] if i + 1 < len(done) else workers
            inside = [r for r in range(lo + 1, hi) if r not in done and self.fits(line[0], r)]
            if inside:
                at = np.unique(np.round(np.linspace(0, len(inside) - 1, min(self.spec.refine, len(inside)))))
                picks |= {inside[int(j)] for j in at}
        return picks

    def run(self) -> None:
        coarse = []
        for line in self.lines:
            top = self.max_workers(line[0])
            counts = np.unique(np.round(np.linspace(1, top, min(self.spec.coarse, top))).astype(int))
            fitting = [r for r in range(1, top + 1) if self.fits(line[0], r)]
            # a count that does not fit in memory moves to the nearest one that does
            counts = sorted({min(fitting, key=lambda f: (abs(f - int(r)), f)) for r in counts})
            coarse += [(*line, int(r)) for r in counts]
        self.evaluate(coarse, "plan: coarse pass")
        bests = {line: self.line_best(line) for line in self.lines}
        top_throughput = max(t for _, t in bests.values())
        active = [line for line, (w, t) in bests.items() if w is not None and t >= self.spec.keep * top_throughput]
        while True:
            batch = set()
            for line in active:
                batch |= {(*line, r) for r in self.refinements(line)}
            if not batch:
                return
            self.evaluate(sorted(batch), "plan: refining")


def stability_rule(spec: PlanSpec, cfg: RunConfig):
    """The rule for --lr (a `StabilityFit` or `StabilityConstants`): --stability-fit, else the config's stability
    section."""
    try:
        if spec.stability_fit:
            rule = read_fit(spec.stability_fit).with_probability(cfg.stability.collapse_probability)
        else:
            rule = rule_from_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if rule is None:
        raise ConfigError(f"--lr {spec.lr:g}: excluding configurations unstable at it needs the stability rule: "
                          f"pass --stability-fit FILE (fit.json of `stalecast study stability`) or set the config's "
                          f"stability section (fit, or r_batch, g_upd and r_crit)")
    return rule


def plan(spec: PlanSpec, cfg: RunConfig, out: Path, backend: Backend, console: Console | None = None,
         force: bool = False) -> Plan:
    search = _Search(spec, cfg, out, backend, console)  # rejects a config it cannot plan before --out is touched
    claim(out, "plan", force)
    search.run()
    ranked = sorted((k for k, row in search.rows.items() if search.feasible(row)),
                    key=lambda k: search.score(search.rows[k]), reverse=True)
    if ranked:  # speedup over sync for the listed configurations only: their async runs are stored
        search.evaluate(ranked[: spec.top], "plan: sync baselines", sync=True)
    table = pd.DataFrame(search.rows.values())
    if search.rule is not None:
        predictions = [search.prediction(row) for row in search.rows.values()]
        table["max_stable_lr"] = [p.max_stable_lr if p else None for p in predictions]
        table["stable_at_lr"] = [p.stable if p else None for p in predictions]
        table["collapse_probability"] = [p.collapse_probability if p else None for p in predictions]
    table["feasible"] = [search.feasible(row) for row in search.rows.values()]
    order = {k: i + 1 for i, k in enumerate(ranked)}
    table["rank"] = [order.get(k) for k in search.rows]
    if search.excluded:  # the splits left out for memory, with their reason
        excluded = pd.DataFrame(search.excluded_rows()).assign(feasible=False, rank=np.nan)
        table = pd.concat([table, excluded], ignore_index=True)
        table[["concurrency", "bound"]] = table[["concurrency", "bound"]].astype("Int64")  # empty where left out
    table["pareto"] = pareto_mask(table)
    table = table.sort_values("rank", na_position="last").reset_index(drop=True)
    best = table.iloc[0] if ranked else None
    runs = len(search.rows)
    return Plan(table, best, explain(table, best, spec, search), runs, search.seconds)


def pareto_mask(table: pd.DataFrame) -> np.ndarray:
    """Successful points no other point beats on both throughput (higher) and mean staleness (lower)."""
    ok = (table["status"] == "ok").to_numpy()
    thr, stale = table[THROUGHPUT].to_numpy(float), table[MEAN].to_numpy(float)
    mask = np.zeros(len(table), bool)
    for i in np.flatnonzero(ok):
        beaten = ok & (thr >= thr[i]) & (stale <= stale[i]) & ((thr > thr[i]) | (stale < stale[i]))
        mask[i] = not beaten.any()
    return mask


# --------------------------------------------------------------------------- explaining the choice
def explain(table: pd.DataFrame, best: pd.Series | None, spec: PlanSpec, search: _Search) -> list[str]:
    notes = []
    if best is None:
        limits = "the staleness limits and the stability rule" if search.rule is not None else "the staleness limits"
        notes.append(f"No configuration meets {limits}: loosen them, lower the learning rate or add GPUs.")
    else:
        t, r = best["idle/trainer"], best["idle/rollout"]
        where = (f"{best['rollout_workers']:.0f} worker(s) x {best['tp']:.0f} GPU(s) generate, "
                 f"{best['learner_gpus']:.0f} GPU(s) train, bound S={best['bound']:.0f}, "
                 f"concurrency {best['concurrency']:.0f}")
        if t > max(r, 0.1):
            side = f"generation is the bottleneck: the learner waits for data {t:.0%} of the time"
        elif r > max(t, 0.1):
            side = f"training is the bottleneck: workers have nothing in flight {r:.0%} of their time"
        else:
            side = f"the two sides are balanced (learner idle {t:.0%}, rollout idle {r:.0%})"
        notes.append(f"Recommended: {where}, for {best[THROUGHPUT]:.1f} samples/s at mean staleness "
                     f"{best[MEAN]:.2f} (p99 {best[P99]:.0f}); {side}.")
        same_line = table[(table["tp"] == best["tp"]) & (table["concurrency"] == best["concurrency"])
                          & (table["bound"] == best["bound"])].set_index("rollout_workers")
        for step, word in ((-1, "fewer"), (1, "more")):
            w = best["rollout_workers"] + step
            if w in same_line.index and same_line.loc[w, "status"] == "ok":
                n = same_line.loc[w]
                notes.append(f"One worker {word}: {n[THROUGHPUT]:.1f} samples/s (learner idle {n['idle/trainer']:.0%}, "
                             f"rollout idle {n['idle/rollout']:.0%}).")
        others = table[(table["status"] == "ok") & (table["bound"] != best["bound"])]
        for bound, group in others.groupby("bound"):
            feasible = group[group["feasible"]]
            if feasible.empty:
                top = group.loc[group[THROUGHPUT].idxmax()]
                notes.append(f"S={bound:.0f}: every configuration tried breaks the staleness limits (fastest "
                             f"{top[THROUGHPUT]:.1f} samples/s at mean staleness {top[MEAN]:.2f}).")
            else:
                top = feasible.loc[feasible[THROUGHPUT].idxmax()]
                notes.append(f"Best at S={bound:.0f}: {top[THROUGHPUT]:.1f} samples/s "
                             f"({100 * (top[THROUGHPUT] / best[THROUGHPUT] - 1):+.0f} %) at mean staleness "
                             f"{top[MEAN]:.2f}, {top['rollout_workers']:.0f} workers.")
        if pd.notna(best.get("speedup/vs_sync")):
            notes.append(f"Speedup over the sync pipeline on the same split: {best['speedup/vs_sync']:.2f}x.")
    if search.cfg.pipeline.mode != "async":
        notes.append(f"pipeline.mode is {search.cfg.pipeline.mode}: staleness bounds do not apply, so only splits "
                     f"and concurrency were searched.")
    if best is not None:
        notes += memory_notes(best, search)
    if search.tp_note:
        notes.append(search.tp_note)
    notes += excluded_notes(search)
    if search.rule is not None:
        notes.append(stability_note(table, spec, search))
    return notes


def memory_notes(best: pd.Series, search: _Search) -> list[str]:
    """The recommended split's GPU memory, and a caveat when its concurrency is above what its KV budget holds."""
    report = search.memory.get((int(best["tp"]), int(best["rollout_workers"])))
    if report is None:
        return []
    note = report.concurrency_note(int(best["concurrency"]))
    return [f"Memory of the recommendation: {report.summary()}."] + ([f"Its {note}."] if note else [])


def excluded_notes(search: _Search) -> list[str]:
    """The splits left out for GPU memory, per GPUs per worker: a run of worker counts and the reason of its split
    closest to fitting (the most learner GPUs)."""
    notes = []
    for tp in sorted({tp for tp, _ in search.excluded}):
        counts = sorted(w for t, w in search.excluded if t == tp)
        if len(counts) == search.max_workers(tp):
            notes.append(f"Left out (GPU memory), {tp} GPU(s) per worker, every split: {search.excluded[(tp, 1)]}.")
            continue
        runs, start = [], counts[0]
        for prev, cur in zip(counts, [*counts[1:], None]):
            if cur != prev + 1:
                runs.append((start, prev))
                start = cur
        for lo, hi in runs:
            workers = f"{lo} worker(s)" if lo == hi else f"{lo}-{hi} workers"
            learner = search.budget - lo * tp
            gpus = f"{learner}" if lo == hi else f"{search.budget - hi * tp}-{learner}"
            notes.append(f"Left out (GPU memory), {tp} GPU(s) per worker, {workers} ({gpus} learner GPUs): "
                         f"{search.excluded[(tp, lo)]}.")
    return notes


def stability_note(table: pd.DataFrame, spec: PlanSpec, search: _Search) -> str:
    """How many configurations the rule excluded at the plan's lr, and the largest stable lr per bound (one bound
    for all when the fit found no S dependence)."""
    rule = search.rule
    ok = table[table["status"] == "ok"]
    unstable = ok[~ok["stable_at_lr"].astype(bool)]
    excluded = (f"{len(unstable)} of {len(ok)} configurations are predicted unstable at it and excluded "
                f"(bounds {', '.join(f'{b:.0f}' for b in sorted(unstable['bound'].unique()))})"
                if len(unstable) else f"none of the {len(ok)} configurations is predicted unstable at it")
    where = f"S = {rule.statistic} simulated staleness, T = {search.horizon} steps"
    if isinstance(rule, StabilityFit) and not rule.staleness_effect:
        k, lo, hi = rule.exponent
        limit = ok["max_stable_lr"].min() if len(ok) else float("nan")
        text = (f"Stability at learning rate {spec.lr:g}: the stability fit found no S dependence (its S exponent "
                f"{k:.2f}, 95 % interval [{lo:.2f}, {hi:.2f}], contains 0), so the lr bound is applied without S: "
                f"largest stable learning rate {limit:.3g} at T = {search.horizon} steps, for every bound; {excluded}.")
    else:
        per_bound = ", ".join(f"S={bound:.0f}: {group['max_stable_lr'].min():.3g}"
                              for bound, group in ok.groupby("bound"))
        text = (f"Stability at learning rate {spec.lr:g} ({rule.describe()}; {where}): {excluded}. "
                f"Largest stable learning rate by bound: {per_bound}.")
    caveats = sorted({n for row in search.rows.values() if (p := search.prediction(row)) for n in p.notes})
    if caveats:
        text += " Caveats: " + "; ".join(caveats) + "."
    return text


# --------------------------------------------------------------------------- output
def print_plan(result: Plan, spec: PlanSpec, budget: int, console: Console) -> None:
    limits = [f"mean staleness <= {spec.max_mean_staleness:g}" if spec.max_mean_staleness is not None else None,
              f"p99 staleness <= {spec.max_p99_staleness:g}" if spec.max_p99_staleness is not None else None]
    limits = [x for x in limits if x] or ["no staleness limit"]
    table = Table(title=f"top configurations for {budget} GPUs ({', '.join(limits)}; {spec.steps} steps per run)",
                  caption="rollout: workers x GPUs each; idle L/R: learner / rollout idle", show_edge=False)
    for col in ("#", "rollout", "learner", "S", "conc.", "samples/s", "stale mean", "p99", "idle L", "idle R",
                "vs sync"):
        table.add_column(col, justify="right")
    for _, row in result.table[result.table["rank"].notna()].head(spec.top).iterrows():
        speedup = row.get("speedup/vs_sync")
        table.add_row(f"{row['rank']:.0f}", f"{row['rollout_workers']:.0f}x{row['tp']:.0f}",
                      f"{row['learner_gpus']:.0f}", f"{row['bound']:.0f}", f"{row['concurrency']:.0f}",
                      f"{row[THROUGHPUT]:.1f}", f"{row[MEAN]:.2f}", f"{row[P99]:.0f}", f"{row['idle/trainer']:.0%}",
                      f"{row['idle/rollout']:.0%}", "n/a" if pd.isna(speedup) else f"{speedup:.2f}x")
    console.print(table)
    for note in result.notes:
        console.print(note, highlight=False)


def write_plan(result: Plan, cfg: RunConfig, spec: PlanSpec, out: Path) -> list[Path]:
    paths = []
    for ext, write in (("parquet", result.table.to_parquet), ("csv", result.table.to_csv)):
        paths.append(out / f"plan.{ext}")
        write(paths[-1], index=False)
    ok = result.table[result.table["status"] == "ok"].sort_values("bound")
    ok = ok.assign(bound=[f"S={b:.0f}" for b in ok["bound"]])
    if not ok.empty:
        paths += plots.pareto(ok, ok[ok["pareto"]], result.best, "bound", spec.max_mean_staleness,
                              f"{cfg.name}: {spec.gpus or cfg.cluster.total_gpus} GPUs, every evaluated split",
                              out, "pareto")
    inputs = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(spec).items() if v is not None)
    (out / "plan.md").write_text("\n\n".join([f"# plan: {cfg.name}", f"Inputs: {inputs}.", *result.notes]) + "\n")
    return [*paths, out / "plan.md"]


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from sim.cli import parse_overrides

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlanSpec) if getattr(args, f.name) is not None}
    spec = PlanSpec(**values)
    cfg = load_config(args.config, parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-plan"
    check_out(out, args.force)
    with Backend(jobs=args.jobs, ray=args.ray) as backend:
        result = plan(spec, cfg, out, backend, console, args.force)
    print_plan(result, spec, spec.gpus or cfg.cluster.total_gpus, console)
    paths = write_plan(result, cfg, spec, out)
    console.print(f"searched {result.runs} configurations in {result.seconds:.1f} s on {backend.name}; "
                  f"wrote {out}/: " + ", ".join(p.name for p in paths))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="recommend a rollout/learner split, staleness bound and concurrency",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML: the workload, model and hardware (see examples/)")
    add_study_out_options(p, "default runs/NAME-plan")
    add_spec_options(p, PlanSpec)
    add_backend_options(p)
    p.set_defaults(func=cmd_plan)
