"""The benchmark's run: `main` is a short list of steps, each a method of `Run` (the run's state: settings,
cached model names, the points sampled so far and their readings)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import common
from . import world
from .config import (C_CFGS, CFGS, CNET_CFGS, CNET_FIELDS, CNET_MODES, DIAGNOSE_POINTS, DOMAIN_WEIGHTS, EXPERIMENTS,
                     EXTRA_EXPERIMENTS, OWN_COMMAND_EXPERIMENTS, BASE_FIELDS, HALVES, HEADLINE, REMEDIES, REMEDY_POINTS, TOY_VERSION, ToyConfig,
                     PRECISIONS, cache_dir, log)
from .experiments import METHODS, SAMPLED_THROUGH, Point, ToySampler, experiment_points
from .metrics import Metrics, mean_sd, summarise, summarise_over_seeds
from .models import FOLDER_OF, finetune, finetune_name, train_base, train_controlnet
from . import gates as G
from .plot import write_controlnet_grid, write_grid, write_pareto
from .report import report
from ...training.optim import cpu_has_native_bf16

GATE_MODES = ("enforce", "only", "report")


def main(argv=None) -> dict:
    args, cfg, experiments = parse_args(argv)
    if args.replot:
        return replot(args)
    run = Run(args, cfg, experiments)
    run.evaluator()
    if not run.gates(run.cheap_gates()):        # G1, G6, G8: no diffusion model needed
        return run.stop()
    run.base()
    run.domain_images()
    run.sampling()
    if not run.gates(run.base_gates()):         # G2, G3, G4: the base's samples
        return run.stop()
    if not run.gates(run.finetune_gates()):     # G5, G7, and G8 again with the operating cfg
        return run.stop()
    run.controlnet()
    run.sample_experiments()
    run.diagnose()
    run.constants()
    run.record_models()
    return run.finish()


def parse_args(argv):
    p = common.parser("toy", sys.modules[__package__].__doc__.split("\n\n")[0])
    for f in dataclasses.fields(ToyConfig):
        if f.type in ("int", "float", "str", int, float, str):
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=f"override {f.name} (default {f.default}; --fast uses smaller values)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all of them); also "
                        "'controlnet' (its own command: trains a ControlNet on the base's world; spatial control), 'diagnose' "
                        "(per step: norms of D - u and B(c) - u and their cosine along (c)'s trajectories) and "
                        "'constants' (per noise level: the untrained null-text UNet against u, one constant per "
                        "layer vs per-level constants)")
    p.add_argument("--docs", type=Path, default=common.PACK_ROOT / "docs",
                   help="full runs also write toy_pareto[_partial].png and toy_grid[_partial].png here")
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    p.add_argument("--gates", choices=GATE_MODES, default="enforce",
                   help="enforce (default): check the instrument's gates first and refuse to read when one fails; "
                        "only: check the gates and stop; report: read anyway, the reading marked uncalibrated")
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the Pareto plot and print the tables from a JSON this script wrote")
    args = p.parse_args(argv)
    if args.replot:
        return args, None, []
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    known = EXPERIMENTS + OWN_COMMAND_EXPERIMENTS + EXTRA_EXPERIMENTS
    bad = [e for e in experiments if e not in known]
    if bad:
        p.error(f"unknown experiment(s) {', '.join(bad)}; choose from {', '.join(known)}")
    common.enable_stack_dumps()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ToyConfig.fast() if args.fast else ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    if cfg.coverage not in world.COVERAGES:
        p.error(f"--coverage must be one of {', '.join(world.COVERAGES)} (got {cfg.coverage!r})")
    if cfg.precision not in PRECISIONS:
        p.error(f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision!r})")
    if cfg.precision == "bf16" and not cpu_has_native_bf16():
        p.error("--precision bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one emulates it, many "
                "times slower than fp32: leave --precision at fp32")
    if not 1 <= cfg.prompts <= 16:
        p.error(f"--prompts must be 1..16 (got {cfg.prompts})")
    if args.out == common.PACK_ROOT / "artifacts" / "bench" / "toy.json":
        tags = ("_fast" if args.fast else "") + ("" if cfg.precision == "fp32" else "_" + cfg.precision)
        args.out = args.out.with_name(f"toy_{cfg.coverage}{tags}.json")
    return args, cfg, experiments


def publishes(fast: bool, precision: str) -> bool:
    """Whether a run's pictures go to docs/: the published figures are full-size fp32 runs'."""
    return not fast and precision == "fp32"


def replot(args) -> dict:
    """--replot: redraw the Pareto plot and print the tables from a JSON this benchmark wrote."""
    payload = json.loads(args.replot.read_text())
    if "results" not in payload:  # a refused run: its verdict, no reading to draw
        print(payload.get("verdict", "no reading in this JSON"))
        return payload
    if "spread" in payload["results"]:  # recomputed from the points, so an older JSON gains the newer readings
        payload["derived"].update(spread_reading(payload["points"], payload["results"]["spread"], payload["coverage"]))
    if "sweep" in payload["results"]:
        plot = write_pareto(payload, args.replot.with_suffix(".pareto.png"))
        if publishes(payload["fast"], payload["config"].get("precision", "fp32")) and args.docs:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(plot, args.docs / f"toy_pareto{'' if payload['coverage'] == 'full' else '_partial'}.png")
        print(f"Pareto plot: {plot}")
    print(report(payload))
    return payload


QUALITY = ("control", "domain_score", "fd", "texture_ratio")
# at partial coverage the spread also reads control on the prompts the domain shows and on those it lacks
CONTENT_SPLIT = ("control_in_content", "control_beyond_content")


def spread_keys(coverage: str) -> tuple[str, ...]:
    return QUALITY + (CONTENT_SPLIT if coverage == "partial" else ())


def spread_reading(rows: dict, ids: list[str], coverage: str) -> dict:
    """The spread experiment's reading: every family's mean ± sd over seeds, and the claim read from the means."""
    spread = family_stats(rows, ids, spread_keys(coverage))
    return {"spread": spread, "claim_over_seeds": summarise_over_seeds(spread, rows, ids)}


def family_stats(rows: dict, ids: list[str], keys=QUALITY) -> dict:
    """Per family (a point's id without its seed): mean ± sd over its seeds of each of `keys`."""
    fams = {}
    for pid in ids:
        fams.setdefault(rows[pid]["family"], []).append(rows[pid])
    return {f: {k: mean_sd([r[k] for r in rs]) for k in keys} for f, rs in fams.items()}


def cache_reading(rows: dict, ids: list[str]) -> dict:
    """Per cached family: mean ± sd over seeds of each quality figure, the same uncached family's, and whether the
    cached mean lies within the uncached spread (|difference of means| <= the uncached sd over seeds)."""
    stats = family_stats(rows, ids)
    out = {}
    for fam, st in stats.items():
        if " +cache " not in fam:
            continue
        ref = stats[fam.split(" +cache ", 1)[0]]
        within = {k: abs(st[k]["mean"] - ref[k]["mean"]) <= ref[k]["sd"] for k in QUALITY}
        out[fam] = {"cached": st, "uncached": ref, "within_uncached_spread": within,
                    "all_within": all(within.values())}
    return out


class Run:
    """One run of the benchmark (see `main` for its steps)."""

    def __init__(self, args, cfg: ToyConfig, experiments: list[str]):
        from ...devkit import host

        self.args, self.cfg, self.experiments = args, cfg, experiments
        self.t_all, self.t_cpu = time.perf_counter(), time.process_time()
        self.timings = {}
        host.import_comfy()
        self.root = cache_dir()
        self.models_dir = self.root / "models"
        for kind in ("checkpoints", "diffusion_models", "domain_unets", "controlnet"):
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)
        import comfy.latent_formats

        self.latent_format = comfy.latent_formats.SD15()
        self.points = experiment_points(cfg, experiments)
        self.names, self.fine_tunes, self.trainer_base = {}, {}, {}
        self.rows, self.samples = {}, {}
        self.extra_derived = {}  # the extra experiments' results ("diagnosis", "constants")
        self.cnet_name, self.cnet_summary = None, None
        self.out, self.payload = None, None
        self.base_name, self.base_losses, self.prompts = None, [], []
        self.gate_results, self.gate_readings, self.operating_cfg = {}, {}, None

    # -- (1) base model, cached by its settings
    def base(self) -> None:
        import comfy.model_management

        from ...devkit import tiny_models
        from ...devkit.domain import load_checkpoint

        cfg, args = self.cfg, self.args
        base_key = cfg.key(*BASE_FIELDS)
        self.base_name = f"toy_base_{base_key}.safetensors"
        self.base_path = self.models_dir / "checkpoints" / self.base_name
        base_record = self.root / f"toy_base_{base_key}.json"
        t = time.perf_counter()
        if args.retrain:
            for stale in [self.base_path, base_record]:
                stale.unlink(missing_ok=True)
        if not self.base_path.exists():
            log(f"training the base model ({cfg.base_steps} steps, batch {cfg.base_batch})")
            init_model, init_clip, _ = load_checkpoint(tiny_models.tiny_checkpoint(cfg.seed))
            sd, losses = train_base(cfg, init_model, init_clip)
            del init_model, init_clip
            comfy.model_management.unload_all_models()
            built = tiny_models.tiny_checkpoint(cfg.seed, unet_sd=sd, name=self.base_name)
            shutil.move(str(built), self.base_path)
            common.write_json(base_record, {"losses": losses, "config": dataclasses.asdict(cfg)})
            self.timings["base_training_s"] = time.perf_counter() - t
        else:
            log(f"base model cached: {self.base_path.name}")
        self.base_losses = json.loads(base_record.read_text())["losses"] if base_record.exists() else []

    # -- (1b) the ControlNet (only for the experiment that uses it), trained on the base world, cached by its settings
    def controlnet(self) -> None:
        if "controlnet" not in self.experiments:
            return
        import comfy.model_management

        from ...devkit.domain import load_checkpoint

        cfg = self.cfg
        cnet_key = cfg.key(*CNET_FIELDS)
        self.cnet_name = f"toy_controlnet_{cnet_key}.safetensors"
        cnet_path = self.models_dir / "controlnet" / self.cnet_name
        cnet_record = self.root / f"toy_controlnet_{cnet_key}.json"
        if self.args.retrain:
            for stale in [cnet_path, cnet_record]:
                stale.unlink(missing_ok=True)
        if not (cnet_path.exists() and cnet_record.exists()):
            t = time.perf_counter()
            log(f"training the ControlNet ({cfg.cnet_steps} steps, batch {cfg.cnet_batch}, base frozen)")
            cn_model, cn_clip, _ = load_checkpoint(self.base_path)
            sd, losses = train_controlnet(cfg, cn_model, cn_clip)
            del cn_model, cn_clip
            comfy.model_management.unload_all_models()
            from ...guidance.checkpoint import save_safetensors_atomic

            save_safetensors_atomic({"control_model." + k: v.float().contiguous() for k, v in sd.items()}, cnet_path,
                                    metadata={"indomain.toy": "controlnet", "hint": "shape mask, white on black"})
            common.write_json(cnet_record, {"losses": losses, "config": dataclasses.asdict(cfg),
                                            "seconds": time.perf_counter() - t})
            self.timings["controlnet_training_s"] = time.perf_counter() - t
        else:
            log(f"ControlNet cached: {self.cnet_name}")
        cn_losses = json.loads(cnet_record.read_text())["losses"]
        tail = cn_losses[-20:]
        self.cnet_summary = {"file": self.cnet_name, "steps": len(cn_losses),
                             "first_loss": cn_losses[0] if cn_losses else None,
                             "mean_loss_last_20": sum(tail) / len(tail) if tail else None}

    # -- (2) the unlabelled domain images; the fine-tunes (pack's trainer) are trained when first needed
    def domain_images(self) -> None:
        self.domain_train = world.domain_training_set(self.cfg)
        self.comfy_latents = self.latent_format.process_out(self.domain_train.latents)  # the trainer takes VAE space

    def ensure_finetunes(self, pts: list[Point]) -> None:
        """Train (or find cached) every fine-tune these points sample, before sampling them."""
        from ...devkit.domain import load_checkpoint

        cfg = self.cfg
        needed = sorted({(pt.seed, pt.length, w) for pt in pts
                         for w in {"b": ["naive"], "c": ["domain"], "d": ["lora"]}.get(pt.method, [])} - set(self.names))
        for seed, length, which in needed:
            steps = cfg.domain_steps * (cfg.long_factor if length == "long" else 1)
            if not self.trainer_base and not (self.models_dir / FOLDER_OF[which]
                                              / finetune_name(cfg, which, seed, steps)).exists():
                self.trainer_base["model"], self.trainer_base["clip"], _ = load_checkpoint(self.base_path)
            t = time.perf_counter()
            name, summary, trained = finetune(cfg, which, seed, steps, self.trainer_base.get("model"),
                                              self.trainer_base.get("clip"), self.comfy_latents, self.root,
                                              self.args.retrain)
            self.names[(seed, length, which)] = name
            self.fine_tunes[f"{which} seed={seed} {length}"] = dict(summary, file=name)
            if trained:
                self.timings[f"train_{which}_seed{seed}_{length}_s"] = time.perf_counter() - t

    # -- (3) evaluator (cheap, retrained every run from its seed) and references; the sampler
    def evaluator(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        log(f"training the evaluator ({cfg.evaluator_steps} steps)")
        self.net, self.evaluator_acc = world.train_evaluator(cfg.evaluator_steps, cfg.seed + 7)
        self.timings["evaluator_s"] = time.perf_counter() - t
        combos = world.asked_combos(cfg)
        self.prompts = [world.prompt(s, c) for s, c in combos]
        self.metrics = Metrics(self.net, combos * cfg.samples_per_prompt, cfg.coverage, cfg.seed,
                               hint_offsets=world.hint_offsets(cfg, len(combos)) if "controlnet" in self.points else None)

    # (4) sampling through the product (the node lists see model files written later: ComfyUI rescans a folder
    # whose mtime changed)
    def sampling(self) -> None:
        from ...devkit import host

        cfg = self.cfg
        self.runner = host.InProcessComfy(models_dir=self.models_dir, default_dirs=False)  # don't redirect a test's writes
        hint = world.hint_image(self.metrics.hint_masks) if self.metrics.hint_masks is not None else None
        self.sampler = ToySampler(self.runner, cfg, self.base_name, self.prompts, hint=hint)

    # -- the gates (gates.py): checked and printed before any reading
    def cheap_gates(self) -> list[dict]:
        """G1 (the evaluator), G6 (the FD sees the domain) and G8 (the plan's fairness): no diffusion model."""
        cfg = self.cfg
        t = time.perf_counter()
        self.gate_combos = world.asked_combos(cfg) * cfg.gate_samples
        self.gate_refs = G.references(self.net, self.gate_combos, cfg.seed)
        out = [G.g1_evaluator(self.net, cfg.seed), G.g6_fd_sees_domain(self.gate_refs["figures"]), self.g8()]
        self.timings["gates_cheap_s"] = time.perf_counter() - t
        return out

    def g8(self) -> dict:
        planned = experiment_points(self.cfg, [e for e in self.experiments if e in EXPERIMENTS + OWN_COMMAND_EXPERIMENTS])
        return G.g8_fairness(self.cfg, planned, self.operating_cfg, {"a": CFGS, "b": CFGS, "c": C_CFGS})

    def gate_read(self, pt: Point, names=None) -> tuple[torch.Tensor, dict]:
        """Sample `pt` at gate_samples per prompt (the gate sampler's steps) and read it; the reading is kept."""
        lat = self.latent_format.process_in(self.gate_sampler.sample(pt, names or {}))
        row = {"id": pt.id, **self.gate_metrics(lat)}
        self.gate_readings[f"{pt.id} steps={self.gate_sampler.cfg.sample_steps}"] = row
        return lat, row

    def base_gates(self) -> list[dict]:
        """G2-G4 from the base at cfg 1 and every cfg of the sweep, gate_samples per prompt; sets the operating
        cfg (the base's best control, G2)."""
        cfg = self.cfg
        t = time.perf_counter()
        self.gate_metrics = Metrics(self.net, self.gate_combos, cfg.coverage, cfg.seed)
        self.gate_sampler = ToySampler(self.runner, dataclasses.replace(cfg, samples_per_prompt=cfg.gate_samples),
                                       self.base_name, self.prompts)
        read = self.gate_read
        base = {c: read(Point("a", c)) for c in (1.0, *CFGS)}
        self.gate_base_latents = {c: lat for c, (lat, _) in base.items()}
        g2, op = G.g2_base_control({c: r for c, (_, r) in base.items()})
        self.operating_cfg = op
        plain = self.gate_refs["plain_features"]
        with torch.no_grad():
            fd = {c: world.frechet_distance(self.net.features(base[c][0]), plain) for c in sorted({1.0, op})}
        refs = self.gate_refs["figures"]
        g3 = G.g3_base_quality(fd, refs["fd_plain_vs_plain"], len(self.gate_combos), world.FEATURE_DIM)
        g4 = G.g4_base_domain({c: r for c, (_, r) in base.items()})
        self.timings["gates_base_s"] = time.perf_counter() - t
        return [g2, g3, g4]

    def finetune_gates(self) -> list[dict]:
        """G5 ((b) at the operating cfg, its loss), G7 ((a), (b), (c) at the largest w_d, N vs 2N steps), G8 again
        with the operating cfg."""
        cfg, op, read, sampler = self.cfg, self.operating_cfg, self.gate_read, self.gate_sampler
        gm = self.gate_metrics
        t = time.perf_counter()
        wmax = max(DOMAIN_WEIGHTS)
        pb, pc = Point("b", op), Point("c", op, wmax)
        self.ensure_finetunes([pb, pc])
        names = {"naive": self.names[(0, "short", "naive")], "domain": self.names[(0, "short", "domain")]}
        b_lat, b_row = read(pb, names)
        g5 = G.g5_naive(self.unprompted_naive(names["naive"]), self.fine_tunes["naive seed=0 short"].get("losses"), b_row)
        c_lat, _ = read(pc, names)
        sampler.release()
        sampler.cfg = dataclasses.replace(sampler.cfg, sample_steps=2 * cfg.sample_steps)
        pairs = {}
        for label, pt, lat in (("(a)", Point("a", op), self.gate_base_latents[op]), ("(b)", pb, b_lat),
                               (f"(c) w_d {wmax:g}", pc, c_lat)):
            lat2, _ = read(pt, names)
            pairs[label] = ({"per_sample": gm.per_sample(lat)}, {"per_sample": gm.per_sample(lat2)})
        sampler.release()
        g7 = G.g7_sampler(pairs)
        self.timings["gates_finetune_s"] = time.perf_counter() - t
        return [g5, g7, self.g8()]

    def unprompted_naive(self, naive: str) -> dict:
        """G5's reading: the naive fine-tune's samples with the empty prompt at cfg 1, gate_samples per prompt slot."""
        cfg = self.cfg
        sampler = ToySampler(self.runner, dataclasses.replace(cfg, samples_per_prompt=cfg.gate_samples), self.base_name,
                             [""] * len(self.prompts))
        pt = Point("b", 1.0)
        lat = self.latent_format.process_in(sampler.sample(pt, {"naive": naive}))
        sampler.release()
        m = self.gate_metrics(lat)
        row = {"id": f"{pt.id} no prompt", **{k: m[k] for k in ("samples", "domain_score", "off_data", "fd", "kid",
                                                                "texture_ratio", "tint_ratio")}}
        self.gate_readings[f"{row['id']} steps={cfg.sample_steps}"] = row
        return row

    def gates(self, results: list[dict]) -> bool:
        """Record and print the gates; whether the run goes on (enforce: all passed so far; only: until every
        gate is measured; report: always)."""
        for g in results:
            self.gate_results[g["gate"]] = g
        G.print_gates(results)
        mode = self.args.gates
        if mode == "only" and len(self.gate_results) < len(G.GATES):
            self.stop(final=False)  # the gates measured so far, in case the run is cut short
        if mode == "report":
            return True
        if mode == "only":
            return len(self.gate_results) < len(G.GATES)
        return all(g["pass"] for g in self.gate_results.values())

    def gate_summary(self) -> dict:
        done = [self.gate_results[k] for k in G.GATES if k in self.gate_results]
        missing = [k for k in G.GATES if k not in self.gate_results]
        text = G.verdict(done)
        if missing:
            text = (text or "gates measured so far passed") + f"; not measured: {', '.join(missing)}"
        return {"gates": {g["gate"]: g for g in done}, "gate_readings": self.gate_readings,
                "calibrated": not missing and all(g["pass"] for g in done), "verdict": text or "calibrated: every gate passed",
                "gates_mode": self.args.gates}

    def stop(self, final: bool = True) -> dict:
        """No reading: a gate failed (enforce) or only the gates were asked for (only). `final` False: write the
        JSON of the gates so far and say nothing."""
        summary = self.gate_summary()
        self.timings["total_s"] = time.perf_counter() - self.t_all
        self.timings["total_cpu_s"] = time.process_time() - self.t_cpu
        payload = {"bench": "toy", "version": TOY_VERSION, "fast": self.args.fast, "coverage": self.cfg.coverage,
                   "experiments": self.experiments, "config": dataclasses.asdict(self.cfg),
                   "environment": common.environment(), **summary,
                   "models": {"base": self.base_name, "fine_tunes": self.fine_tunes},
                   "reading": None, "timings_s": self.timings}
        self.out, self.payload = common.write_json(self.args.out, payload), payload
        if not final:
            return payload
        print("\n" + summary["verdict"], flush=True)
        print(f"no reading ({'--gates only' if self.args.gates == 'only' else 'refused'}); JSON: {self.out}", flush=True)
        return payload

    def sample_experiments(self) -> None:
        cfg, sampler = self.cfg, self.sampler
        for exp, pts in self.points.items():
            self.ensure_finetunes(pts)
            t, tc = time.perf_counter(), time.process_time()
            todo = sorted([pt for pt in pts if pt.id not in self.rows], key=lambda q: (q.seed, q.length))
            last = None
            for pt in todo:
                if (pt.seed, pt.length) != last and last is not None:
                    sampler.release()
                last = (pt.seed, pt.length)
                gnames = {w: self.names.get((pt.seed, pt.length, w)) for w in ("naive", "domain", "lora")}
                gnames["controlnet"] = self.cnet_name
                lat = self.latent_format.process_in(sampler.sample(pt, gnames))
                self.samples[pt.id] = lat
                self.rows[pt.id] = {"id": pt.id, "family": pt.family, "method": pt.method, "label": METHODS[pt.method],
                                    "cfg": pt.cfg, "domain_weight": pt.wd if pt.method in "cd" else None,
                                    "schedule": [pt.start, pt.end], "remedy": pt.remedy, "seed": pt.seed,
                                    "length": pt.length, "controlnet": pt.cnet, **self.metrics(lat)}
            if exp == "controlnet":  # IoU with the hints, also for a point another experiment sampled (no ControlNet)
                for pt in pts:
                    self.rows[pt.id].update(self.metrics.spatial(self.samples[pt.id]))
            sampler.release()
            self.timings[f"sample_{exp}_s"] = time.perf_counter() - t
            self.timings[f"sample_{exp}_cpu_s"] = time.process_time() - tc
            log(f"{exp}: {len(todo)} new points ({len(pts)} in all) in {self.timings[f'sample_{exp}_s']:.1f}s")
            self.write_payload(done=list(self.points)[:list(self.points).index(exp) + 1])

    def diagnose(self) -> None:
        if "diagnose" not in self.experiments:
            return
        dpts = [Point("c", c, wd) for wd, c in DIAGNOSE_POINTS]
        self.ensure_finetunes(dpts)
        t = time.perf_counter()
        self.extra_derived["diagnosis"] = {pt.family: self.sampler.diagnose(pt, {"domain": self.names[(0, "short", "domain")]})
                                           for pt in dpts}
        self.sampler.release()
        self.timings["diagnose_s"] = time.perf_counter() - t
        log(f"diagnose: {len(dpts)} trajectories in {self.timings['diagnose_s']:.1f}s")
        self.write_payload(done=list(self.points))

    def constants(self) -> None:
        if "constants" not in self.experiments:
            return
        import comfy.model_management
        import comfy.samplers

        from ...devkit.domain import load_checkpoint
        from .constants import stand_in_error

        cfg = self.cfg
        t = time.perf_counter()
        c_model, c_clip, _ = load_checkpoint(self.base_path)
        held = world.sample_batch(32, torch.Generator().manual_seed(cfg.seed + 400), style="domain",
                                  combos=world.coverage_combos(cfg.coverage))
        held_prompts = [world.prompt(world.SHAPES[i], world.COLOURS[j]) for i, j in zip(held.shape.tolist(),
                                                                                        held.colour.tolist())]
        sigmas = comfy.samplers.calculate_sigmas(c_model.get_model_object("model_sampling"), cfg.scheduler,
                                                 cfg.sample_steps)[:-1].tolist()  # the sampling schedule's levels
        self.extra_derived["constants"] = stand_in_error(c_model, c_clip, held.latents, held_prompts, sigmas,
                                                         self.domain_train.latents[:min(64, cfg.domain_images)], cfg.seed)
        del c_model, c_clip
        comfy.model_management.unload_all_models()
        self.timings["constants_s"] = time.perf_counter() - t
        log(f"constants: {len(sigmas)} noise levels in {self.timings['constants_s']:.1f}s")
        self.write_payload(done=list(self.points))

    def derived(self, results: dict) -> dict:
        """What the experiments done so far answer: the claim's questions, the spreads, forgetting."""
        rows, cfg = self.rows, self.cfg
        derived = dict(self.extra_derived)
        if "sweep" in results:
            derived["claim"] = summarise(rows, results["sweep"])
        if "spread" in results:
            derived.update(spread_reading(rows, results["spread"], cfg.coverage))
        if "forgetting" in results:
            derived["forgetting"] = [
                {"family": rows[pid]["family"].replace(" long", ""), "length": rows[pid]["length"],
                 "steps": cfg.domain_steps * (cfg.long_factor if rows[pid]["length"] == "long" else 1),
                 **{k: rows[pid][k] for k in QUALITY}}
                for pid in results["forgetting"]]
        if "cache" in results:
            derived["cache"] = cache_reading(rows, results["cache"])
        if "controlnet" in results:
            derived["controlnet"] = family_stats(rows, results["controlnet"],
                                                 ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score",
                                                  "fd", "texture_ratio", "tint_ratio"))
        return derived

    def write_payload(self, done: list[str]) -> tuple[Path, dict]:
        """The JSON so far (written after every experiment; `complete` once all ran)."""
        cfg, args, timings = self.cfg, self.args, self.timings
        results = {exp: [pt.id for pt in self.points[exp]] for exp in done}
        derived = self.derived(results)
        timings["total_s"] = time.perf_counter() - self.t_all
        timings["total_cpu_s"] = time.process_time() - self.t_cpu
        base_losses = self.base_losses
        payload = {
            "bench": "toy", "version": TOY_VERSION, "fast": args.fast, "coverage": cfg.coverage,
            "experiments": self.experiments, "experiments_done": done, "complete": done == list(self.points),
            "config": dataclasses.asdict(cfg), "environment": common.environment(),
            "grids": {"cfgs": CFGS, "domain_weights": DOMAIN_WEIGHTS, "c_cfgs": C_CFGS, "headline": HEADLINE,
                      "halves": [h[:2] for h in HALVES], "remedy_points": REMEDY_POINTS, "remedies": REMEDIES,
                      "controlnet_cfgs": CNET_CFGS, "controlnet_modes": CNET_MODES},
            "world": {"shapes": world.SHAPES, "colours": world.COLOURS, "coverage_combos": world.coverage_combos(cfg.coverage),
                      "prompts": self.prompts, "latent": [4, world.SIZE, world.SIZE]},
            "models": {"base": self.base_name, "base_final_loss_mean_last_20": (sum(base_losses[-20:]) / max(1, len(base_losses[-20:]))
                                                                                if base_losses else None),
                       "fine_tunes": self.fine_tunes, "controlnet": self.cnet_summary},
            "sampled_through": SAMPLED_THROUGH,
            "points": self.rows, "results": results, "derived": derived,
            "references": {**self.metrics.references, "evaluator_accuracy_on_fresh_real_data": self.evaluator_acc,
                           "texture_level_real_domain": self.metrics.ref_texture},
            "timings_s": timings,
        }
        summary = self.gate_summary()
        payload.update(summary)
        payload["reading"] = {"calibrated": summary["calibrated"], "experiments_done": done,
                              "status": "calibrated" if summary["calibrated"] else
                              "UNCALIBRATED (--gates report): " + summary["verdict"]}
        self.out, self.payload = common.write_json(args.out, payload), payload
        return self.out, payload

    def record_models(self) -> None:
        """The record of the cached models (demo --toy reads it); a run of a few experiments keeps the names an
        earlier run of the same base and settings recorded."""
        if self.payload is None:
            self.write_payload(done=list(self.points))
        cfg = self.cfg
        latest = self.root / f"latest_{cfg.coverage}{'_fast' if self.args.fast else ''}.json"
        known = {}
        if latest.is_file():
            try:
                before = json.loads(latest.read_text())
                if (before.get("base"), before.get("config"), before.get("models_dir")) == (
                        self.base_name, dataclasses.asdict(cfg), str(self.models_dir)):
                    known = before.get("names", {})
            except (OSError, ValueError):
                pass  # unreadable: rewritten below
        known.update({f"{k[2]} seed={k[0]} {k[1]}": v for k, v in self.names.items()})
        common.write_json(latest, {"models_dir": str(self.models_dir), "base": self.base_name, "names": known,
                                   "config": dataclasses.asdict(cfg), "json": str(self.out)})

    # -- (6) pictures: the Pareto plot and a sample grid; the tables
    def finish(self) -> dict:
        args, cfg, out, payload = self.args, self.cfg, self.out, self.payload
        suffix = "" if cfg.coverage == "full" else "_partial"
        plot = out.with_suffix(".pareto.png")
        if "sweep" in self.points:
            write_pareto(payload, plot)
        grid = out.with_suffix(".png")
        write_grid(payload, self.samples, self.metrics, self.prompts, cfg.samples_per_prompt, grid)
        if "controlnet" in self.points:
            write_controlnet_grid(self.samples, self.metrics, self.prompts, out.with_suffix(".controlnet.png"))
        if publishes(args.fast, cfg.precision) and args.docs and "sweep" in self.points:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(plot, args.docs / f"toy_pareto{suffix}.png")
            shutil.copy(grid, args.docs / f"toy_grid{suffix}.png")
        print(report(payload))
        print(f"\nJSON: {out}\nPareto plot: {plot}\ngrid: {grid}")
        return payload
