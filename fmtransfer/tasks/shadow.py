"""``shadow``: run a candidate model beside the production model on the same inputs; the candidate never acts.

    fmtransfer shadow production=outputs/pretrain/<run> candidate=outputs/adapt/<run>/adapter.safetensors \
        data=uci_digits_region split=test

Both models (run dirs, model files, adapters or ONNX exports, opened by :func:`open_model`) score the same rows of
one recipe split. The stage reports how often they agree (with a Wilson interval) and lists every disagreement; where
the recipe has labels, each model's accuracy (Wilson interval) and the candidate's gain over production with a
paired interval (a bootstrap over the rows, resampling the pairs; the exact McNemar test on the rows where exactly
one model is right gives its p-value); each model's latency (median over repeated batches of the forward pass); and
a recommendation against ``gates``: promote, keep production, or inconclusive, with the reasons in words.
Writes shadow.json, shadow.md and disagreements.csv.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fmtransfer.config import require, run_dir
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import RunRecord, write_json_atomic, write_text_atomic
from fmtransfer.tasks.result import StageResult

INTERVAL_METHOD = ("paired bootstrap over rows (percentile; the pairs resampled as multinomial counts of the rows "
                   "only the candidate / only production got right)")
PROMOTE, KEEP, INCONCLUSIVE = "promote", "keep production", "inconclusive"


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays inside [0, 1] and is not degenerate at 0 or n successes)."""
    if n <= 0:
        raise ValueError("wilson interval of zero trials")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exactly 0 / 1 at the ends (the formula leaves a rounding residue there)
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact(only_candidate: int, only_production: int) -> float:
    """Two-sided exact McNemar p-value: the discordant rows as a binomial(b + c, 1/2)."""
    n = only_candidate + only_production
    if n == 0:
        return 1.0
    k = min(only_candidate, only_production)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_interval(only_candidate: int, only_production: int, n: int, confidence: float = 0.95,
                    resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(candidate) - accuracy(production) over ``n`` paired rows.

    A row's difference is +1 (only the candidate right), -1 (only production) or 0, so resampling the rows with
    replacement is drawing multinomial counts of the three kinds: exact, and O(resamples) whatever ``n``.
    """
    rng = np.random.default_rng(seed)
    p = np.array([only_candidate, only_production, n - only_candidate - only_production], dtype=np.float64) / n
    counts = rng.multinomial(n, p, size=resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    alpha = 1 - confidence
    return float(np.quantile(diffs, alpha / 2)), float(np.quantile(diffs, 1 - alpha / 2))


@dataclass(frozen=True)
class Gates:
    """``gates`` of the config. min_agreement: with no labels, the candidate is promoted when the lower bound of
    its agreement with production reaches this (nothing shows it better, but it changes at most that share of
    decisions). min_accuracy_gain: with labels, promoted when the lower bound of its accuracy gain exceeds this, kept
    out when the upper bound does not. max_latency_ratio: never promoted when its per-sample latency is more than
    this times production's (null: no latency gate)."""

    min_agreement: float = 0.99
    min_accuracy_gain: float = 0.0
    max_latency_ratio: float | None = 1.5

    def __post_init__(self) -> None:
        if not isinstance(self.min_agreement, (int, float)) or not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"gates.min_agreement={self.min_agreement!r}: expected a share in [0, 1]")
        if not isinstance(self.min_accuracy_gain, (int, float)) or not -1 <= self.min_accuracy_gain <= 1:
            raise ConfigError(f"gates.min_accuracy_gain={self.min_accuracy_gain!r}: expected an accuracy difference "
                              f"in [-1, 1] (0: any gain that the interval shows)")
        if self.max_latency_ratio is not None and (not isinstance(self.max_latency_ratio, (int, float))
                                                   or self.max_latency_ratio <= 0):
            raise ConfigError(f"gates.max_latency_ratio={self.max_latency_ratio!r}: expected a ratio > 0 or null")


