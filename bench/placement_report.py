"""Figures of the time-to-quality benchmark: per pair (task x seed), per rule, then the headline and the report.

Definitions (bench/placement.py): C* = full-layer LoRA's converged content gain (its best run's last three points);
a rule reaches quality at the first time its curve crosses 0.9 C* (linear between evaluations, from the base
model's content gain at time 0); T_full = full-layer LoRA's own time to quality. A rule's time to quality is the
least over its runs (its sizes k and learning rates); its quality at a time is the best content gain any of its
runs had reached by then. A rule that never reaches quality within the cap is counted at the cap (a lower bound)
and reported as unreached.
"""

from __future__ import annotations

import itertools
import math
import statistics

from layercard_service.control.planning.gains import SCORES, layer_scores
from layercard_service.domain.card_codec import card_from_dict

__all__ = ["headline", "plot", "report", "spearman", "summarize"]

TARGET = 0.9
FRACTIONS = (0.25, 0.5, 0.75)
HEAD_RULE = "planner"
BEATEN = ("random_k", "first_k", "last_k", "activation_norm", "gradient_norm")
REAL_SUFFIX = {"tiny": "", "smollm2-135m": "_real"}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def _backfill_scores(pair: dict) -> None:
    """Scores added after a pair was measured (the card is in the pair): their Spearman, from the same card."""
    gains = pair.get("single_layer_gains") or []
    if not gains:
        return
    card = card_from_dict(pair["card"])
    for score in SCORES:
        if score not in pair["spearman"]:
            values = layer_scores(card, score, card.module_types, card.settings.rank)
            pair["card_scores"][score] = values
            pair["spearman"][score] = spearman(values, gains)


def _converged(run: dict) -> float:
    tail = run["points"][-3:]
    return statistics.fmean(p["content_gain_nats"] for p in tail)


def _curve(run: dict, basis: str) -> list[tuple[float, float, float | None]]:
    start = [(0.0, run["base_content_gain_nats"], 0.0)]
    return start + [(p[f"{basis}_seconds"], p["content_gain_nats"], p["exact_match"]) for p in run["points"]]


def time_to(run: dict, target: float, basis: str = "predicted") -> float:
    """The first time the curve reaches ``target`` nats (linear between points); inf if it never does."""
    curve = _curve(run, basis)
    for (t0, g0, _), (t1, g1, _) in itertools.pairwise(curve):
        if g1 >= target:
            return t1 if g1 == g0 or g0 >= target else t0 + (t1 - t0) * (target - g0) / (g1 - g0)
    return math.inf


def reached_by(run: dict, seconds: float, basis: str = "predicted") -> tuple[float, float]:
    """The best content gain (0 while the loss is above the prompt-blind floor: no content learned yet) and exact
    match of the points at or before ``seconds``."""
    inside = [(g, em or 0.0) for t, g, em in _curve(run, basis) if t <= seconds + 1e-9]
    return max(max(g for g, _ in inside), 0.0), max(em for _, em in inside)


def _rule_runs(pair: dict, rule: str) -> list[dict]:
    keys = {str(s) for s in pair["rules"][rule]}
    return [r for r in pair["runs"].values() if str(r["layers"]) in keys]


def _full_converged(pair: dict) -> float:
    return max(_converged(r) for r in _rule_runs(pair, "full"))


