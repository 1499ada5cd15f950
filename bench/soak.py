"""Soak: many text-guided API runs queued on one real ComfyUI server with the tiny models, alternating
domain weight 0 / 2 and two domain UNets. All must succeed; the server's resident memory after the
first 10 runs may grow < 5 % by the last; the number of loaded models must stay constant.

    python -m indomain.bench.soak --count 100

The loaded-model count comes from a small probe installed only into this bench's server
(custom_nodes/indomain_soak_probe: one GET route reading comfy.model_management.current_loaded_models).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import PACK_ROOT, environment, table, write_json

PROBE = '''"""Bench-only probe (written by indomain.bench.soak): how many models ComfyUI holds loaded."""
from aiohttp import web

import comfy.model_management as mm
from server import PromptServer


@PromptServer.instance.routes.get("/indomain_soak/loaded")
async def loaded(request):
    names = [type(m.model.model).__name__ if m.model is not None else None for m in mm.current_loaded_models]
    return web.json_response({"count": len(names), "models": names})

NODE_CLASS_MAPPINGS = {}
'''


def install_probe(base: Path) -> None:
    d = base / "custom_nodes" / "indomain_soak_probe"
    d.mkdir(parents=True, exist_ok=True)
    (d / "__init__.py").write_text(PROBE)


def soak(server, workflow: dict, count: int, domains: tuple[str, str], steps: int = 2, size: int = 64,
         progress=None) -> dict:
    import psutil

    from indomain.client import ComfyClient, apply_overrides

    client = ComfyClient(server.url, timeout=60)
    proc = psutil.Process(server.proc.pid)
    rows, failures = [], []
    for i in range(count):
        wf = json.loads(json.dumps(workflow))
        weight = 0.0 if i % 2 == 0 else 2.0
        domain = domains[(i // 2) % 2]
        apply_overrides(wf, seed=i, steps=steps, domain_weight=weight, domain_unet=domain, width=size, height=size,
                        batch_size=1, filename_prefix=f"soak/run_{i:03d}")
        t = time.perf_counter()
        log_at = len(server.log())
        try:
            client.run(wf, out_dir=None, timeout=600)
            ok = True
        except Exception as e:  # noqa: BLE001 - a soak failure is a result, reported
            ok = False
            failures.append({"run": i + 1, "error": f"{type(e).__name__}: {e}"[:2000],
                             "server_log": server.log()[log_at:][-4000:]})
        loaded = client.get_json("/indomain_soak/loaded")
        rows.append({"run": i + 1, "ok": ok, "domain_weight": weight, "domain": domain,
                     "rss_mib": round(proc.memory_info().rss / 2 ** 20, 1), "loaded_models": loaded["count"],
                     "models": loaded["models"], "seconds": round(time.perf_counter() - t, 2)})
        if progress:
            progress(rows[-1] if ok else dict(rows[-1], error=failures[-1]["error"]))
    ref = rows[min(9, len(rows) - 1)]["rss_mib"]
    last = rows[-1]["rss_mib"]
    counts = sorted({r["loaded_models"] for r in rows[1:]})  # after the first run has loaded everything
    return {"count": count, "rows": rows, "failures": failures, "all_ok": not failures,
            "rss_after_10_mib": ref, "rss_last_mib": last, "growth_after_10": round((last - ref) / ref, 4),
            "loaded_model_counts": counts, "models_constant": len(counts) == 1}


def main(argv=None) -> int:
    import argparse

    from indomain.devkit import tiny_models
    from indomain.devkit import workflows as specs
    from indomain.devkit.domain import load_checkpoint, make_domain_unet
    from indomain.devkit.host import ComfyServer, InProcessComfy

    ap = argparse.ArgumentParser(prog="python -m indomain.bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=PACK_ROOT / ".cache" / "soak")
    ap.add_argument("--out", type=Path, default=PACK_ROOT / "artifacts" / "bench" / "soak.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the server (shared machines)")
    args = ap.parse_args(argv)
    if args.threads:
        import os

        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process inherits it
    ckpt = tiny_models.tiny_checkpoint(0)
    domains_dir = args.work / "domain_unets"
    domains_dir.mkdir(parents=True, exist_ok=True)
    names = ("soak_domain_a.safetensors", "soak_domain_b.safetensors")
    if not all((domains_dir / n).is_file() for n in names):
        InProcessComfy(models_dir=args.work / "models", output_dir=args.work / "output", default_dirs=False)
        model, clip, _ = load_checkpoint(ckpt)
        for seed, n in enumerate(names):
            make_domain_unet(model, clip, domains_dir / n, seed=seed, perturb=0.05)
    base = args.work / "server"
    install_probe(base)
    srv = ComfyServer(base, models={"checkpoints": {"tiny_sd15.safetensors": ckpt},
                                    "domain_unets": {n: domains_dir / n for n in names}})
    wf = specs.substitute(json.loads((specs.API_DIR / "indomain_2_text_guided.json").read_text()),
                          specs.tiny_model_names())
    srv.start()
    try:
        t = time.perf_counter()
        result = soak(srv, wf, args.count, names, steps=args.steps,
                      progress=lambda r: print(f"run {r['run']:3d} ok={r['ok']} w_d={r['domain_weight']} rss="
                                               f"{r['rss_mib']} MiB models={r['loaded_models']}"
                                               + (f" error: {r['error']}" if "error" in r else ""), flush=True))
        result["seconds"] = round(time.perf_counter() - t, 1)
    finally:
        srv.stop()
    result["env"] = environment()
    marks = sorted({1, 10, *range(20, args.count + 1, 10), args.count} & set(range(1, args.count + 1)))
    rows = [[r["run"], r["rss_mib"], r["loaded_models"], "ok" if r["ok"] else "FAILED"] for r in result["rows"]
            if r["run"] in marks]
    print(table(["run", "server RSS (MiB)", "loaded models", "result"], rows, title=f"soak, {args.count} runs"))
    print(f"all succeeded: {result['all_ok']}; RSS growth after run 10: {100 * result['growth_after_10']:.1f}% "
          f"(target < 5%); loaded model counts after run 1: {result['loaded_model_counts']}; {result['seconds']} s")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    ok = result["all_ok"] and result["growth_after_10"] < 0.05 and result["models_constant"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
