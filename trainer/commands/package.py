"""Package a trained run as a Nuclio function directory that CVAT lists and calls.

The directory holds function.yaml (project cvat, a detector whose labels are the run's labels, one
GPU, one worker), main.py, the serverless runtime and the bundle. Deploy it with deploy_gpu.sh.

--cpu serves the model with OpenVINO on an image without torch: the network is exported beside the
run's weights (engine.xml, engine.bin, engine.json) and verified to find what PyTorch finds on
--verify-images (up to 8 of them; by default the images the run held out for validation, read
from the data its model.json records, else generated frames). A model whose export differs is
served by PyTorch on the CPU instead, and the command says why.

Scores: every label declares an attribute "score" and each detection returns its score in it
("0.873"). CVAT keeps it when the task's label has an attribute of that name: type text, or with
--score-format percent ("87") type number with min 0, max 100, step 1 (never a fractional step:
CVAT then fails every call). A task label without the attribute simply gets the shapes.

Examples:
  python -m trainer package runs/bccd --out functions/bccd
  python -m trainer package runs/bccd --out functions/bccd --score-format percent
  python -m trainer package runs/bccd --out functions/bccd-cpu --name "BCCD cells (CPU)" --cpu \
      --verify-images bccd/images/Validation
  ./deploy_gpu.sh functions/bccd
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "package a trained run as a Nuclio function for CVAT (then run deploy_gpu.sh)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="trained run / bundle directory (has model.json)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="function directory to write")
    parser.add_argument(
        "--name",
        help="name CVAT shows (default: the run directory's name); the Nuclio function id is made "
        "from it with lowercase letters, digits and '-'",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="CPU image and no GPU limit, served by OpenVINO (no NVIDIA needed)",
    )
    parser.add_argument(
        "--engine", choices=["openvino", "pytorch"],
        help="what serves a --cpu function (default: openvino; the GPU function always uses pytorch)",
    )  # fmt: skip
    parser.add_argument(
        "--engine-precision", choices=["auto", "f32", "bf16"], default="auto",
        help="what the OpenVINO function computes in: auto (default: f32, or on CPUs with AMX bf16x3 when "
             "it finds PyTorch's detections faster; both give PyTorch's detections), f32, or bf16 (several "
             "times faster on CPUs with AMX or AVX512-BF16; kept only when it finds PyTorch's detections at "
             "the thresholds on the verification images, scores within 0.1, boxes within 4 px)",
    )  # fmt: skip
    parser.add_argument(
        "--verify-images", metavar="DIR",
        help="images to verify the OpenVINO export on (default: the run's validation images when its data "
             "is readable here, else generated frames)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    score = parser.add_argument_group("score attribute")
    score.add_argument(
        "--score-attribute", default="score", metavar="NAME", type=_attribute_name,
        help="attribute the score is returned as (default: %(default)s)",
    )  # fmt: skip
    score.add_argument(
        "--score-format", default="decimal", choices=("decimal", "percent"),
        help='decimal: "0.873" for a text attribute (default); percent: "87" for a number '
        "attribute 0-100 step 1",
    )  # fmt: skip
    score.add_argument("--no-score", action="store_true", help="declare and return no score attribute")


def _attribute_name(text: str) -> str:
    from serverless.score_attribute import check_name

    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from serverless.score_attribute import ScoreAttribute
    from trainer.deploy.export import folder_frames
    from trainer.deploy.nuclio import package_function

    score = None if args.no_score else ScoreAttribute(args.score_attribute, args.score_format)
    frames = folder_frames(args.verify_images) if args.verify_images else None
    done = package_function(args.run, args.out, name=args.name, cpu=args.cpu, engine=args.engine,
                            frames=frames, overwrite=args.overwrite, score=score,
                            engine_precision=args.engine_precision)  # fmt: skip
    info, out = done.info, done.out
    if done.note:
        print(f"note: {done.note}")
    if done.engine == "openvino":
        print(_verified(args.run, args.engine_precision))
    served = f"CPU, {'OpenVINO' if done.engine == 'openvino' else 'PyTorch'}" if done.cpu else "GPU"
    served += f" in {done.engine_precision}" if done.engine_precision != "f32" else ""
    print(
        f"packaged {args.run} as Nuclio function {done.name!r} (CVAT shows {done.display_name!r}): "
        f"{info.architecture}, {len(info.labels)} {info.shape_type} labels "
        f"({', '.join(info.labels)}), {served}"
    )
    if score is not None:
        kind = "number 0-100 step 1" if score.fmt == "percent" else "text"
        print(
            f"  scores returned as attribute {score.name!r} ({score.fmt}): give the task labels an "
            f"attribute {score.name!r} of type {kind} to keep them"
        )
    print(f"  {out / 'function.yaml'}")
    print(f"  {out / 'main.py'}")
    print(f"  {out / 'serverless'}/ ({', '.join(done.runtime_files)})")
    print(f"  {out / 'bundle'}/ ({', '.join(sorted(p.name for p in (out / 'bundle').iterdir()))})")
    print(f"next: {_deploy_script()} {out}")
    return 0


def _verified(run: str, precision: str) -> str:
    """What the OpenVINO export was verified on, and how close it came to PyTorch (in bf16 too when
    asked for)."""
    from serverless.engine import load_engine_info
    from trainer.deploy.export import Agreement

    verification = load_engine_info(run).verification
    frames = verification["frames"]
    shown = ", ".join(frames[:3]) + (", ..." if len(frames) > 3 else "")
    agreement = Agreement(**verification["agreement"])
    text = f"OpenVINO export verified against PyTorch on {shown}: {agreement.summary()}"
    if precision == "bf16":
        bf16 = verification["bf16"]
        text += (f"\n  in bf16 (this CPU computes it in {bf16['computes_in']}): "
                 f"{Agreement(**bf16['agreement']).summary()}")
    if precision == "auto" and "bf16x3" in verification:
        x3 = verification["bf16x3"]
        verdict = "chosen where the CPU has AMX" if x3["chosen"] else "not chosen: it computes in f32"
        speed = f"{x3['ms']['bf16x3']:.0f} ms a frame against {x3['ms']['f32']:.0f} ms in f32 here"
        text += f"\n  in bf16x3: {Agreement(**x3['agreement']).summary()}; {speed}, {verdict}"
    return text


def _deploy_script() -> str:
    """deploy_gpu.sh as the user can type it: relative to the working directory when possible."""
    script = Path(__file__).resolve().parents[2] / "deploy_gpu.sh"
    if not script.is_file():
        return "deploy_gpu.sh"
    try:
        return f"./{script.relative_to(Path.cwd().resolve())}"
    except ValueError:
        return str(script)