def pair_figures(pair: dict) -> dict:
    for run in pair["runs"].values():
        run.setdefault("base_content_gain_nats", pair["floor"] - run["base_loss"])
    full = _rule_runs(pair, "full")
    best_full = max(full, key=_converged)
    converged = _converged(best_full)
    target = TARGET * converged
    t_full = min(time_to(r, target) for r in full)
    t_full_measured = min(time_to(r, target, "measured") for r in full)
    cap = pair["cap_seconds_predicted"]
    rules: dict[str, dict] = {}
    draws: dict[str, dict] = {}
    for name, sets in pair["rules"].items():
        keys = {str(x) for x in sets}
        runs = [r for r in pair["runs"].values() if str(r["layers"]) in keys]
        ttq = min(time_to(r, target) for r in runs)
        best = min(runs, key=lambda r: (time_to(r, target), -reached_by(r, cap)[0]))
        entry = {
            "time_to_quality_fraction": min(ttq, cap) / t_full,
            "reached": math.isfinite(ttq),
            "measured_time_to_quality_fraction": min(min(time_to(r, target, "measured") for r in runs), cap)
            / t_full_measured,
            "best_run": f"{best['layers']}@{best['learning_rate']:g}",
            "quality_at_cap": max(reached_by(r, cap)[0] for r in runs) / converged,
            "em_at_cap": max(reached_by(r, cap)[1] for r in runs),
        }
        for f in FRACTIONS:
            entry[f"quality_at_{f}"] = max(reached_by(r, f * t_full)[0] for r in runs) / converged
            entry[f"em_at_{f}"] = max(reached_by(r, f * t_full)[1] for r in runs)
        rules[name] = entry
        if name.startswith("random_k#"):
            draws[name] = entry
    return {
        "pilot_cost_fraction_of_full": pair.get("pilot_seconds", 0.0) / t_full,
        "converged_content_gain_nats": converged,
        "full_best_run": f"all@{best_full['learning_rate']:g}",
        "full_time_to_quality_seconds": t_full,
        "full_time_to_quality_fraction_of_cap": t_full / cap,
        "rules": rules,
        "random_draws": draws,
    }


def beats(a: dict, b: dict) -> float:
    """1 when rule a reaches quality sooner (or b never does), or, neither reaching it, has more at the cap."""
    if a["reached"] or b["reached"]:
        ta = a["time_to_quality_fraction"] if a["reached"] else math.inf
        tb = b["time_to_quality_fraction"] if b["reached"] else math.inf
        return 1.0 if ta < tb else 0.5 if ta == tb else 0.0
    return (
        1.0 if a["quality_at_cap"] > b["quality_at_cap"] else 0.5 if a["quality_at_cap"] == b["quality_at_cap"] else 0.0
    )


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def max_predicted_over_available(pair: dict, available: float | None = None) -> float:
    """The most nats the card (a layer) or a plan predicts, over the loss the base model has (its floor is 0)."""
    rows = [row["predicted_gain"] for row in pair["card"]["layers"]]
    plans = [p["predicted_gain"] for p in _plans(pair).values()]
    base = min(r["base_loss"] for r in pair["runs"].values())
    return max(rows + plans) / (base if available is None else available)


def _plans(pair: dict) -> dict:
    if "plans" in pair:
        return pair["plans"]
    return {"planner": pair["plan"]} if pair.get("plan") else {}


