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
                     EXTRA_EXPERIMENTS, BASE_FIELDS, HALVES, HEADLINE, REMEDIES, REMEDY_POINTS, TOY_VERSION, ToyConfig,
                     cache_dir, log)
from .experiments import METHODS, SAMPLED_THROUGH, Point, ToySampler, experiment_points
from .metrics import Metrics, mean_sd, summarise
from .models import FOLDER_OF, finetune, finetune_name, train_base, train_controlnet
from .plot import write_controlnet_grid, write_grid, write_pareto
from .report import report


def main(argv=None) -> dict:
    args, cfg, experiments = parse_args(argv)
    if args.replot:
        return replot(args)
    run = Run(args, cfg, experiments)
    run.base()
    run.controlnet()
    run.domain_images()
    run.evaluator()
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
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all); also 'diagnose' "
                        "(per step: norms of D - u and B(c) - u and their cosine along (c)'s trajectories) and "
                        "'constants' (per noise level: the untrained null-text UNet against u, one constant per "
                        "layer vs per-level constants)")
    p.add_argument("--docs", type=Path, default=common.PACK_ROOT / "docs",
                   help="full runs also write toy_pareto[_partial].png and toy_grid[_partial].png here")
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the Pareto plot and print the tables from a JSON this script wrote")
    args = p.parse_args(argv)
    if args.replot:
        return args, None, []
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    bad = [e for e in experiments if e not in EXPERIMENTS + EXTRA_EXPERIMENTS]
    if bad:
        p.error(f"unknown experiment(s) {', '.join(bad)}; choose from {', '.join(EXPERIMENTS + EXTRA_EXPERIMENTS)}")
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
    if not 1 <= cfg.prompts <= 16:
        p.error(f"--prompts must be 1..16 (got {cfg.prompts})")
    if args.out == common.PACK_ROOT / "artifacts" / "bench" / "toy.json":
        args.out = args.out.with_name(f"toy_{cfg.coverage}{'_fast' if args.fast else ''}.json")
    return args, cfg, experiments


def replot(args) -> dict:
    """--replot: redraw the Pareto plot and print the tables from a JSON this benchmark wrote."""
    payload = json.loads(args.replot.read_text())
    if "sweep" in payload["results"]:
        plot = write_pareto(payload, args.replot.with_suffix(".pareto.png"))
        if not payload["fast"] and args.docs:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(plot, args.docs / f"toy_pareto{'' if payload['coverage'] == 'full' else '_partial'}.png")
        print(f"Pareto plot: {plot}")
    print(report(payload))
    return payload


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
        from ...devkit import host

        cfg = self.cfg
        t = time.perf_counter()
        log(f"training the evaluator ({cfg.evaluator_steps} steps)")
        self.net, self.evaluator_acc = world.train_evaluator(cfg.evaluator_steps, cfg.seed + 7)
        self.timings["evaluator_s"] = time.perf_counter() - t
        combos = world.asked_combos(cfg)
        self.prompts = [world.prompt(s, c) for s, c in combos]
        self.metrics = Metrics(self.net, combos * cfg.samples_per_prompt, cfg.coverage, cfg.seed,
                               hint_offsets=world.hint_offsets(cfg, len(combos)) if "controlnet" in self.points else None)
        # (4) sampling through the product (runner created now, so the node lists see the new model files)
        self.runner = host.InProcessComfy(models_dir=self.models_dir, default_dirs=False)  # don't redirect a test's writes
        hint = world.hint_image(self.metrics.hint_masks) if self.metrics.hint_masks is not None else None
        self.sampler = ToySampler(self.runner, cfg, self.base_name, self.prompts, hint=hint)

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
            fams = {}
            for pid in results["spread"]:
                fams.setdefault(rows[pid]["family"], []).append(rows[pid])
            derived["spread"] = {f: {k: mean_sd([r[k] for r in rs]) for k in
                                     ("control", "domain_score", "fd", "texture_ratio")} for f, rs in fams.items()}
        if "forgetting" in results:
            derived["forgetting"] = [
                {"family": rows[pid]["family"].replace(" long", ""), "length": rows[pid]["length"],
                 "steps": cfg.domain_steps * (cfg.long_factor if rows[pid]["length"] == "long" else 1),
                 **{k: rows[pid][k] for k in ("control", "domain_score", "fd", "texture_ratio")}}
                for pid in results["forgetting"]]
        if "controlnet" in results:
            fams = {}
            for pid in results["controlnet"]:
                fams.setdefault(rows[pid]["family"], []).append(rows[pid])
            derived["controlnet"] = {f: {k: mean_sd([r[k] for r in rs]) for k in
                                         ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score", "fd",
                                          "texture_ratio", "tint_ratio")}
                                     for f, rs in fams.items()}
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
        if not args.fast and args.docs and "sweep" in self.points:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(plot, args.docs / f"toy_pareto{suffix}.png")
            shutil.copy(grid, args.docs / f"toy_grid{suffix}.png")
        print(report(payload))
        print(f"\nJSON: {out}\nPareto plot: {plot}\ngrid: {grid}")
        return payload