def compare(prod_pred: np.ndarray, cand_pred: np.ndarray, targets: np.ndarray | None, confidence: float,
            resamples: int, seed: int) -> dict[str, Any]:
    """Agreement and, with ``targets``, both accuracies and the paired gain (all with intervals)."""
    n = len(prod_pred)
    agree = int((prod_pred == cand_pred).sum())
    stats: dict[str, Any] = {"n": n, "confidence": confidence, "agreement": agree / n,
                             "agreement_interval": wilson(agree, n, confidence), "disagreements": n - agree}
    if targets is None:
        return stats
    p_ok, c_ok = prod_pred == targets, cand_pred == targets
    only_c, only_p = int((c_ok & ~p_ok).sum()), int((p_ok & ~c_ok).sum())
    stats.update({
        "production_accuracy": float(p_ok.mean()), "production_interval": wilson(int(p_ok.sum()), n, confidence),
        "candidate_accuracy": float(c_ok.mean()), "candidate_interval": wilson(int(c_ok.sum()), n, confidence),
        "gain": (only_c - only_p) / n, "gain_interval": paired_interval(only_c, only_p, n, confidence, resamples, seed),
        "only_candidate_right": only_c, "only_production_right": only_p,
        "mcnemar_p": mcnemar_exact(only_c, only_p), "gain_method": INTERVAL_METHOD})
    return stats


def recommend(stats: dict[str, Any], latency_ratio: float | None, gates: Gates) -> tuple[str, list[str]]:
    """promote / keep production / inconclusive, and the reasons in words."""
    reasons = []
    slow = gates.max_latency_ratio is not None and latency_ratio is not None and latency_ratio > gates.max_latency_ratio
    if slow:
        reasons.append(f"the candidate takes {latency_ratio:.2f}x production's time per sample, more than "
                       f"gates.max_latency_ratio={gates.max_latency_ratio}")
    elif latency_ratio is not None:
        # said even when it passes: a ratio near the gate can flip on a busy machine
        reasons.append(f"its time per sample is {latency_ratio:.2f}x production's (gates.max_latency_ratio="
                       f"{gates.max_latency_ratio})")
    lo_a, hi_a = stats["agreement_interval"]
    if "gain" not in stats:
        reasons.append("the data has no labels, so accuracy cannot decide")
        if slow:
            return KEEP, reasons
        if lo_a >= gates.min_agreement:
            reasons.append(f"the models agree on {stats['agreement']:.1%} of {stats['n']} inputs (at least "
                           f"{lo_a:.1%} at {stats['confidence']:.0%} confidence, gates.min_agreement="
                           f"{gates.min_agreement}): the candidate would change few decisions")
            return PROMOTE, reasons
        reasons.append(f"the models agree on {stats['agreement']:.1%} (interval {lo_a:.1%} to {hi_a:.1%}), which does "
                       f"not show gates.min_agreement={gates.min_agreement}; label the rows of disagreements.csv "
                       f"and shadow again")
        return INCONCLUSIVE, reasons
    lo, hi = stats["gain_interval"]
    gain = (f"accuracy {stats['candidate_accuracy']:.4f} vs production {stats['production_accuracy']:.4f}: gain "
            f"{stats['gain']:+.4f}, {stats['confidence']:.0%} interval {lo:+.4f} to {hi:+.4f} (McNemar p="
            f"{stats['mcnemar_p']:.3g})")
    if lo > gates.min_accuracy_gain and not slow:
        return PROMOTE, [f"the candidate is more accurate: {gain}, all above gates.min_accuracy_gain="
                         f"{gates.min_accuracy_gain}", *reasons]
    if hi <= gates.min_accuracy_gain:
        return KEEP, [f"the candidate is not more accurate: {gain}, none above gates.min_accuracy_gain="
                      f"{gates.min_accuracy_gain}", *reasons]
    if slow:
        return KEEP, [*reasons, f"and its gain is not certain either: {gain}"]
    discordant = stats["only_candidate_right"] + stats["only_production_right"]
    return INCONCLUSIVE, [f"the gain is not certain: {gain}; the interval spans gates.min_accuracy_gain="
                          f"{gates.min_accuracy_gain}; only {discordant} of {stats['n']} rows tell the models apart: "
                          f"more labelled rows narrow it", *reasons]


