"""Human-readable output of an evaluation: the metrics table, the steps table, and the steps plot."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fluxmusic.tempfiles import publish

SYSTEMS = (("reference", "reference halves (floor)"), ("model", "model"), ("shuffled_prompts", "shuffled prompts"),
           ("untrained", "untrained transformer"))


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def metrics_table(results: dict) -> str:
    """Markdown table: one row per system (model and baselines)."""
    head = ("| system | FAD | CLAP score | KL (mean) | IS (instrument) | acc tempo | acc register | acc instrument "
            "| acc mean | comb (max) | notes/s | rhythm clarity |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for key, label in SYSTEMS:
        s = results["systems"].get(key)
        if s is None:
            continue
        kl = _get(s, "kl", "paired", "mean") if results.get("paired") and key != "reference" else None
        kl = kl if kl is not None else _get(s, "kl", "marginal", "mean")
        acc = s.get("attribute_accuracy", {})
        comb, dens = _get(s, "signal", "comb", "max"), _get(s, "signal", "note_density", "mean")
        clarity = _get(s, "signal", "rhythm_clarity", "median")
        lines.append(f"| {label} | {_f(s.get('fad'), '.4f')} | {_f(s.get('clap_score'))} | {_f(kl)} | "
                     f"{_f(_get(s, 'inception_score', 'instrument'), '.2f')} | {_f(acc.get('tempo'), '.2f')} | "
                     f"{_f(acc.get('register'), '.2f')} | {_f(acc.get('instrument'), '.2f')} | "
                     f"{_f(acc.get('mean'), '.2f')} | {_f(comb, '.2f')} | {_f(dens, '.2f')} | {_f(clarity, '.2f')} |")
    rel = _get(results, "systems", "model", "attribute_accuracy_vs_reference")
    if rel:
        lines.append("\nmodel accuracy / reference accuracy (target >= 0.8): " + ", ".join(
            f"{k} {_f(rel.get(k), '.2f')}" for k in ("tempo", "register", "instrument")))
    check = _get(results, "systems", "model", "comb_check")
    if check:
        lines.append(f"\ncomb figure within the reference clips' range (<= {_f(check['reference_max'], '.2f')}): "
                     f"{_f(check['fraction_within'], '.2f')} of generated clips")
    return "\n".join(lines)


def _label(r: dict) -> str:
    from fluxmusic.evaluation.sweep import setting_label

    return r.get("label") or setting_label(r)


def steps_table(sweep: dict) -> str:
    """Markdown table of the sweep's rows (grid first, then the options), with each row's cost per clip."""
    ref = sweep["reference_solver"]["steps"]
    lines = [f"| setting | model calls | cost (CFG evaluations) | latent dist. to Heun-{ref} | FAD | CLAP score |",
             "|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        nfe = r["nfe"]
        lines.append(f"| {_label(r)} | {nfe:g} | {r.get('cost', nfe):g} | {r['latent_distance']:.4f} | "
                     f"{_f(r['fad'], '.4f')} | {_f(r['clap_score'])} |")
    noise = sweep.get("noise")
    if noise:
        lines.append(f"\nmetric noise (the target from other seeds): FAD {noise['fad']:.4f}, "
                     f"CLAP score {noise['clap_score']:.4f}")
    return "\n".join(lines)


def describe_fewest(sweep: dict) -> str:
    fewest = sweep.get("fewest", {})
    n = (fewest.get("target") or {}).get("steps")
    tol = fewest.get("tolerance") or {}
    metric = "FAD and CLAP within tolerance"
    if tol:
        metric = f"FAD within +{tol['fad']:.4f} and CLAP score within -{tol['clap_score']:.4f}"
    out = []
    for crit, label in (("latent", f"latent distance <= Euler-{n}'s"), ("metrics", metric),
                        ("both", "both")):
        r = fewest.get(crit)
        if crit not in fewest and crit == "both":
            continue
        if r is None:
            out.append(f"fewest steps matching {n}-step Euler ({label}): none")
        else:
            cost = r.get("cost", r.get("nfe"))
            out.append(f"fewest steps matching {n}-step Euler ({label}): {_label(r)} "
                       f"({cost:g} model evaluations)")
    return "\n".join(out)


def plot_sweep(sweep: dict, path: str | Path) -> Path:
    """Latent distance, FAD and CLAP score against model evaluations, one line per solver and schedule; written
    through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = [r for r in sweep["rows"] if r.get("kind", "grid") == "grid"]
    extra = [r for r in sweep["rows"] if r.get("kind", "grid") != "grid"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = sorted({(r["solver"], r["shift"]) for r in rows}, key=lambda k: (k[0], k[1] or 0))
    t = sweep.get("fewest", {}).get("target") or {"steps": None}
    target = next((r for r in rows if (r["solver"], r["steps"], r["shift"]) == ("euler", t["steps"], None)), None)
    ref_label = f"relative latent distance to Heun-{sweep['reference_solver']['steps']}"
    for ax, metric, label in zip(axes, ("latent_distance", "fad", "clap_score"),
                                 (ref_label, "FAD (CLAP embeddings)", "CLAP score")):
        for solver, shift in keys:
            rs = sorted((r for r in rows if r["solver"] == solver and r["shift"] == shift and r[metric] is not None),
                        key=lambda r: r["nfe"])
            name = f"{solver}, " + ("uniform" if shift is None else f"shift {shift:g}")
            ax.plot([r.get("cost", r["nfe"]) for r in rs], [r[metric] for r in rs], marker="o", label=name)
        shown = [r for r in extra if r[metric] is not None]
        if shown:
            ax.scatter([r.get("cost", r["nfe"]) for r in shown], [r[metric] for r in shown], marker="x",
                       color="black", label="options (interval, cache, schedule)", zorder=3)
        if target is not None:
            ax.axhline(target[metric], color="gray", ls="--", lw=1, label=f"Euler {t['steps']}")
        ax.set_xscale("log")
        if metric == "latent_distance":
            ax.set_yscale("log")
        ax.set_xlabel("cost: CFG evaluations per clip")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"steps vs quality ({sweep['n_prompts']} prompts, same noise)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
