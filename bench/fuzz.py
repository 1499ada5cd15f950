"""Fuzz: corrupted domain UNet files through the loader, mutated API workflows through the client and a
real server's POST /prompt. Goal: 0 uncaught exceptions, every case a named error, nothing written,
the server still answering.

    python -m indomain.bench.fuzz --seed 0 --count 1000

Checkpoints. Each case mutates a valid domain UNet file: truncation at a random offset, a lying
header length, flipped header bytes, a tensor's dtype or shape changed (consistently: the data
re-encoded; or only in the header), garbage / missing / non-JSON metadata, NaN/inf in the payload,
all constants zero, flipped payload bytes (benign: still a valid file). Most cases use a small
synthetic file (fast, exercises the file reader and validation); every tenth uses the real tiny
domain UNet and goes all the way through the Load Domain UNet node with its base (pairing, shapes,
building the model). A case passes when it loads or raises DomainCheckpointError; anything else
(another exception type) is an uncaught failure.

Workflows. Each case mutates one of the API-format twins in workflows/api/ so that it must be
refused: a wrong type, a dangling link, an out-of-range number, a missing required input, a huge
string in a name, a broken node. It goes through the client (apply_overrides, ComfyClient.submit)
to the server. A case passes when the client raises one of its named errors (ComfyClientError and
subclasses); uncaught = anything else, or the server running it. (ComfyUI queues a workflow when at least one
output is valid; the client then cancels it and refuses the workflow: all or nothing.) Afterwards: the server
answers /system_stats, its queue is empty and its output folder unchanged.
"""
from __future__ import annotations

import copy
import json
import random
import struct
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from .common import PACK_ROOT, environment, table, write_json

CKPT_KINDS = ("truncate", "header_length", "header_bytes", "dtype_consistent", "dtype_header_only", "shape_consistent",
              "shape_header_only", "metadata_garbage", "metadata_missing", "metadata_huge", "nan_inf", "zero_constants",
              "drop_tensor", "extra_tensor", "payload_bytes", "empty_file")
WF_KINDS = ("wrong_type", "dangling_link", "bad_output_index", "out_of_range", "missing_input", "huge_string",
            "unknown_class", "broken_node", "bad_combo", "link_type_mismatch")
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.uint8, torch.bool,
          torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- checkpoints