def class_map(production: list[str] | None, candidate: list[str] | None, names: tuple[str, str]) -> np.ndarray:
    """Index of each candidate class in production's list (the same names in another order map; anything else is
    refused: the models would not answer the same question)."""
    for classes, name in zip((production, candidate), names, strict=True):
        if not classes:
            raise ConfigError(f"{name} has no class list (a regression model or a head-less backbone); shadow "
                              f"compares classifiers")
    if len(set(candidate)) == len(candidate) and set(candidate) == set(production) and len(candidate) == len(
            production):
        return np.array([production.index(c) for c in candidate], dtype=np.int64)
    only_p = [c for c in production if c not in candidate]
    only_c = [c for c in candidate if c not in production]
    raise ConfigError(f"production ({names[0]}) and candidate ({names[1]}) predict different classes: production "
                      f"{production}, candidate {candidate} (only in production: {only_p}, only in candidate: "
                      f"{only_c}); shadow needs the same class names, in any order")


def latency_ms(runners: dict[str, Any], recipe: Any, split: str, settings: DictConfig,
               accelerator: str) -> dict[str, dict[str, Any]]:
    """Per-sample forward-pass milliseconds of each model: the median over ``settings.repeats`` batches of
    ``settings.batch_size`` rows (after ``settings.warmup`` batches), the models taking turns so that a busy
    machine slows both alike."""
    size, repeats, warmup = int(settings.batch_size), int(settings.repeats), int(settings.warmup)
    if size < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"latency: batch_size={size}, repeats={repeats}, warmup={warmup}; expected batch_size >= 1, "
                          f"repeats >= 1, warmup >= 0")
    times: dict[str, list[float]] = {name: [] for name in runners}
    rows = 0
    for i in range(warmup + repeats):
        for name, runner in runners.items():
            out = runner.outputs(recipe, split, batch_size=size, accelerator=accelerator, limit=size,
                                 num_workers=0)
            rows = len(out)
            if i >= warmup:
                times[name].append(1000 * out.seconds / len(out))
    return {name: {"ms_per_sample": float(np.median(t)), "batch_size": rows, "repeats": repeats,
                   "all_ms_per_sample": t} for name, t in times.items()}


def _disagreements(prod, cand, prod_pred: np.ndarray, cand_pred: np.ndarray, classes: list[str],
                   cand_conf: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "id", "path", "region", "production", "production_confidence", "candidate",
                "candidate_confidence", "label"])
    for i in np.flatnonzero(prod_pred != cand_pred):
        w.writerow([int(prod.rows[i]), prod.ids[i] if prod.ids is not None else "",
                    prod.paths[i] if prod.paths is not None else "",
                    prod.regions[i] if prod.regions is not None else "",
                    classes[prod_pred[i]], f"{prod.probs[i].max():.4f}", classes[cand_pred[i]], f"{cand_conf[i]:.4f}",
                    classes[prod.targets[i]] if prod.targets is not None else ""])
    return buf.getvalue()


def _interval(pair: tuple[float, float] | list[float], signed: bool = False) -> str:
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(pair[0])} to {fmt.format(pair[1])}"


def markdown(result: dict[str, Any]) -> str:
    s, lat = result["stats"], result["latency"]
    conf = f"{s['confidence']:.0%}"
    lines = [f"# Shadow: {result['candidate']['path']} beside {result['production']['path']}", "",
             f"Data: {result['data']} / {result['split']} ({s['n']} rows). The candidate never acts.", "",
             f"**Recommendation: {result['recommendation']}.**", "", *[f"- {r}" for r in result["reasons"]], "",
             "| | production | candidate |", "|---|---|---|",
             f"| model | {result['production']['kind']} {result['production']['path']} | "
             f"{result['candidate']['kind']} {result['candidate']['path']} |"]
    if "gain" in s:
        lines += [f"| accuracy ({conf} Wilson interval) | {s['production_accuracy']:.4f} "
                  f"({_interval(s['production_interval'])}) | {s['candidate_accuracy']:.4f} "
                  f"({_interval(s['candidate_interval'])}) |"]
    lines += [f"| latency, ms per sample (median of {lat['production']['repeats']} batches of "
              f"{lat['production']['batch_size']}) | {lat['production']['ms_per_sample']:.3f} | "
              f"{lat['candidate']['ms_per_sample']:.3f} |", "",
              f"- Agreement: {s['agreement']:.4f} ({conf} Wilson interval {_interval(s['agreement_interval'])}); "
              f"{s['disagreements']} disagreements in disagreements.csv."]
    if "gain" in s:
        lines += [f"- Gain (candidate - production): {s['gain']:+.4f}, {conf} interval "
                  f"{_interval(s['gain_interval'], signed=True)} ({s['gain_method']}); only the candidate right on "
                  f"{s['only_candidate_right']} rows, only production on {s['only_production_right']}; exact McNemar "
                  f"p = {s['mcnemar_p']:.3g}."]
    lines.append(f"- Latency ratio candidate / production: {result['latency_ratio']:.2f}.")
    return "\n".join(lines) + "\n"