def layer0_diagnosis(pair: dict) -> dict:
    """Where block 0's Res² comes from: its share of the card's, by module type, and the stream it sees."""
    layers = pair["card"]["layers"]
    total = sum(row["resnorm_sq"] for row in layers) or 1.0
    zero = layers[0]
    by_type = {m["module_type"]: m["resnorm_sq"] / (zero["resnorm_sq"] or 1.0) for m in zero["modules"]}
    streams = sorted(row["residual_mean_square"] for row in layers)
    median = streams[len(streams) // 2] or 1.0
    return {
        "task": pair["task"],
        "seed": pair["seed"],
        "block0_share_of_resnorm": zero["resnorm_sq"] / total,
        "block0_share_by_module_type": by_type,
        "block0_stream_over_median": layers[0]["residual_mean_square"] / median,
    }


def summarize(pairs: list[dict]) -> dict:
    by_model: dict[str, dict] = {}
    for model in sorted({p.get("model", "tiny") for p in pairs}):
        mine = [p for p in pairs if p.get("model", "tiny") == model]
        for p in mine:
            _backfill_scores(p)
        # A pair where full-layer LoRA itself never gets below the prompt-blind floor has no content to reach.
        excluded = [f"{p['task']} seed {p['seed']}" for p in mine if _full_converged(p) <= 0]
        mine = [p for p in mine if _full_converged(p) > 0]
        if not mine:
            by_model[model] = {"excluded_pairs": excluded}
            continue
        figures = [pair_figures(p) for p in mine]
        names = sorted({n for f in figures for n in f["rules"]})
        rules = {}
        for name in names:
            entries = [f["rules"][name] for f in figures if name in f["rules"]]
            rules[name] = {key: _spread([float(e[key]) for e in entries]) for key in entries[0] if key != "best_run"}
            rules[name]["best_runs"] = [e["best_run"] for e in entries]
        versus = {}
        for base in BEATEN:
            wins = []
            for f in figures:
                if HEAD_RULE not in f["rules"]:
                    continue
                others = list(f["random_draws"].values()) if base == "random_k" else [f["rules"].get(base)]
                wins += [beats(f["rules"][HEAD_RULE], o) for o in others if o is not None]
            if wins:
                versus[base] = statistics.fmean(wins)
        spearman = {}
        for key in sorted({k for p in mine for k in p["spearman"]}):
            values = [p["spearman"][key] for p in mine if key in p["spearman"]]
            spearman[key] = _spread(values)
        by_model[model] = {
            "pairs": [{"task": p["task"], "seed": p["seed"], **f} for p, f in zip(mine, figures)],
            "rules": rules,
            "planner_beats": versus,
            "spearman": spearman,
            "max_predicted_gain_over_available": max(max_predicted_over_available(p) for p in mine),
            # the stricter figure: over the loss above the prompt-blind floor (format gains excluded)
            "max_predicted_gain_over_content_available": max(
                max_predicted_over_available(p, min(r["base_loss"] for r in p["runs"].values()) - p["floor"])
                for p in mine
            ),
            "layer0": [layer0_diagnosis(p) for p in mine],
            "excluded_pairs": excluded,
        }
    return by_model


def headline(summary: dict) -> dict:
    head: dict[str, float] = {}
    for model, s in summary.items():
        if "rules" not in s:
            continue
        suffix = REAL_SUFFIX.get(model, f"_{model}")
        card = s["rules"].get(HEAD_RULE)
        if card is not None:
            head[f"card_time_to_quality_fraction_of_full{suffix}"] = card["time_to_quality_fraction"]["mean"]
            head[f"card_reached_quality_fraction{suffix}"] = card["reached"]["mean"]
            head[f"card_quality_at_half_time_fraction_of_full{suffix}"] = card["quality_at_0.5"]["mean"]
        for base, value in s["planner_beats"].items():
            name = "depth" if base == "first_k" else base.removesuffix("_k")
            head[f"card_beats_{name}_fraction{suffix}"] = value
        if "resnorm" in s["spearman"]:
            head[f"spearman_predicted_vs_measured{suffix}"] = s["spearman"]["resnorm"]["mean"]
            head[f"spearman_depth_vs_measured{suffix}"] = s["spearman"]["depth"]["mean"]
        pilots = [p["pilot_cost_fraction_of_full"] for p in s["pairs"]]
        head[f"card_pilot_cost_fraction_of_full{suffix}"] = statistics.fmean(pilots)
        prior = s["rules"].get("planner_prior")
        if prior is not None:
            head[f"prior_card_time_to_quality_fraction_of_full{suffix}"] = prior["time_to_quality_fraction"]["mean"]
        head[f"max_predicted_gain_over_available{suffix}"] = s["max_predicted_gain_over_available"]
        head[f"max_predicted_gain_over_content_available{suffix}"] = s["max_predicted_gain_over_content_available"]
        best = min(s["rules"].items(), key=lambda kv: kv[1]["time_to_quality_fraction"]["mean"])
        head[f"best_rule_time_to_quality_fraction_of_full{suffix}"] = best[1]["time_to_quality_fraction"]["mean"]
    return head


def _fmt(spread: dict, digits: int = 2) -> str:
    return f"{spread['mean']:.{digits}f} ± {spread['stdev']:.{digits}f}"


def report(result: dict) -> str:
    lines = [
        "# Time to quality by placement rule",
        "",
        f"Machine: {result['machine']}.",
        f"Settings: {result['settings']}.",
        f"Command: `{result['command']}`",
        "",
        "Time is the card's predicted training time (cache build + steps x priced step), as a fraction of full-layer",
        "LoRA's time to 90% of its converged content gain; the measured-time figure is beside. Unreached: counted",
        "at the cap (a lower bound). Quality: content gain as a fraction of full-layer LoRA's converged gain.",
        "'depth' in the headline is depth order (first-k). The planner's placement is 'planner'.",
        "",
        "## Headline",
        "",
        *[f"- {k}: {v:.3f}" for k, v in result["headline"].items()],
    ]
    for model, s in result["summary"].items():
        if s["excluded_pairs"]:
            lines += [
                "",
                f"builtin:{model}: pairs without content to reach, left out: {', '.join(s['excluded_pairs'])}",
            ]
        if "rules" not in s:
            continue
        lines += [
            "",
            f"## builtin:{model}: rules (mean ± stdev over task x seed)",
            "",
            "| rule | time to quality | reached | measured time | quality at 0.25 | 0.5 | 0.75 | at cap | EM at 0.5 "
            "| EM at cap | best runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(s["rules"], key=lambda n: s["rules"][n]["time_to_quality_fraction"]["mean"])
        for name in order:
            r = s["rules"][name]
            lines.append(
                f"| {name} | {_fmt(r['time_to_quality_fraction'])} | {r['reached']['mean']:.2f} | "
                f"{_fmt(r['measured_time_to_quality_fraction'])} | {_fmt(r['quality_at_0.25'])} | "
                f"{_fmt(r['quality_at_0.5'])} | {_fmt(r['quality_at_0.75'])} | {_fmt(r['quality_at_cap'])} | "
                f"{_fmt(r['em_at_0.5'])} | {_fmt(r['em_at_cap'])} | {', '.join(r['best_runs'])} |"
            )
        lines += ["", "Planner beats (share of task x seed pairs; random: over every draw): "]
        lines += [f"- {b}: {v:.2f}" for b, v in s["planner_beats"].items()]
        lines += ["", "Spearman with measured single-layer gain:"]
        lines += [f"- {k}: {_fmt(v, 3)}" for k, v in s["spearman"].items()]
        lines += ["", "Per pair:"]
        for p in s["pairs"]:
            lines.append(
                f"- {p['task']} seed {p['seed']}: converged content gain {p['converged_content_gain_nats']:.3f} nats "
                f"({p['full_best_run']}), full-layer time to quality {p['full_time_to_quality_seconds']:.1f} s "
                f"predicted ({p['full_time_to_quality_fraction_of_cap']:.2f} of the cap)"
            )
        lines += ["", "Where block 0's Res² comes from (card): its share of all Res², by module type, its stream:"]
        for d in s["layer0"]:
            types = ", ".join(f"{t} {v:.2f}" for t, v in sorted(d["block0_share_by_module_type"].items()))
            lines.append(
                f"- {d['task']} seed {d['seed']}: {d['block0_share_of_resnorm']:.2f} of all Res²; within block 0: "
                f"{types}; its stream's mean square / the median block's: {d['block0_stream_over_median']:.2g}"
            )
    for pair in result["pairs"]:
        for rule, p in _plans(pair).items():
            where = f"{pair['task']} seed {pair['seed']} ({pair.get('model', 'tiny')})"
            lines += ["", f"{rule} on {where}: {p['rationale']}"]
            if pair.get("pilot_seconds"):
                lines.append(f"(the card's pilot runs took {pair['pilot_seconds']:.1f} s)")
    return "\n".join(lines)


def plot(result: dict, name: str) -> None:
    """bench/results/<name>.svg: each pair's learning curves, the best run of each rule."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report stands without the picture
        print("matplotlib is not installed: no learning-curve picture")
        return
    from bench.common import RESULTS

    pairs = result["pairs"]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    summary = result["summary"]
    for ax, pair in zip(axes.flat, pairs):
        figures = next(
            f
            for f in summary[pair.get("model", "tiny")]["pairs"]
            if (f["task"], f["seed"]) == (pair["task"], pair["seed"])
        )
        t_full, converged = figures["full_time_to_quality_seconds"], figures["converged_content_gain_nats"]
        best = {"full": figures["full_best_run"], **{n: e["best_run"] for n, e in figures["rules"].items()}}
        for rule, key in best.items():
            run = pair["runs"].get(key)
            if run is None:
                continue
            xs, ys, _ = zip(*_curve(run, "predicted"))
            style = "-" if rule in ("full", HEAD_RULE) else "--"
            ax.plot([x / t_full for x in xs], [y / converged for y in ys], style, label=rule, linewidth=1.2)
        ax.axhline(TARGET, color="grey", linewidth=0.6)
        ax.set_title(f"{pair.get('model', 'tiny')} {pair['task']} seed {pair['seed']}", fontsize=9)
        ax.set_xlabel("predicted time / full-layer time to quality", fontsize=8)
        ax.set_ylabel("content gain / full converged", fontsize=8)
        ax.set_ylim(-1.5, 1.2)
    axes.flat[0].legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.svg")
    plt.close(fig)
