"""``fluxmusic eval``: quality metrics, baselines and (with ``--sweep``) steps versus quality."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fluxmusic.errors import FluxMusicError

#: --quick: prompt and reference counts that keep a run within minutes on 2 shared CPU cores.
QUICK = {"prompts": 32, "reference": 32, "sweep_prompts": 4}
#: --task: held-out clips, reference clips (FAD of generated spans), long-form songs and their seconds.
TASK_FULL = {"clips": 24, "reference": 64, "long_clips": 4, "long_duration": 60.0}
TASK_QUICK = {"clips": 6, "reference": 24, "long_clips": 1, "long_duration": 30.0}
FULL_SWEEP_PROMPTS = 8


def register(sub: argparse._SubParsersAction) -> None:
    from fluxmusic.backend import DTYPE_CHOICES
    from fluxmusic.flow import SOLVERS

    e = sub.add_parser("eval", help="quality metrics (FAD, CLAP score, KL, IS, attribute accuracy) with baselines")
    e.add_argument("--model", help="model directory (default: the bundled default model)")
    e.add_argument("--prompts", help="prompts: a text file (one per line) or JSONL (a corpus manifest); required "
                                     "without --task")
    e.add_argument("--reference", required=True, help="reference clips: a manifest, a corpus dir or a dir of audio")
    e.add_argument("--embedder", help="a transformers ClapModel directory (default: the model directory's CLAP)")
    e.add_argument("--out", default="eval_results.json", help="results JSON (default: eval_results.json)")
    e.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    e.add_argument("--solver", choices=SOLVERS, help="ODE solver (default: the model's)")
    e.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    e.add_argument("--shift", type=float, help="time-shift schedule factor (default: the model's)")
    e.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    e.add_argument("--batch-size", type=int, default=4, help="generation batch size (default 4)")
    e.add_argument("--limit", type=int, help="use only the first N prompts")
    e.add_argument("--reference-limit", type=int, help="use only the first N reference clips")
    e.add_argument("--split", help='keep only manifest entries (prompts and reference) whose "split" is this, e.g. val '
                                   "(held-out works of a rendered corpus)")
    e.add_argument("--vocabulary", choices=("auto", "synth", "render"), default="auto",
                   help="attribute vocabularies and estimator settings: the reference manifest's corpus (auto: "
                        "render when its entries carry the renderer's fields), or name one")
    e.add_argument("--no-untrained", action="store_true", help="skip the untrained-transformer baseline")
    e.add_argument("--sweep", action="store_true", help="also run the steps-versus-quality sweep")
    e.add_argument("--sweep-prompts", type=int, help=f"prompts in the sweep (default {FULL_SWEEP_PROMPTS})")
    e.add_argument("--sweep-steps", default="4,6,8,12,16,25,50",
                   help="comma-separated step counts of the grid (the target, uniform Euler, always runs)")
    e.add_argument("--sweep-shift", type=float, default=3.0, help="time-shift schedule also swept (0: none)")
    e.add_argument("--sweep-solvers", default="euler,heun,ab2,ab3", help="comma-separated solvers of the grid")
    e.add_argument("--sweep-intervals", default="0.1:1,0.2:1,0.3:1",
                   help="guidance intervals tried on the base settings, T_MIN:T_MAX,... ('none': skip)")
    e.add_argument("--sweep-caches", default="0.05,0.1,0.2",
                   help="step-cache thresholds tried on the base settings ('none': skip)")
    e.add_argument("--sweep-schedules", default="linear,cosine",
                   help="guidance schedules tried on the base settings ('none': skip)")
    e.add_argument("--sweep-target", type=int, default=50, help="match this many uniform Euler steps (default 50)")
    e.add_argument("--sweep-reference-steps", type=int, default=200,
                   help="Heun steps of the reference solution latent distances are measured to (default 200)")
    e.add_argument("--sweep-score-all", action=argparse.BooleanOptionalAction, default=True,
                   help="decode and score FAD/CLAP for every sweep row (--no-sweep-score-all: only the target and "
                        "the rows matching it by latent distance, cheapest first, until one matches both ways)")
    e.add_argument("--plot", help="steps-sweep PNG (default: next to --out, *_steps.png)")
    e.add_argument("--quick", action="store_true",
                   help=f"at most {QUICK['prompts']} prompts, {QUICK['reference']} reference clips, "
                        f"{QUICK['sweep_prompts']} sweep prompts")
    e.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's); 1 on a shared machine avoids spin-waiting threads")
    e.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="transformer and encoder dtype, as for generate (auto: bf16 where native, else float32)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    t = e.add_argument_group("continuation, infilling and long form (--task; docs/continuation.md)")
    t.add_argument("--task", help="continue, infill, long or a comma-separated list: measure them on the "
                                  "--reference clips (their captions are the prompts)")
    t.add_argument("--clips", type=int, help=f"held-out clips given as audio (default {TASK_FULL['clips']}, "
                                             f"--quick {TASK_QUICK['clips']}); the reference is the clips after them")
    t.add_argument("--seam", type=float, default=6.0, help="continue / long: keep 0:SEAM seconds (default 6)")
    t.add_argument("--regenerate", default="4:6", help="infill: the span regenerated, A:B seconds (default 4:6)")
    t.add_argument("--long-duration", type=float, help=f"long: seconds per song (default "
                   f"{TASK_FULL['long_duration']:g}, --quick {TASK_QUICK['long_duration']:g})")
    t.add_argument("--blend", type=float, help="seam blend seconds of the requests with given audio (default: the "
                                               "generator's)")
    t.add_argument("--resample", type=int, help="RePaint re-noise iterations of the requests with given audio")
    t.add_argument("--conditioning", choices=("auto", "trained", "replace"),
                   help="trained (the transformer's context input) or replace (training-free); auto: trained when "
                        "the model has it")
    t.add_argument("--save-audio", help="write the first clips' original / continued audio and a long-form song "
                                        "(WAV) into this directory")
    t.add_argument("--long-clips", type=int, help=f"long: songs (default {TASK_FULL['long_clips']}, --quick "
                                                  f"{TASK_QUICK['long_clips']})")
    e.set_defaults(func=run)


def _positive(name: str, v: int | None) -> int | None:
    if v is not None and v < 1:
        raise FluxMusicError(f"{name} {v} must be an integer >= 1")
    return v


def _out_path(path: str, suffix: str) -> Path:
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise FluxMusicError(f"{path!r} must end in {suffix}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FluxMusicError(f"output directory {parent} does not exist or is not writable")
    return p


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FluxMusicError(f"--sweep-steps {text!r} must be comma-separated integers") from None
    if not steps or min(steps) < 1:
        raise FluxMusicError(f"--sweep-steps {text!r} must list integers >= 1")
    return sorted(set(steps))  # the target (uniform Euler) is run whether listed or not


def _sweep_options(args: argparse.Namespace) -> dict:
    """The sweep's solvers, intervals, cache thresholds and schedules, each checked by the sampling validation
    (one error naming the option and the bad value) before anything loads."""
    from fluxmusic.sampling import resolve_settings

    def items(flag: str, text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise FluxMusicError(f"{flag} {text!r} must list at least one value (or 'none')")
        return [] if parts == ["none"] else parts

    def check(flag: str, **kw) -> None:
        try:
            resolve_settings(None, **kw)
        except FluxMusicError as e:
            raise FluxMusicError(f"{flag}: {e}") from None

    out: dict = {"solvers": items("--sweep-solvers", args.sweep_solvers), "intervals": [], "cache_thresholds": [],
                 "schedules": items("--sweep-schedules", args.sweep_schedules)}
    if not out["solvers"]:
        raise FluxMusicError("--sweep-solvers must name at least one solver")
    for s in out["solvers"]:
        check("--sweep-solvers", solver=s)
    for s in out["schedules"]:
        check("--sweep-schedules", guidance_schedule=s)
    for iv in items("--sweep-intervals", args.sweep_intervals):
        try:
            lo, hi = (float(v) for v in iv.split(":"))
        except ValueError:
            raise FluxMusicError(f"--sweep-intervals {iv!r} must be T_MIN:T_MAX") from None
        check("--sweep-intervals", guidance_interval=(lo, hi))
        out["intervals"].append((lo, hi))
    for c in items("--sweep-caches", args.sweep_caches):
        try:
            value = float(c)
        except ValueError:
            raise FluxMusicError(f"--sweep-caches {c!r} must be a number") from None
        check("--sweep-caches", cache_threshold=value)
        out["cache_thresholds"].append(value)
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    if args.task:
        return run_tasks(args)
    if not args.prompts:
        raise FluxMusicError("--prompts is required (a prompts file or a JSONL manifest), unless --task is given")

    from fluxmusic.checkpoint import atomic_write_text
    from fluxmusic.evaluation.data import load_prompts, load_reference
    from fluxmusic.evaluation.embedders import model_dir_embedder
    from fluxmusic.evaluation.evaluate import evaluate
    from fluxmusic.evaluation.report import describe_fewest, metrics_table, plot_sweep, steps_table
    from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir
    from fluxmusic.sampling import invalid, resolve_settings

    out = _out_path(args.out, ".json")
    plot = _out_path(args.plot, ".png") if args.plot else out.with_name(out.stem + "_steps.png")
    for name in ("threads", "batch_size", "limit", "reference_limit", "sweep_prompts", "sweep_target",
                 "sweep_reference_steps"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 <= args.seed <= 2**63 - 1:
        raise invalid("seed", args.seed, "an integer in [0, 2**63 - 1]")
    sweep_steps = _steps_list(args.sweep_steps) if args.sweep else None
    sweep_options = _sweep_options(args) if args.sweep else {}
    if args.sweep_shift < 0:
        raise FluxMusicError(f"--sweep-shift {args.sweep_shift} must be > 0 (or 0 for none)")
    limit, ref_limit = args.limit, args.reference_limit
    sweep_n = args.sweep_prompts or FULL_SWEEP_PROMPTS
    if args.quick:
        limit = min(limit or QUICK["prompts"], QUICK["prompts"])
        ref_limit = min(ref_limit or QUICK["reference"], QUICK["reference"])
        sweep_n = min(args.sweep_prompts or QUICK["sweep_prompts"], QUICK["sweep_prompts"])

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = Path(args.model) if args.model else default_model_dir()
    progress = not args.quiet
    t0 = time.perf_counter()
    pipe = FluxMusicPipeline.from_pretrained(model_dir, dtype=args.dtype)
    d = pipe.defaults
    st = resolve_settings(d, steps=args.steps, solver=args.solver, guidance=args.guidance, shift=args.shift)
    steps, solver, guidance, shift = st.steps, st.solver, st.guidance, st.shift
    # the model row samples as the model does by default (interval, cache, schedule included)
    options = {"guidance_interval": st.guidance_interval, "cache_threshold": st.cache_threshold,
               "guidance_schedule": st.guidance_schedule}
    geo = pipe.geometry
    ref = load_reference(args.reference, geo.sample_rate, geo.max_duration, ref_limit, args.split, args.vocabulary)
    prompts = load_prompts(args.prompts, ref.space, args.split)[:limit]
    if len(prompts) < 2:
        raise FluxMusicError(f"--limit {limit} leaves {len(prompts)} prompt; at least 2 are needed")
    embedder = model_dir_embedder(model_dir, args.embedder)

    results = evaluate(pipe, prompts, ref, embedder, steps=steps, solver=solver, guidance=guidance, shift=shift,
                       seed=args.seed, batch_size=args.batch_size, untrained=not args.no_untrained,
                       progress=progress, options=options)
    scored = results.pop("_scored")
    if args.sweep:
        from fluxmusic.evaluation.sweep import steps_sweep

        n = min(sweep_n, len(prompts))
        if any(pipe.control_channels) and sweep_options.get("cache_thresholds"):
            # step caching does not combine with a beat grid / register hint (the pipeline refuses it)
            print("sweep: no step-cache variants (this model takes a beat grid / register hint)", file=sys.stderr)
            sweep_options["cache_thresholds"] = []
        results["steps_sweep"] = steps_sweep(
            pipe, [p.text for p in prompts[:n]], scored["text_emb"][:n], scored["reference"].emb, embedder,
            guidance=guidance, seed=args.seed, steps=sweep_steps,
            shifts=(None, args.sweep_shift) if args.sweep_shift else (None,), target_steps=args.sweep_target,
            reference_steps=args.sweep_reference_steps, batch_size=args.batch_size,
            progress=progress, base={"solver": solver, "steps": steps, "shift": shift}, **sweep_options,
            score_all=args.sweep_score_all,
        )
        results["steps_sweep"]["plot"] = str(plot_sweep(results["steps_sweep"], plot))
        results["steps_sweep"]["model_defaults"] = dict(d)
    results["config"] = {
        "model": str(model_dir), "prompts": str(args.prompts), "reference": str(args.reference),
        "embedder": embedder.name, "split": args.split, "vocabulary": ref.space.name,
        "steps": steps, "solver": solver, "guidance": guidance, "shift": shift, **options,
        "seed": args.seed, "quick": bool(args.quick), "threads": torch.get_num_threads(), "argv": sys.argv[1:],
    }
    results["timing"]["total_s"] = time.perf_counter() - t0
    atomic_write_text(out, json.dumps(results, indent=2, default=_json_default) + "\n")
    print(metrics_table(results))
    if args.sweep:
        print()
        print(steps_table(results["steps_sweep"]))
        print(describe_fewest(results["steps_sweep"]))
        print(f"plot: {plot}")
    print(f"results: {out}")
    return 0


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _tasks(text: str) -> list[str]:
    from fluxmusic.evaluation.continuation_eval import TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise FluxMusicError(f"--task {text!r}: allowed: {', '.join(TASKS)} or a comma-separated list of them")
    return list(dict.fromkeys(tasks))


def _span_arg(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise FluxMusicError(f"--regenerate {text!r} must be A:B in seconds, e.g. 4:6") from None
    if not 0 < a < b:
        raise FluxMusicError(f"--regenerate {text!r} must be A:B with 0 < A < B (kept audio on both sides)")
    return a, b


def run_tasks(args: argparse.Namespace) -> int:
    """``--task``: continuation, infilling and long form on held-out clips (fluxmusic.evaluation.continuation_eval)."""
    import torch

    from fluxmusic.checkpoint import atomic_write_text
    from fluxmusic.evaluation.continuation_eval import ContinuationEval, continuation_table, key_accuracy
    from fluxmusic.evaluation.data import Reference, load_reference
    from fluxmusic.evaluation.embedders import model_dir_embedder
    from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir
    from fluxmusic.sampling import invalid

    tasks = _tasks(args.task)
    out = _out_path(args.out, ".json")
    for name in ("threads", "clips", "reference_limit", "long_clips"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 <= args.seed <= 2**63 - 1:
        raise invalid("seed", args.seed, "an integer in [0, 2**63 - 1]")
    size = TASK_QUICK if args.quick else TASK_FULL
    n_clips = args.clips or size["clips"]
    n_ref = args.reference_limit or size["reference"]
    long_clips = args.long_clips or size["long_clips"]
    long_duration = args.long_duration or size["long_duration"]
    regen = _span_arg(args.regenerate)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = Path(args.model) if args.model else default_model_dir()
    t0 = time.perf_counter()
    pipe = FluxMusicPipeline.from_pretrained(model_dir)
    geo = pipe.geometry
    if not 0 < args.seam < geo.max_duration:
        raise invalid("--seam", args.seam, f"seconds in (0, {geo.max_duration:g})")
    if regen[1] >= geo.max_duration:
        raise invalid("--regenerate", args.regenerate, f"A:B with B < {geo.max_duration:g} s (the window)")
    if "long" in tasks and not geo.max_duration < long_duration <= 300:
        raise invalid("--long-duration", long_duration, f"seconds in ({geo.max_duration:g}, 300]")
    allr = load_reference(args.reference, geo.sample_rate, geo.max_duration, n_clips + n_ref, args.split,
                          args.vocabulary)
    if len(allr.waves) < n_clips + 4:
        raise FluxMusicError(f"--reference {args.reference} has {len(allr.waves)} clips; --clips {n_clips} needs at "
                             f"least {n_clips + 4} (the held-out clips plus 4 reference clips)")
    if any(not c for c in allr.captions[:n_clips]):
        raise FluxMusicError("--task needs captions for the held-out clips: give a manifest as --reference")

    def part(sl: slice) -> Reference:
        return Reference(allr.waves[sl], allr.captions[sl], allr.attributes[sl], allr.paths[sl], allr.space,
                         allr.extra[sl])

    clips, ref = part(slice(0, n_clips)), part(slice(n_clips, None))
    options = {k: v for k, v in (("steps", args.steps), ("solver", args.solver), ("guidance", args.guidance),
                                 ("shift", args.shift)) if v is not None}
    audio_options = {k: v for k, v in (("blend", args.blend), ("resample", args.resample),
                                       ("conditioning", args.conditioning)) if v is not None}
    if args.conditioning == "trained" and not pipe.takes_context:
        raise FluxMusicError(f"--conditioning trained: the transformer of {model_dir} has no trained masked "
                             "conditioning (context_channels in its config.json); use replace or auto")
    pipe.request("x", audio=clips.waves[0], keep=f"0:{args.seam:g}", **options, **audio_options)  # fail early
    ev = ContinuationEval(pipe, clips, ref, model_dir_embedder(model_dir, args.embedder), seed=args.seed,
                          seam=args.seam, regenerate=regen, long_duration=long_duration, long_clips=long_clips,
                          options=options, audio_options=audio_options, save_audio=args.save_audio,
                          progress=not args.quiet)
    results = ev.run(tasks)
    results["key_estimator_accuracy"] = key_accuracy(allr, geo.sample_rate)
    results["config"] = {
        "model": str(model_dir), "reference": str(args.reference), "split": args.split, "tasks": tasks,
        "clips": len(clips.waves), "reference_clips": len(ref.waves), "seam": args.seam,
        "regenerate": list(regen), "long_duration": long_duration, "long_clips": long_clips, "seed": args.seed,
        "audio_options": audio_options, "conditioning_used": (
            "trained" if pipe.takes_context and audio_options.get("conditioning", "auto") != "replace" else "replace"),
        "settings": pipe.request("x", **options).settings.describe(), "quick": bool(args.quick),
        "threads": torch.get_num_threads(), "argv": sys.argv[1:],
    }
    results["timing"] = {"total_s": time.perf_counter() - t0}
    atomic_write_text(out, json.dumps(results, indent=2, default=_json_default) + "\n")
    print(continuation_table(results))
    print(f"key estimator accuracy on the reference clips: {results['key_estimator_accuracy']}")
    print(f"results: {out}")
    return 0