def small_domain_file(path: Path) -> Path:
    """A small valid domain UNet file (the layout of a null-text UNet, a few tensors)."""
    from indomain.guidance.checkpoint import DomainMeta, write_domain_checkpoint

    g = torch.Generator().manual_seed(0)
    sd = {"input_blocks.1.1.transformer_blocks.0.attn2.constant": torch.randn(16, generator=g),
          "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(16, 16, generator=g),
          "out.2.weight": torch.randn(4, 16, 3, 3, generator=g), "out.2.bias": torch.randn(4, generator=g)}
    meta = DomainMeta("SD15", "EPS", "0" * 64, "1" * 64, calibration={"latents": 8}, training={"steps": 1})
    return write_domain_checkpoint(path, sd, meta)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _rewrite(tensors: dict, metadata: dict, path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def mutate_checkpoint(src: Path, dst: Path, kind: str, rng: random.Random) -> str:
    """Write a mutated copy of src to dst; returns a short description."""
    from safetensors import safe_open

    raw = src.read_bytes()
    header, data = _split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    md = dict(header.get("__metadata__", {}))
    name = rng.choice(names)
    if kind == "truncate":
        cut = rng.randrange(0, len(raw))
        dst.write_bytes(raw[:cut])
        return f"truncated at {cut}/{len(raw)}"
    if kind == "empty_file":
        dst.write_bytes(b"")
        return "empty"
    if kind == "header_length":
        n = struct.unpack("<Q", raw[:8])[0]
        lie = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), len(raw) * 4, 2 ** 63, 2 ** 64 - 1, rng.randrange(2 ** 40)])
        dst.write_bytes(struct.pack("<Q", lie % 2 ** 64) + raw[8:])
        return f"header length {n} -> {lie}"
    if kind == "header_bytes":
        n = struct.unpack("<Q", raw[:8])[0]
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
        dst.write_bytes(bytes(b))
        return "header bytes flipped"
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if kind == "dtype_consistent":
        dt = rng.choice(DTYPES)
        t = tensors[name]
        tensors[name] = (t != 0) if dt == torch.bool else t.to(dt)
        _rewrite(tensors, md, dst)
        return f"{name} stored as {dt}"
    if kind == "dtype_header_only":
        header[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I8", "I64", "U8", "BOOL", "F8_E5M2", "XYZ", 7])
        dst.write_bytes(_join(header, data))
        return f"{name} header dtype {header[name]['dtype']}"
    if kind == "shape_consistent":
        t = tensors[name]
        shape = list(t.shape) + [1] if rng.random() < 0.5 else [t.numel()]
        tensors[name] = t.reshape(shape) if rng.random() < 0.5 else torch.randn(*[s + 1 for s in t.shape])
        _rewrite(tensors, md, dst)
        return f"{name} shape {tuple(t.shape)} -> {tuple(tensors[name].shape)}"
    if kind == "shape_header_only":
        header[name]["shape"] = rng.choice([[], [0], [2 ** 40], [-1], ["a"], [s * 2 for s in header[name]["shape"]]])
        dst.write_bytes(_join(header, data))
        return f"{name} header shape {header[name]['shape']}"
    if kind in ("metadata_garbage", "metadata_missing", "metadata_huge"):
        key = rng.choice(sorted(md) + ["indomain.format_version", "indomain.calibration", "indomain.training"])
        if kind == "metadata_missing":
            md.pop(key, None)
        elif kind == "metadata_huge":
            md[key] = "x" * rng.choice([10 ** 5, 10 ** 6])
        else:
            md[key] = rng.choice(["", "{", "[1,2", "null", "99", "-1", "1e309", "\u0000", "{\"a\": NaN}", "\udcff".encode(
                "utf-8", "surrogatepass").decode("latin-1"), "0" * 64, "indomain.domain_unet", "true", "[]"])
        _rewrite(tensors, md, dst)
        return f"metadata {key} {kind}"
    if kind == "nan_inf":
        t = tensors[name].clone().float()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        tensors[name] = t.to(tensors[name].dtype)
        _rewrite(tensors, md, dst)
        return f"non-finite value in {name}"
    if kind == "zero_constants":
        for k in tensors:
            if k.endswith(".attn2.constant"):
                tensors[k] = torch.zeros_like(tensors[k])
        _rewrite(tensors, md, dst)
        return "all constants zero"
    if kind == "drop_tensor":
        tensors.pop(name)
        _rewrite(tensors, md, dst)
        return f"dropped {name}"
    if kind == "extra_tensor":
        tensors[f"extra.{rng.randrange(1000)}.weight"] = torch.randn(3, 3)
        _rewrite(tensors, md, dst)
        return "extra tensor"
    if kind == "payload_bytes":
        n = struct.unpack("<Q", raw[:8])[0]
        b = bytearray(raw)
        start = 8 + n
        for _ in range(rng.randint(1, 16)):
            if len(b) > start:
                b[rng.randrange(start, len(b))] = rng.randrange(256)
        dst.write_bytes(bytes(b))
        return "payload bytes flipped"
    raise ValueError(kind)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def fuzz_checkpoints(count: int, seed: int, work: Path, base_model, real_domain: Path | None,
                     deep_every: int = 10) -> dict:
    """Run `count` corrupted files through the loader; returns outcome counts and any uncaught failures."""
    from indomain.guidance.checkpoint import DomainCheckpointError, read_domain_checkpoint
    from indomain.sampling.domain_model import load_domain_model

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    small = small_domain_file(work / "small_src.safetensors")
    outcomes, by_kind, failures = Counter(), Counter(), []
    watched = [p for p in (work, real_domain.parent if real_domain else None) if p is not None]
    before = {str(p): _listing(p) for p in watched}
    for i in range(count):
        kind = rng.choice(CKPT_KINDS)
        deep = real_domain is not None and base_model is not None and i % deep_every == 0
        dst = work / f"case_{i % 4}.safetensors"
        try:
            what = mutate_checkpoint(real_domain if deep else small, dst, kind, rng)
        except Exception as e:  # noqa: BLE001 - a mutation the writer itself refuses (e.g. bad metadata) is skipped
            outcomes["mutation_not_writable"] += 1
            continue
        try:
            if deep:
                load_domain_model(base_model, dst)  # what the Load Domain UNet node runs
            else:
                read_domain_checkpoint(dst)
            outcomes["loaded"] += 1
            by_kind[(kind, "loaded")] += 1
        except DomainCheckpointError as e:
            outcomes["named_error"] += 1
            by_kind[(kind, "named_error")] += 1
            if not str(e).strip():
                failures.append({"case": i, "kind": kind, "what": what, "error": "empty message"})
        except Exception as e:  # noqa: BLE001 - this is what the fuzz looks for
            outcomes["uncaught"] += 1
            by_kind[(kind, "uncaught")] += 1
            failures.append({"case": i, "kind": kind, "what": what, "deep": deep, "error": f"{type(e).__name__}: {e}"[:500],
                             "traceback": traceback.format_exc()[-1500:]})
    for p in work.glob("case_*.safetensors"):
        p.unlink()
    after = {str(p): _listing(p) for p in watched}
    written = {k: sorted(set(after[k]) - set(before[k])) for k in after if set(after[k]) - set(before[k])}
    return {"count": count, "seed": seed, "outcomes": dict(outcomes), "failures": failures, "written": written,
            "by_kind": {f"{k}:{o}": n for (k, o), n in sorted(by_kind.items())}}


# ----------------------------------------------------------------------------- workflows


def _widget_inputs(wf: dict, object_info: dict) -> list[tuple[str, str, list]]:
    """(node id, input name, spec) for every literal input of the workflow."""
    out = []
    for nid, node in wf.items():
        info = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, list) and name in specs:
                out.append((nid, name, specs[name]))
    return out