def _open(cfg: DictConfig, role: str):
    from fmtransfer.tasks.model_outputs import open_model

    try:
        return open_model(cfg[role], adapter_base=cfg.get(f"{role}_base"), allow_unfinished=cfg.allow_unfinished,
                          force=cfg.force)
    except (ArtifactError, ConfigError) as e:  # its message says model=...; say which of the two it was
        raise type(e)(f"{role}: {e}") from e


def _check_same_rows(prod, cand) -> None:
    if not np.array_equal(prod.rows, cand.rows) or (prod.ids is not None and cand.ids is not None
                                                    and not np.array_equal(prod.ids, cand.ids)):
        raise ConfigError("production and candidate read different rows of the recipe (their class lists or "
                          "preprocessing made different tables); shadow needs the same inputs for both")


def shadow(cfg: DictConfig) -> StageResult:
    """Run ``cfg.production`` and ``cfg.candidate`` over ``cfg.data`` / ``cfg.split``; write shadow.json, shadow.md
    and disagreements.csv, and recommend against ``cfg.gates``."""
    require(cfg, "production", "candidate", "data", "split", "limit", "loader", "accelerator", "confidence",
            "resamples", "seed", "latency", "gates", "allow_unfinished", "force")
    from omegaconf import OmegaConf

    from fmtransfer.data import load_recipe

    gates = Gates(**OmegaConf.to_container(cfg.gates, resolve=True))
    confidence = float(cfg.confidence)
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence={cfg.confidence!r}: expected a level in (0, 1), e.g. 0.95")
    out = run_dir(cfg)
    recipe = load_recipe(cfg.data)
    with RunRecord("shadow", out, cfg) as record:
        runners = {"production": _open(cfg, "production"), "candidate": _open(cfg, "candidate")}
        for role, runner in runners.items():
            record.add_input(runner.identity["path"], role)
        mapping = class_map(runners["production"].identity["classes"], runners["candidate"].identity["classes"],
                            (str(cfg.production), str(cfg.candidate)))
        outs = {role: r.outputs(recipe, cfg.split, batch_size=int(cfg.loader.batch_size), accelerator=cfg.accelerator,
                                limit=cfg.limit, num_workers=cfg.loader.num_workers) for role, r in runners.items()}
        prod, cand = outs["production"], outs["candidate"]
        _check_same_rows(prod, cand)
        prod_pred, cand_pred = prod.probs.argmax(1), mapping[cand.probs.argmax(1)]
        stats = compare(prod_pred, cand_pred, prod.targets, confidence, int(cfg.resamples), int(cfg.seed))
        latency = latency_ms(runners, recipe, cfg.split, cfg.latency, cfg.accelerator)
        ratio = latency["candidate"]["ms_per_sample"] / latency["production"]["ms_per_sample"]
        decision, reasons = recommend(stats, ratio, gates)
        result = {"production": runners["production"].identity, "candidate": runners["candidate"].identity,
                  "data": recipe.name, "split": cfg.split, "stats": stats, "latency": latency, "latency_ratio": ratio,
                  "full_pass_ms_per_sample": {role: 1000 * o.seconds / len(o) for role, o in outs.items()},
                  "gates": OmegaConf.to_container(cfg.gates, resolve=True), "recommendation": decision,
                  "reasons": reasons}
        files = {"metrics": write_json_atomic(out / "shadow.json", result),
                 "report": write_text_atomic(out / "shadow.md", markdown(result)),
                 "disagreements": write_text_atomic(out / "disagreements.csv", _disagreements(
                     prod, cand, prod_pred, cand_pred, runners["production"].identity["classes"],
                     cand.probs.max(1)))}
        for role, path in files.items():
            record.add_output(path, role)
    metrics = {"recommendation": decision, "agreement": stats["agreement"], "latency_ratio": ratio,
               **{k: stats[k] for k in ("production_accuracy", "candidate_accuracy", "gain") if k in stats}}
    return StageResult("shadow", out, metrics, {role: Path(p) for role, p in files.items()},
                       sections=[("Shadow evaluation", markdown(result))])
