"""python -m indomain.client WORKFLOW.json [overrides] : run an API-format workflow on a ComfyUI server.

Examples:
  python -m indomain.client workflows/api/indomain_2_text_guided.json --prompt "a cat" --seed 7 \\
      --domain-weight 2.0 --checkpoint my_sd15.safetensors --domain-unet my_domain.safetensors --out out/
  python -m indomain.client workflows/api/indomain_3_controlnet.json --image hint.png --set 9.strength=0.8

Progress: with the optional websocket-client package (pip install websocket-client) each node's steps show
as a bar with the node's title; without it, "queued" / "running". Ctrl-C cancels this prompt on the server
(interrupts it when running, removes it from the queue when pending) and says which.

Exit status: 0 done, 2 bad workflow/arguments or refused by the server, 3 server unreachable, 4 failed while running,
130 cancelled with Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import (DEFAULT_SERVER, DEFAULT_TIMEOUT, ComfyCancelled, ComfyClient, ComfyClientError, ComfyConnectionError,
               ComfyExecutionError, apply_overrides, load_workflow, parse_image_spec, parse_set, set_input)
from .errors import shown


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m indomain.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="API-format workflow file (e.g. workflows/api/indomain_2_text_guided.json)")
    ap.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI address (default {DEFAULT_SERVER}; env COMFYUI_URL)")
    ap.add_argument("--out", default="out", help="folder for the downloaded images (default: out)")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"seconds to wait for the run; 0 = no limit (default: no limit for workflows that train, "
                         f"{DEFAULT_TIMEOUT:.0f} otherwise)")
    g = ap.add_argument_group("overrides (applied to every node that has the input)")
    g.add_argument("--prompt", help="positive prompt text")
    g.add_argument("--negative", help="negative prompt text")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg", type=float, help="control weight (cfg)")
    g.add_argument("--domain-weight", type=float, help="domain weight w_d (0 = plain CFG on the base)")
    g.add_argument("--denoise", type=float)
    g.add_argument("--checkpoint", help="base checkpoint file name (ckpt_name)")
    g.add_argument("--domain-unet", help="domain UNet file name in models/domain_unets")
    g.add_argument("--controlnet", help="ControlNet file name")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--filename-prefix")
    g.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                   help="upload a local image and use it in every LoadImage node (or only NODE)")
    g.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set any input; NODE is an id, a title or a class_type; VALUE is JSON or text (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the final workflow JSON and exit (no server needed)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the image paths")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda *_: None) if args.quiet else (lambda msg: print(f"[client] {msg}", file=sys.stderr))
    try:
        wf = load_workflow(args.workflow)
        apply_overrides(wf, prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
                        domain_weight=args.domain_weight, denoise=args.denoise, checkpoint=args.checkpoint,
                        domain_unet=args.domain_unet, controlnet=args.controlnet, width=args.width,
                        height=args.height, batch_size=args.batch_size, filename_prefix=args.filename_prefix,
                        sets=[parse_set(s) for s in args.set])
        client = ComfyClient(args.server)
        for spec in args.image:
            node, path = parse_image_spec(wf, spec)
            if args.dry_run:
                set_input(wf, node, "image", path)
                continue
            name = client.upload_image(path)
            set_input(wf, node, "image", name)
            say(f"uploaded {shown(path)} as {name}")
        if args.dry_run:
            print(json.dumps(wf, indent=2))
            return 0
        result = client.run(wf, out_dir=args.out, timeout=args.timeout, progress=None if args.quiet else say)
    except ComfyCancelled as e:
        print(shown(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before anything reached the server
        print("cancelled (nothing was submitted)", file=sys.stderr)
        return 130
    except ComfyConnectionError as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return 3
    except ComfyExecutionError as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return 4
    except ComfyClientError as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return 2
    say(f"done in {result.seconds:.1f}s, {len(result.images)} image(s)")
    for path in result.images:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