def _range_violation(spec: list, rng: random.Random):
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        choices = []
        if lo is not None:
            choices.append(lo - (1 if kind == "INT" else rng.choice([1e-3, 1.0, 1e9])))
        if hi is not None:
            choices.append(hi + (1 if kind == "INT" else rng.choice([1e-3, 1.0, 1e9])))
        if choices:
            return rng.choice(choices)
    return None


def _is_combo(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] == "COMBO"


def _pack_combos(wf: dict, widgets: list) -> list[tuple[str, str]]:
    """The combo inputs of this pack's nodes: the only combos a wrong value may go into.

    ComfyUI 0.3.75 does not check a V3 node's combo value at validation (fixed in 0.33), so a bad value in one of
    core's V3 nodes runs and fails in core's execute (BasicScheduler's scheduler = 5 and = a 100000-char string,
    both seen in full CI sessions), and its LoadImage accepts any existing path ('' = the input folder,
    '/etc/passwd'): core defects, not this pack's."""
    return [(n, k) for n, k, s in widgets if _is_combo(s) and wf[n]["class_type"].startswith("InDomain")]


def mutate_workflow(wf: dict, object_info: dict, kind: str, rng: random.Random) -> tuple[dict, str] | None:
    """A copy of wf made invalid by one mutation of `kind`, or None when the workflow offers no target."""
    wf = copy.deepcopy(wf)
    ids = sorted(wf)
    nid = rng.choice(ids)
    node = wf[nid]
    inputs = node.setdefault("inputs", {})
    widgets = _widget_inputs(wf, object_info)
    links = [(n, k) for n in ids for k, v in wf[n].get("inputs", {}).items() if isinstance(v, list)]
    if kind == "wrong_type":
        typed = [(n, k, s) for n, k, s in widgets if s[0] in ("INT", "FLOAT", "BOOLEAN") or (
                 _is_combo(s) and wf[n]["class_type"].startswith("InDomain"))]  # (see _pack_combos)
        if not typed:
            return None
        n, k, s = rng.choice(typed)
        # only values every host refuses at validation: it coerces a BOOLEAN with bool() (a dict or null is a valid
        # True/False there) and a FLOAT "NaN" passes its min/max checks (this pack's nodes refuse NaN when they run,
        # tests/test_reliability_fuzz.py::test_a_nan_weight_is_refused_by_name; core's do not)
        bad = rng.choice(["abc", "", None, {"a": 1}, "1e999x", []]) if s[0] != "BOOLEAN" else rng.choice(
            [[1, 2, 3], [], ["x"]])
        if s[0] in ("INT", "FLOAT") and bad == []:
            bad = "[]"
        wf[n]["inputs"][k] = bad
        return wf, f"{wf[n]['class_type']}.{k} = {str(bad)[:20]!r}"
    if kind == "dangling_link":
        if not links:
            return None
        n, k = rng.choice(links)
        wf[n]["inputs"][k] = [rng.choice(["999", "-1", "", "x" * 50]), 0]
        return wf, f"{wf[n]['class_type']}.{k} -> missing node"
    if kind == "bad_output_index":
        if not links:
            return None
        n, k = rng.choice(links)
        wf[n]["inputs"][k] = [wf[n]["inputs"][k][0], rng.choice([99, -5, 2 ** 40])]
        return wf, f"{wf[n]['class_type']}.{k} output index out of range"
    if kind == "out_of_range":
        ranged = [(n, k, s, v) for n, k, s in widgets if (v := _range_violation(s, rng)) is not None]
        if not ranged:
            return None
        n, k, s, v = rng.choice(ranged)
        wf[n]["inputs"][k] = v
        return wf, f"{wf[n]['class_type']}.{k} = {v}"
    if kind == "missing_input":
        cands = []
        for n in ids:
            req = object_info.get(wf[n]["class_type"], {}).get("input", {}).get("required", {})
            cands += [(n, k) for k in wf[n].get("inputs", {}) if k in req]
        if not cands:
            return None
        n, k = rng.choice(cands)
        del wf[n]["inputs"][k]
        return wf, f"{wf[n]['class_type']}.{k} removed"
    if kind == "huge_string":
        combos = _pack_combos(wf, widgets)  # (see _pack_combos)
        size = rng.choice([10 ** 4, 10 ** 5, 10 ** 6])
        if combos and rng.random() < 0.6:
            n, k = rng.choice(combos)
            wf[n]["inputs"][k] = "\u00e9" * size
            return wf, f"{wf[n]['class_type']}.{k} = {size}-char string"
        node["class_type"] = "N" * size
        return wf, f"class_type of {nid} = {size}-char string"
    if kind == "unknown_class":
        node["class_type"] = rng.choice(["NotANode", "", "../../etc/passwd", "InDomainKSampler2", "\u0000"])
        return wf, f"class_type of {nid} unknown"
    if kind == "broken_node":
        choice = rng.randrange(4)
        if choice == 0:
            wf[nid] = rng.choice([None, 3, "node", []])
        elif choice == 1:
            del node["class_type"]
        elif choice == 2:
            node["inputs"] = rng.choice([None, [], "x", 5])
        else:
            wf[nid] = {"inputs": {}}
        return wf, f"node {nid} broken ({choice})"
    if kind == "bad_combo":
        ours = _pack_combos(wf, widgets)
        if not ours:
            return None
        n, k = rng.choice(ours)
        values = ["missing.safetensors", "../../models/x.safetensors", 5, "", "/etc/passwd"]
        wf[n]["inputs"][k] = rng.choice(values)
        return wf, f"{wf[n]['class_type']}.{k} not in list"
    if kind == "link_type_mismatch":
        if not links:
            return None
        n, k = rng.choice(links)
        others = [(m, j) for m in ids for j in range(4) if m != wf[n]["inputs"][k][0]]
        src = rng.choice(ids)
        wf[n]["inputs"][k] = [src, 0]
        # only keep it if the types really differ (else it is a valid rewiring)
        out_type = (object_info.get(wf[src]["class_type"], {}).get("output") or [None])[0]
        want = None
        info = object_info.get(wf[n]["class_type"], {}).get("input", {})
        spec = {**info.get("required", {}), **info.get("optional", {})}.get(k)
        want = spec[0] if spec else None
        if out_type == want or want == "*" or src == n and False:
            return None
        return wf, f"{wf[n]['class_type']}.{k} <- {wf[src]['class_type']} output 0 ({out_type} for {want})"
    raise ValueError(kind)


def fuzz_workflows(count: int, seed: int, server, workflows: dict[str, dict], object_info: dict, work: Path,
                   verbose: bool = False) -> dict:
    """Send `count` mutated workflows the way the client's command line does (file -> load_workflow ->
    apply_overrides -> submit); every one must end in a named client error. A prompt the server queues anyway
    is waited for: it must fail with a named execution error and write nothing ('refused_at_execution')."""
    from indomain.client import (ComfyClient, ComfyClientError, ComfyExecutionError, apply_overrides,
                                 load_workflow)

    rng = random.Random(seed)
    client = ComfyClient(server.url, timeout=60)
    out_dir = server.base / "output"
    before = _listing(out_dir) if out_dir.exists() else []
    log_before = server.log().count("Traceback (most recent call last)")
    outcomes, by_kind, failures, late = Counter(), Counter(), [], []
    names = sorted(workflows)
    work.mkdir(parents=True, exist_ok=True)
    i = attempts = 0
    while i < count and attempts < count * 20:
        attempts += 1
        kind = rng.choice(WF_KINDS)
        name = rng.choice(names)
        made = mutate_workflow(workflows[name], object_info, kind, rng)
        if made is None:
            continue
        wf, what = made
        i += 1
        path = work / "case.json"
        path.write_text(json.dumps(wf))
        try:
            loaded = load_workflow(path)
            if rng.random() < 0.3 and any(isinstance(n.get("inputs"), dict)
                                          and isinstance(n["inputs"].get("filename_prefix"), str)
                                          for n in loaded.values()):
                apply_overrides(loaded, filename_prefix=f"fuzz_{i}")  # the client's editing on the broken graph
            pid = client.submit(loaded)
        except ComfyClientError as e:
            outcomes["named_error"] += 1
            by_kind[(kind, "named_error")] += 1
            if not str(e).strip():
                failures.append({"case": i, "kind": kind, "workflow": name, "what": what, "error": "empty message"})
            continue
        except Exception as e:  # noqa: BLE001 - this is what the fuzz looks for
            outcomes["uncaught"] += 1
            by_kind[(kind, "uncaught")] += 1
            failures.append({"case": i, "kind": kind, "workflow": name, "what": what,
                             "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-1500:]})
            continue
        if verbose:
            print(f"case {i} ({kind}: {what[:80]}) queued as {pid}; waiting", flush=True)
        try:
            client.wait(pid, timeout=120)
            outcomes["ran"] += 1
            by_kind[(kind, "ran")] += 1
            failures.append({"case": i, "kind": kind, "workflow": name, "what": what, "error": f"ran as {pid}"})
        except ComfyExecutionError as e:
            outcomes["refused_at_execution"] += 1
            by_kind[(kind, "refused_at_execution")] += 1
            late.append({"case": i, "kind": kind, "what": what, "error": str(e)[:300]})
    path = work / "case.json"
    if path.exists():
        path.unlink()
    # the server is still answering, has nothing queued, wrote nothing
    alive = bool(client.system_stats())
    deadline = time.monotonic() + 120  # a partly valid prompt the client cancelled may take a moment to stop
    while True:
        queue = client.get_json("/queue")
        pending = len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
        if pending == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    after = _listing(out_dir) if out_dir.exists() else []
    tracebacks = server.log().count("Traceback (most recent call last)") - log_before
    return {"count": i, "seed": seed, "outcomes": dict(outcomes), "failures": failures, "server_alive": alive,
            "queue_after": pending, "written": sorted(set(after) - set(before)), "server_log_tracebacks": tracebacks,
            "refused_at_execution": late[:50],
            "by_kind": {f"{k}:{o}": n for (k, o), n in sorted(by_kind.items())}}


def load_api_twins() -> dict[str, dict]:
    from indomain.devkit import workflows as specs

    return {p.stem: specs.substitute(json.loads(p.read_text()), specs.tiny_model_names())
            for p in sorted(specs.API_DIR.glob("*.json"))}


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    import argparse

    from indomain.devkit import tiny_models
    from indomain.devkit.domain import load_checkpoint, make_domain_unet
    from indomain.devkit.host import ComfyServer, InProcessComfy

    ap = argparse.ArgumentParser(prog="python -m indomain.bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1000, help="cases of each kind (checkpoints, workflows)")
    ap.add_argument("--verbose", action="store_true", help="print every case the server queues")
    ap.add_argument("--what", choices=("all", "checkpoints", "workflows"), default="all")
    ap.add_argument("--work", type=Path, default=PACK_ROOT / ".cache" / "fuzz")
    ap.add_argument("--out", type=Path, default=PACK_ROOT / "artifacts" / "bench" / "fuzz.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the server (shared machines)")
    args = ap.parse_args(argv)
    if args.threads:
        import os

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process inherits it
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"env": environment(), "seed": args.seed, "count": args.count}
    ckpt = tiny_models.tiny_checkpoint(0)
    models = args.work / "models"
    for kind in ("checkpoints", "domain_unets"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    InProcessComfy(models_dir=models, output_dir=args.work / "output", default_dirs=False)
    model, clip, _ = load_checkpoint(ckpt)
    domain = models / "domain_unets" / "fuzz_domain.safetensors"
    if not domain.is_file():
        make_domain_unet(model, clip, domain, seed=0, perturb=0.05)
    if args.what in ("all", "checkpoints"):
        t = time.perf_counter()
        result["checkpoints"] = fuzz_checkpoints(args.count, args.seed, args.work / "ckpt_cases", model, domain)
        result["checkpoints"]["seconds"] = round(time.perf_counter() - t, 1)
    if args.what in ("all", "workflows"):
        srv = ComfyServer(args.work / "server", models={"checkpoints": {"tiny_sd15.safetensors": ckpt},
                                                          "controlnet": {"tiny_controlnet.safetensors": tiny_models.tiny_controlnet(0)},
                                                          "domain_unets": {"tiny_domain.safetensors": domain}})
        srv.start()
        try:
            t = time.perf_counter()
            object_info = srv.get_json("/object_info")
            result["workflows"] = fuzz_workflows(args.count, args.seed, srv, load_api_twins(), object_info,
                                                 args.work / "wf_cases", verbose=args.verbose)
            result["workflows"]["seconds"] = round(time.perf_counter() - t, 1)
        finally:
            srv.stop()
    rows = []
    for part in ("checkpoints", "workflows"):
        if part in result:
            r = result[part]
            o = r["outcomes"]
            rows.append([part, r["count"], o.get("named_error", 0), o.get("refused_at_execution", 0),
                         o.get("loaded", 0), o.get("ran", 0), o.get("uncaught", 0), len(r["written"]),
                         r.get("server_alive", "-"), r.get("server_log_tracebacks", "-"), r["seconds"]])
    print(table(["part", "cases", "named error", "named error at execution", "loaded (benign)", "ran", "uncaught",
                 "files written", "server alive", "server log tracebacks", "s"], rows, title=f"fuzz, seed {args.seed}"))
    for part in ("checkpoints", "workflows"):
        for f in result.get(part, {}).get("failures", [])[:10]:
            print(f"{part} case {f['case']} ({f['kind']}: {f['what']}): {f['error']}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    bad = sum(len(result.get(p, {}).get("failures", [])) for p in ("checkpoints", "workflows"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
