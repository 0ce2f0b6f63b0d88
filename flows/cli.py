"""The ``segflow`` command line: each subcommand starts one Prefect flow and prints its summary.

Quiet by default: progress of long steps on stderr and the result on stdout; a user error (bad
option, missing file, store and checkpoint that do not fit) is one line ``segflow: error: ...`` on
stderr with exit status 2. ``-v`` shows Prefect's and Dask's log lines (and tracebacks) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from contextlib import nullcontext
from typing import Any, Sequence

from pydantic import ValidationError

from flows import console


def _prefect_env() -> None:
    # Offline by design: no telemetry, and a flow without PREFECT_API_URL starts a local server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _add_execution(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--dask-address", help="tcp://host:port of an existing Dask scheduler (default: a new local cluster)")
    g.add_argument("--workers", type=int, help="local cluster worker processes (default: one per GPU, else 1)")
    g.add_argument("--threads-per-worker", type=int, help="torch threads per worker (default: cores / workers)")


def _add_lease(p: argparse.ArgumentParser, *, written: str) -> None:
    p.add_argument("--wait-for-lease", type=float, metavar="SECONDS",
                   help=f"when another segflow process is writing {written}, wait up to this long for it to "
                        "finish (default 0: refuse at once, naming it); a lease left by a crashed process is "
                        "taken over")


def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model record: a segflow checkpoint (.safetensors) or a model directory made by "
                        "'segflow model import/export'; a path or an fsspec URL (s3://bucket/unet.safetensors)")
    p.add_argument("--out", required=True, help="run directory (created; re-running into it resumes); {flow_run} in "
                                                "it is replaced by the run's UTC start time and flow run id: a new "
                                                "run directory per run (not with --incremental)")
    p.add_argument("--batch-size", type=int,
                   help="images per forward pass (default 8; tiles of large images: at most 1 Mpx per pass)")
    p.add_argument("--device", help="auto (default: CUDA when present, one GPU per worker), cpu, cuda, or cuda:N "
                                     "(every worker on GPU N)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="semantic torch models: run the model through torch.compile (a warm-up per worker; the "
                        "model runs eagerly when compiling fails)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype of semantic models on CUDA (default bf16; instance models run fp32)")
    g = p.add_argument_group("large images (tiled groups of the store)")
    g.add_argument("--tile-size", type=int,
                   help="model tile in px: semantic models default 512 (rounded up to the UNet's divisor), "
                        "instance models default 256 (the detector core); 0 disables tiling and segments large "
                        "images whole (large images stored whole, ingested with --tile-chunk 0, are always "
                        "segmented whole); volumetric models (unet3d): 3-D tiles of 64 voxels a side by default, 0 "
                        "runs each volume as one tile")
    g.add_argument("--overlap", type=int,
                   help="px shared by neighbouring semantic tiles (default tile/4; volumetric models: voxels, "
                        "along each axis the tile does not cover whole); instance models: halo around each "
                        "detector core (default 64, must exceed the largest object)")
    g.add_argument("--blend", choices=["gaussian", "linear"], help="weights of overlapping tiles (default gaussian)")
    g.add_argument("--tta", action="store_true", default=None,
                   help="semantic models: average the logits over flips, for whole images and tiles alike (4x "
                        "compute; volumetric models: the 8 flips of three axes, 8x, an axis of one voxel left out)")
    p.add_argument("--volume-pattern", metavar="REGEX",
                   help="also score 2-D images per volume: a regular expression on image ids whose first group (or "
                        "whole match) names the volume, e.g. '^(.+)_z\\d+$'; ingested volumes (NIfTI, TIFF z-stacks) "
                        "are always scored per volume (3-D Dice, IoU, HD95, ASSD in RUN_DIR/volumes)")
    p.add_argument("--lake", help="data-lake location (path or fsspec URL, e.g. s3://bucket/segflow): append the Dice, "
                                  "volume, instance and manifest tables there, Hive-partitioned by run_date and model")
    f = p.add_argument_group("failures inside a run")
    f.add_argument("--unit-timeout-floor", type=float, metavar="SECONDS",
                   help="least time a work unit is given before it counts as hung (default 60); its timeout is 5 x "
                        "the median seconds per image of the run's finished units x its images")
    f.add_argument("--unit-timeout-cap", type=float, metavar="SECONDS",
                   help="most time a work unit is given, and the timeout before any unit has finished (default "
                        "3600); a hung unit's Dask worker is restarted and the unit retried")
    f.add_argument("--unit-retries", type=int, metavar="N",
                   help="further attempts of a unit that fails or hangs, after 2 s, 4 s, ... (default 2; none when "
                        "the model cannot take the unit's images: every attempt would fail); units that still fail "
                        "are listed in RUN_DIR/failed/ and the command exits 2 naming them")
    _add_execution(p)


def _add_ingest(p: argparse.ArgumentParser, *, store_required: bool, landing_only: bool = False) -> None:
    """Ingest options. ``landing_only`` (serve): --images is always a landing zone ingested incrementally,
    so there is no --overwrite or --incremental to give; the parsed arguments carry incremental=True and
    overwrite=False."""
    p.add_argument("--images", required=True, help="directory of images or a quoted glob pattern")
    p.add_argument("--masks", help="directory of ground-truth masks named like the images")
    p.add_argument("--mask-kind", choices=["class", "instance"], help="mask values are class ids (default) or object ids")
    store_help = ("Zarr collection store to create or append to, a path or fsspec URL" if landing_only else
                  "Zarr collection store to create, a path or fsspec URL (s3://bucket/collection.zarr); {flow_run} "
                  "in it is replaced by the run's UTC start time and flow run id: a new store per run")
    p.add_argument("--store", required=store_required,
                   help=store_help if store_required else f"{store_help} (default: store.zarr in --out)")
    if landing_only:
        p.set_defaults(overwrite=False, incremental=True)
    else:
        p.add_argument("--overwrite", action="store_true", help="replace an existing store")
        p.add_argument("--incremental", action="store_true",
                       help="--images is a landing zone: append to the store only files whose content it has not "
                            "seen (a file whose content or mask changed supersedes its old version); 'run' then "
                            "segments only the new images")
    p.add_argument("--tile-chunk", type=int,
                   help="images of more than 4.2 Mpx are stored (and segmented) in square blocks of this side "
                        "(default 1024; 0 keeps them whole, and they are then segmented whole, without tiles)")


def build_parser() -> argparse.ArgumentParser:
    from segcore import __version__

    parser = argparse.ArgumentParser(prog="segflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"segflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Prefect's and Dask's log lines (progress is in them) instead of progress bars, "
                             "and the traceback of an error ('serve' always shows its log)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="decode images (and masks) into a chunked Zarr store with a manifest")
    _add_ingest(p, store_required=True)
    _add_lease(p, written="the store")
    _add_execution(p)

    p = sub.add_parser("segment", help="segment a store, write masks.zarr and the Dice Parquet dataset")
    p.add_argument("--store", required=True, help="Zarr collection store made by 'segflow ingest' (a path or fsspec "
                                                  "URL, read by the workers directly)")
    _add_segment(p)
    _add_lease(p, written="the run directory")

    p = sub.add_parser("run", help="ingest + segment + evaluate in one flow run")
    _add_ingest(p, store_required=False)
    _add_segment(p)
    _add_lease(p, written="the store or the run directory")

    p = sub.add_parser("report", help="per-model Dice over time, 3-D metrics of volumes and instance metrics from a "
                                      "data lake (DuckDB over Parquet); a model is a checkpoint, named "
                                      "arch@<first 12 hex digits of its sha256>")
    p.add_argument("--lake", required=True, help="data-lake location written by 'segment/run --lake'")
    p.add_argument("--plots", help="directory to write PNGs per model: dice-over-time-<model>.png and, with instance "
                                   "metrics, instances-over-time-<model>.png ('@' in <model> written as '-')")
    p.add_argument("--json", action="store_true", help="print the tables as JSON (one list of rows per section) "
                                                       "instead of text")

    p = sub.add_parser("train", help="train a UNet or Mask R-CNN on a store's labelled images, write a checkpoint")
    p.add_argument("--store", required=True, help="Zarr collection store with ground truth")
    p.add_argument("--model", default="unet", help="registered architecture: unet (default), unet3d (volumes: "
                                                   "trains on the store's labelled volumes), maskrcnn, maskrcnn_r18")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")
    p.add_argument("--epochs", type=int, help="passes over the training split (default 50; UNet: each at least "
                                               "--epoch-patches patches)")
    p.add_argument("--val-fraction", type=float,
                   help="fraction of the labelled images (unet3d: volumes) held out for validation, in [0, 1) "
                        "(default 0.15; above 0 holds out at least one); 0: no validation: train on every one, "
                        "even a single image or volume, and keep the last epoch instead of the best")
    p.add_argument("--class-names", help="comma-separated class names, background first")
    p.add_argument("--base", type=int, help="UNet width of the first stage (default 16; unet3d 8)")
    p.add_argument("--depth", type=int, help="UNet pooling stages (default 3)")
    p.add_argument("--score-threshold", type=float,
                   help="instance models: detections scoring at or below this are dropped, in validation and in "
                        "every later use of the checkpoint (default 0.7)")
    p.add_argument("--overlap-threshold", type=float,
                   help="instance models: a detection is dropped when higher-scoring ones already hold more than "
                        "this share of its mask (a part or a duplicate of an object already found), in validation "
                        "and in every later use of the checkpoint (default 0.5; 1 keeps every detection)")
    p.add_argument("--batch-size", type=int, help="samples per step (default 16 UNet, 2 unet3d, 4 Mask R-CNN)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3 UNet, 1e-3 Mask R-CNN)")
    p.add_argument("--crop-size", type=int, help="instance models: train on random square crops of this size")
    p.add_argument("--normalisation", metavar="SCHEME",
                   help="auto (default: chosen from the store's fingerprint), percentile (1st-99.8th per image), "
                        "range (divide by 255), window:LO,HI or window:abdomen|liver|lung|bone|brain (fixed CT "
                        "window to 0..1), zscore (training-set mean/std) or ct (clip to the training foreground's "
                        "0.5-99.5th percentiles, then its z-score); fitted values are stored with the model")
    p.add_argument("--val-split", choices=["auto", "random", "tail", "group"],
                   help="validation images: tail (last image ids in natural order: a contiguous hold-out), group "
                        "(whole groups of --group-pattern) or random; auto (default): group with --group-pattern, "
                        "else tail (UNet), random (instance models); none with --val-fraction 0")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help="regular expression on image ids naming an image's volume or source (first capture group "
                        "or the match); one group never straddles the validation split")
    p.add_argument("--patch-size", type=int, help="UNet: training patch side (default 256; smaller images whole); "
                                                 "unet3d: the side of its cubic 3-D patches (default 32x64x64)")
    p.add_argument("--schedule", choices=["poly", "cosine", "onecycle"],
                   help="learning-rate schedule (UNet default: poly after a 5%% warm-up; Mask R-CNN: onecycle)")
    p.add_argument("--epoch-patches", type=int, metavar="N", dest="min_epoch_patches",
                   help="UNet: patches drawn per epoch at least (default 256, so that a small collection still "
                        "gets 16 optimiser steps per epoch; an epoch draws one patch per training image when they "
                        "are more; 0: always one per training image); unet3d: default 0, one patch per training "
                        "volume (a 3-D patch costs far more), N draws N patches of the volumes per epoch")
    p.add_argument("--largest-region", choices=["auto", "on", "off"],
                   help="UNet: keep only each image's largest connected foreground region in the model's masks (for "
                        "one object per image, such as an organ); auto (default) turns it on when it raises the "
                        "validation mean foreground Dice (off with --val-fraction 0: nothing to decide by); stored "
                        "with the model")
    p.add_argument("--refit", action="store_true", default=None,
                   help="UNet: after training with the validation split, train again on every image (split "
                        "included) for the best epoch's number of epochs and keep that model; the validation "
                        "figures stay those of the split run (about twice the training time); not with "
                        "--val-fraction 0")
    p.add_argument("--device", help="training device: auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype when training on CUDA (default bf16; fp16 adds a gradient scaler)")
    p.add_argument("--time-budget", type=float, help="stop after the epoch that passes this many seconds")
    p.add_argument("--init", help="fine-tune this model record (a segflow checkpoint or an imported torch model; "
                                  "--model must name its architecture); --class-names other than its classes "
                                  "replace its class head")
    p.add_argument("--seed", type=int, help="seed of split, initialisation and augmentation (default 0)")
    _add_execution(p)

    p = sub.add_parser("demo", help="synthetic collection -> train a small model -> full pipeline -> summary")
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--model", choices=["unet", "maskrcnn"], default="unet",
                   help="unet: semantic demo (default); maskrcnn: instance demo with touching nuclei-like objects")
    p.add_argument("--images", type=int, help="number of synthetic images, 20 to 100000 (default 360 unet, "
                                             "240 maskrcnn)")
    p.add_argument("--size", type=int, help="image side length in pixels, 32 to 2048 (default 128)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the model's demo setting)")
    p.add_argument("--seed", type=int, default=0)
    _add_execution(p)

    _add_model(sub)

    p = sub.add_parser("export", help="write a run's masks of volumes as NIfTI label files that overlay their images",
                       description="Write one NIfTI label volume per volume (NIfTI or TIFF z-stack) the run segmented, "
                                   "and per volume of 2-D slices it grouped with --volume-pattern: "
                                   "OUT/<volume id>.nii.gz, the source's voxel layout, affine and spacing unit (header "
                                   "kept when the source file is still there). Reads the run directory only: no "
                                   "Prefect.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of 'segflow segment' or 'segflow run'")
    p.add_argument("--format", dest="fmt", choices=["nifti"], default="nifti", help="output format (default nifti)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export/nifti, whose files a new export replaces)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files that exist in --out (never a file the store was ingested from)")
    p.add_argument("--volume-pattern", metavar="REGEX",
                   help="group the run's 2-D images into volumes by this regular expression on image ids (first "
                        "group or whole match names the volume; slices in natural order of their ids); default: "
                        "the run's own --volume-pattern")

    p = sub.add_parser(
        "serve", help="serve the scheduled incremental run from this process: a run on --cron, and whenever one is "
                      "started from the UI",
        description="Register a deployment of 'segflow run' with --images as a landing zone (each run appends the "
                    "files whose content the store has not seen, and segments only those into the same --out) and "
                    "execute its runs in this process until stopped (Ctrl-C pauses the schedule). Set "
                    "PREFECT_API_URL to a Prefect server to see the deployment and start runs in its UI.")
    _add_ingest(p, store_required=False, landing_only=True)
    _add_segment(p)
    _add_lease(p, written="the store or the run directory")
    p.add_argument("--cron", default="0 * * * *",
                   help="when to run: a cron expression, in UTC (default '0 * * * *': at the top of every hour)")
    p.add_argument("--name", default="incremental", help="deployment name (default incremental)")
    return parser


#: Targets of 'segflow model export' (segcore.models.export.EXPORTERS; another target is another entry).
EXPORT_TARGETS = ("onnx", "torchscript", "bioimageio")


def _add_model(sub: Any) -> None:
    """``segflow model import|info|export``: plain segcore calls, no Prefect flow."""
    model = sub.add_parser("model", help="import a model trained elsewhere, show a model record, export one")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("import", help="make a model record (for --checkpoint) from a state dict (.pth/.pt/"
                                       ".safetensors), a TorchScript file, an .onnx file or a bioimage.io "
                                       "package (.zip or folder with rdf.yaml)")
    p.add_argument("source", help="model file trained elsewhere; state dicts are read with weights_only=True: "
                                  "a file holding other Python objects is refused, never unpickled")
    p.add_argument("--out", required=True, help="model record to write: NAME.safetensors for state dicts, a "
                                                "directory (NAME.segflow) for TorchScript and ONNX models")
    p.add_argument("--arch", help="registered architecture the state dict belongs to (e.g. smp:Unet, monai:UNet, "
                                  "torchvision:maskrcnn_resnet50_fpn); a label for TorchScript/ONNX models")
    p.add_argument("--arch-kwargs", help="JSON object of builder arguments, e.g. '{\"encoder_name\": \"resnet18\"}', "
                                        "merged over the options segflow train gives its own UNets (unet: base 16, "
                                        "depth 3; unet3d: base 8, depth 3) and the builder's defaults; without it, "
                                        "a state dict that does not fit those is tried with the builder's defaults")
    p.add_argument("--class-names", help="comma-separated class names, background first, or 'coco' (torchvision's "
                                         "91 COCO categories)")
    p.add_argument("--in-channels", type=int, help="channels of the images the model takes (default: the "
                                                   "architecture's; required for TorchScript and ONNX)")
    p.add_argument("--normalisation", metavar="SCHEME",
                   help="what the model's training did to pixel values: percentile (1st-99.8th per image), range "
                        "(divide by 255), imagenet (divide by 255, then ImageNet mean/std), window:LO,HI or "
                        "window:<preset> (e.g. window:abdomen), zscore:MEAN,STD, or ct:LO,HI,MEAN,STD (clip, "
                        "then z-score); default: the architecture's (torchvision: range), else percentile")
    p.add_argument("--kind", choices=["semantic", "instance"], help="check the model gives this kind of output")
    p.add_argument("--input-multiple", type=int,
                   help="TorchScript/ONNX: H and W the graph accepts are multiples of this (inputs are padded)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model record or checkpoint at --out (without it an existing one is refused)")
    p.add_argument("--weights", choices=["auto", "pytorch_state_dict", "torchscript", "onnx"], default="auto",
                   help="bioimage.io packages: weights to import (default auto: a state dict of segflow's UNet, "
                        "else torchscript, else onnx; architecture code in a package is never run)")
    p = msub.add_parser("info", help="runtime, architecture, inputs, classes, normalisation, provenance and "
                                     "output contract of a model record")
    p.add_argument("model", help="model record (.safetensors checkpoint or model directory)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p = msub.add_parser("export", help="export a torch checkpoint of a semantic model to another runtime")
    p.add_argument("model", help="torch model record (.safetensors)")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="target runtime")
    p.add_argument("--out", required=True, help="model record directory to write (NAME.segflow), or the "
                                                "package zip (NAME.zip) for --to bioimageio")
    p.add_argument("--author", action="append", help="--to bioimageio (required there): an author's name (repeat "
                                                      "for several)")
    p.add_argument("--license", default="CC-BY-4.0", help="--to bioimageio: SPDX licence id (default CC-BY-4.0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model record or package at --out (without it an existing one is refused)")


def _normalisation(name: str | None, channels: int | None):
    from segcore.normalise_fit import parse_given_normalisation

    return None if name is None else parse_given_normalisation(name, channels=channels or 1)


def _model(args: argparse.Namespace) -> int:
    """``segflow model ...``: one segcore call, its result on stdout, a user error as one line."""
    from segcore.errors import SegflowError
    from segcore.models.export import export_model
    from segcore.models.importing import import_model
    from segcore.models.record import describe_model

    if args.model_command in ("import", "export"):
        problem = _replaced_output(args.source if args.model_command == "import" else args.model, args.out,
                                   overwrite=args.overwrite, writes=_writes(args))
        if problem:
            return _fail(problem)
    try:
        if args.model_command == "import" and _is_bioimageio(args.source):
            from segcore.models.bioimage.importer import import_bioimageio

            record, meta = import_bioimageio(args.source, args.out, weights=args.weights)
            print(f"model: {record} ({meta.runtime}, {meta.arch}, {meta.num_classes} classes, labels by "
                  f"{meta.output.rule}{', largest foreground region kept' if meta.output.largest_region else ''})"
                  f"\nsource: {meta.source['file']} ({meta.source['format']}) sha256 "
                  f"{meta.source['sha256']}")
        elif args.model_command == "import":
            try:
                kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else None
            except ValueError as exc:
                return _fail(f"--arch-kwargs is not JSON: {exc}")
            if kwargs is not None and not isinstance(kwargs, dict):
                return _fail("--arch-kwargs must be a JSON object, e.g. '{\"depth\": 3}'")
            meta = import_model(args.source, out=args.out, arch=args.arch, arch_kwargs=kwargs,
                                class_names=args.class_names, in_channels=args.in_channels,
                                normalisation=_normalisation(args.normalisation, args.in_channels), kind=args.kind,
                                input_multiple=args.input_multiple)
            print(f"model: {args.out} ({meta.runtime}, {meta.arch}, {meta.kind}, {meta.num_classes} classes, "
                  f"{meta.in_channels} input channel(s))\nsource: {meta.source['file']} sha256 {meta.source['sha256']}")
        elif args.model_command == "info":
            info = describe_model(args.model)
            print(json.dumps(info, indent=2) if args.json else info_text(info))
        elif args.to == "bioimageio":
            from segcore.models.bioimage.export import export_bioimageio

            path = export_bioimageio(args.model, args.out, authors=args.author or [], license=args.license)
            print(f"bioimage.io package: {path} (bioimageio.spec validation and bioimageio.core model test passed)")
        else:
            meta = export_model(args.model, to=args.to, out=args.out)
            print(f"model: {args.out} ({meta.runtime}, inputs padded to multiples of {meta.input_multiple})")
    except (SegflowError, ValidationError, OSError) as exc:
        return _fail(_error_line(exc))
    return 0


def _writes(args: argparse.Namespace) -> str | None:
    """What ``segflow model import/export`` writes at ``--out``: a ``file`` (a checkpoint, a package
    zip), a ``folder`` (a TorchScript/ONNX record), or None when the package's weights decide."""
    if args.model_command == "export":
        return "file" if args.to == "bioimageio" else "folder"
    if _is_bioimageio(args.source):
        return None
    from segcore.models.importing import detect_format

    try:
        return "file" if detect_format(args.source) in ("state_dict", "safetensors") else "folder"
    except (OSError, ValueError):  # a missing or unknown source: the import tells
        return None


def _replaced_output(source: str, out: str, *, overwrite: bool, writes: str | None) -> str | None:
    """Why ``segflow model import/export`` must not write ``out``, or None: it is the model read
    (never replaced), or what it ``writes`` (a file or a model record folder) exists there and
    ``--overwrite`` was not given. Anything else at ``out`` is the writer's to refuse, by name."""
    if os.path.exists(source) and os.path.exists(out) and os.path.samefile(source, out):
        return f"--out {out!r} is the model being read; give another name"
    from segcore.models.record import META_FILE

    existing = "file" if os.path.isfile(out) else "folder" if os.path.isfile(os.path.join(out, META_FILE)) else None
    if not overwrite and existing is not None and writes in (None, existing):
        return f"{out!r} exists; give a new --out, or pass --overwrite to replace it"
    return None


def _is_bioimageio(source: str) -> bool:
    """A bioimage.io package: a .zip file, or a folder holding rdf.yaml / bioimageio.yaml."""
    if source.endswith(".zip"):
        return True
    return any(os.path.isfile(os.path.join(source, n)) for n in ("rdf.yaml", "bioimageio.yaml"))


def _fail(message: str) -> int:
    print(f"segflow: error: {message}", file=sys.stderr)
    return 2


def info_text(info: dict[str, Any]) -> str:
    """``segflow model info`` as aligned ``key: value`` lines."""
    inp = info["input"]
    from segcore.normalise import Normalisation
    from segcore.normalise_fit import describe

    norm = describe(Normalisation.model_validate(info["normalisation"]))
    source = info["source"] or {}
    sides = "D, H and W" if "z" in inp["axes"] else "H and W"
    lines = [("model", info["model"]), ("sha256", info["sha256"]), ("runtime", info["runtime"]),
             ("architecture", f"{info['arch']} {json.dumps(info['arch_kwargs'])}" if info["arch_kwargs"]
              else info["arch"]), ("kind", info["kind"]),
             ("input", f"axes {inp['axes']}, {inp['channels']} channel(s), {inp['dtype']}, "
                       + (f"any {sides} (the network pads itself)" if info["runtime"] == "torch"
                          else f"{sides} padded to multiples of {inp['multiple']}")),
             ("classes", f"{len(info['classes'])}: {', '.join(info['classes'])}"), ("normalisation", norm),
             ("source", f"{source.get('file')} ({source.get('format')}), sha256 {source.get('sha256')}" if source
              else "trained by segflow"),
             ("provenance", json.dumps(info["provenance"], default=str)), ("output", info["output"])]
    return "\n".join(f"{k + ':':14} {v}" for k, v in lines)


def _given(**kwargs: Any) -> dict[str, Any]:
    """Only the options the user gave: None keeps the spec's default."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _execution(args: argparse.Namespace):
    from segcore.config import ExecutionSpec

    return ExecutionSpec(**_given(dask_address=args.dask_address, n_workers=args.workers,
                                  threads_per_worker=args.threads_per_worker))


def _segment_spec(args: argparse.Namespace, store: str):
    from segcore.config import SegmentSpec

    return SegmentSpec(store=store, checkpoint=args.checkpoint, out=args.out, execution=_execution(args),
                       **_given(batch_size=args.batch_size, device=args.device, precision=args.precision,
                                compile=args.compile, tile_size=args.tile_size, overlap=args.overlap,
                                blend=args.blend, tta=args.tta,
                                volume_pattern=args.volume_pattern,
                                lake=args.lake, unit_timeout_floor=args.unit_timeout_floor,
                                unit_timeout_cap=args.unit_timeout_cap, unit_retries=args.unit_retries,
                                wait_for_lease=args.wait_for_lease))


def _ingest_spec(args: argparse.Namespace, store: str):
    from segcore.config import IngestSpec

    return IngestSpec(images=args.images, store=store, overwrite=args.overwrite, incremental=args.incremental,
                      **_given(masks=args.masks, mask_kind=args.mask_kind, tile_chunk=args.tile_chunk,
                               wait_for_lease=args.wait_for_lease))


def train_summary(result: dict[str, Any]) -> str:
    """The printed summary of ``segflow train``: checkpoint, best epoch and its validation figures (or
    that nothing was held out and the last epoch was kept), normalisation."""
    from segcore.training.from_store import no_validation_note, unit_of

    metric = "F1 at IoU 0.5" if result["kind"] == "instance" else "mean foreground Dice"
    score = result["best_val_score"]
    unvalidated = no_validation_note(result)
    lines = [f"checkpoint: {result['checkpoint']} (sha256 {result['sha256']})",
             unvalidated or f"best validation {metric}: {'n/a' if score is None else f'{score:.4f}'}"
             + (f" (epoch {result['best_epoch']} of {len(result['history'])})" if result.get("best_epoch") else "")]
    course = result.get("course") or {}
    if course.get("stopped_early"):
        lines.append(f"stopped by the time budget ({course.get('time_budget_s'):g} s) after {course.get('epochs_run')} "
                     f"of {course.get('epochs')} epochs")
    if course.get("n_val"):
        lines.append(f"validation: {course['n_val']} of {course['n_val'] + course.get('n_train', 0)} {unit_of(result)} "
                     f"held out" + (f" ({course['val_split']} split)" if course.get("val_split") else ""))
    best_val = result.get("best_val") or {}
    per_class, absent = best_val.get("val_dice"), set(best_val.get("val_absent") or ())
    largest = result.get("largest_region") or {}
    ruled = bool(largest.get("kept") and largest.get("val_dice_with"))
    if ruled:  # the figures of the model the checkpoint holds
        per_class = largest["val_dice_with"]
        lines[1] += f"; {largest['val_dice_mean_fg_with']:.4f} with the largest-region rule the checkpoint keeps"
    if per_class:
        lines.append("validation Dice per class" + (" (with that rule)" if ruled else "") + ": "
                     + ", ".join(f"{k} {v:.4f}" + (" (absent from the validation images: not in the mean)"
                                                   if k in absent else "") for k, v in per_class.items()))
    choice = result.get("normalisation_choice") or {}
    if result.get("normalisation"):
        why = f" [auto: {choice['reason']}]" if choice.get("asked") == "auto" else ""
        lines.append(f"normalisation: {result['normalisation']}{why}")
    if "val_dice_mean_fg_with" in largest:
        with_, without = largest["val_dice_mean_fg_with"], largest["val_dice_mean_fg_without"]
        digits = 4 if f"{with_:.4f}" != f"{without:.4f}" else 6  # a difference the rounding would hide
        lines.append(f"largest foreground region of each image: {'kept' if largest['kept'] else 'not kept'} "
                     f"(validation mean foreground Dice {with_:.{digits}f} with it, {without:.{digits}f} without; "
                     f"--largest-region {largest['choice']})")
    elif largest.get("reason") and largest["reason"] != "volumetric model":  # decided without validation figures
        lines.append(f"largest foreground region of each image: {'kept' if largest['kept'] else 'not kept'} "
                     f"({largest['reason']}; --largest-region {largest['choice']})")
    refit = result.get("refit")
    if refit:
        lines.append(f"refit on all {refit['images']} {unit_of(result)} for {refit['epochs']} epochs: the checkpoint "
                     f"holds that model ({refit['seconds']:.0f} s; the validation figures above are the split run's)"
                     if refit["done"] else f"refit not done ({refit['reason']}): the checkpoint holds the validated model")
    return "\n".join(lines)


def summary_text(summary: dict[str, Any]) -> str:
    from segcore.metrics.summary import render_markdown

    return render_markdown(summary, title=f"segflow run {summary.get('run_id', '')}".strip())


def _report(args: argparse.Namespace) -> int:
    from segcore.errors import SegflowError
    from segcore.lake.report import lake_report, plot_over_time, render_text

    try:
        if args.plots:  # before the report is printed: a place that cannot hold the plots is told alone
            _check_output(args.plots, "plots folder", "--plots")
    except SegflowError as exc:
        return _fail(str(exc))
    try:
        report = lake_report(args.lake)
    except (SegflowError, OSError) as exc:
        print(f"segflow: error: cannot read the lake {args.lake!r}: {console.one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: t.to_pylist() for k, t in report.items()}, indent=2, default=str))
    else:
        print(render_text(report), end="")
    try:
        for path in plot_over_time(report, args.plots) if args.plots else []:
            print(f"plot: {path}", file=sys.stderr if args.json else sys.stdout)  # stdout stays JSON
    except OSError as exc:
        return _fail(f"cannot write the plots into {args.plots!r}: {console.one_line(exc)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from segcore.errors import SegflowError
    from segcore.run.export import export_volumes

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.out:
            _check_output(args.out, "export folder", "--out")
        written = export_volumes(args.run_dir, fmt=args.fmt, out=args.out, volume_pattern=args.volume_pattern,
                                 overwrite=args.overwrite)
    except (SegflowError, OSError) as exc:
        print(f"segflow: error: {console.one_line(exc)}", file=sys.stderr)
        return 2
    for w in written:
        print(f"{w.volume_id}: {w.path} {'x'.join(map(str, w.shape))} (affine from the {w.affine_from}, units "
              f"{w.units})")
    return 0


#: Spec fields set by an option of another name (its argparse ``dest``), see the ``_given`` calls.
_FIELD_DESTS = {"n_workers": "workers", "time_budget_s": "time_budget", "n_images": "images"}


def _options_by_field(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Spec field -> the option that sets it (``batch_size`` -> ``--batch-size``, ``min_epoch_patches``
    -> ``--epoch-patches``), over ``parser`` and its subcommands: an invalid value is told by the
    option the user typed, not by the spec field it sets."""
    by_dest: dict[str, str] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if action.option_strings:
                by_dest.setdefault(action.dest, max(action.option_strings, key=len))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    return {**by_dest, **{field: by_dest[dest] for field, dest in _FIELD_DESTS.items() if dest in by_dest}}


def _error_line(exc: BaseException) -> str:
    """``exc`` as the one line after ``segflow: error:``, spec fields named by their options."""
    return console.one_line(exc, options=_options_by_field(build_parser()))


#: What Ctrl-C leaves, by command (a training run keeps no epoch: it starts again).
_INTERRUPTED = {None: "segflow: interrupted; what finished is kept: run the same command again to resume",
                "train": "segflow: training interrupted; no checkpoint was written (an existing --out is unchanged); "
                         "the same command trains again from the start"}
#: The command this process runs (for :func:`_exit_on_interrupt`).
_command: str | None = None


def _exit_on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C during a command: say so in one line, end this command's processes (the temporary
    Prefect server, the local cluster's workers) and exit with status 130 at once.

    Nothing is lost: every finished unit, chunk and table part is already on disk whole (runs and
    ingests survive a killed process bit for bit), and the same command resumes; training writes its
    checkpoint at the end only, so an interrupted one leaves none (and an existing one unchanged). Letting the
    interrupt unwind instead waits on Prefect's and Dask's shutdown, which can take minutes while the
    workers finish their tasks and log records are retried against a server already gone.
    """
    if sys.stderr.isatty():
        sys.stderr.write("\x1b[?25h\n")  # the progress bars hide the cursor
    print(_INTERRUPTED.get(_command, _INTERRUPTED[None]), file=sys.stderr, flush=True)
    sys.stdout.flush()
    _end_child_processes()
    os._exit(130)


def _end_child_processes(timeout_s: float = 2.0) -> None:
    """Terminate every process this one started (recursively), then kill those still running after
    ``timeout_s``."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``segflow`` command; returns its exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout's reader went away (``segflow report --json | head``): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # as a command ended by SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":  # reads the lake only: no Prefect
        return _report(args)
    if args.command == "export":  # reads the run directory only: no Prefect
        return _export(args)
    if args.command == "model":  # plain segcore calls: no Prefect
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
        return _model(args)
    _prefect_env()
    quiet = not args.verbose and args.command != "serve"  # a server's log is its output
    console.setup_logging(quiet=quiet)  # before Prefect and distributed are imported
    from segcore.errors import SegflowError

    global _command
    _command = args.command
    interrupt = signal.getsignal(signal.SIGINT)
    # a server stops on Ctrl-C as Prefect stops it; handlers are set in the main thread only
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_on_interrupt)
    try:
        with console.progress_display() if quiet else nullcontext():
            text = _run(args)
    except (SegflowError, ValidationError, OSError) as exc:
        print(f"segflow: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, interrupt)  # main() called in a longer-lived process leaves it as it was
    if text:
        print(text)  # after the progress display: a live bar would rewrap it
    return 0


def _run(args: argparse.Namespace) -> str:
    """Start the flow of ``args.command``; returns its result as text for stdout.

    The Prefect server (when none is configured) and the local cluster start first, side by side,
    and boot while the flows are imported; the worker imports what the tasks need meanwhile. The
    command's spec (:func:`_spec`), the model record of ``segment`` and ``run`` (its metadata), a
    ``--device`` that local workers could not use, and the inputs named (:func:`_check_inputs`) are
    checked before the cluster starts, while the server boots: a bad option value, a missing or
    broken model, ``--device cuda`` on a machine without a GPU, or a mistyped image folder or store,
    is told in seconds."""
    from flows.execution import started_cluster, wait_warm
    from flows.server import start_api, wait_api

    start_api()
    spec = _spec(args)
    if args.command in ("segment", "run"):
        from segcore.models.predict import check_device
        from segcore.run.start import check_ground_truth, check_model

        meta = check_model(args.checkpoint)
        if args.command == "run" and args.masks and args.mask_kind:
            check_ground_truth(meta, args.mask_kind)
        if args.device and not args.dask_address:  # local workers: this machine's GPUs
            check_device(args.device)
    _check_inputs(args, spec)
    import distributed  # noqa: F401 - sets its loggers' levels when imported
    import prefect_dask  # noqa: F401

    if not args.verbose:  # after those imports, before the cluster starts
        for name in ("distributed", "prefect_dask"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # quiet: the workers' warnings are shown here (verbose: the workers print their own log lines)
    with started_cluster(None if args.command == "serve" else _execution(args), forward_warnings=not args.verbose):
        import flows.pipeline  # noqa: F401 - imported while the server and the workers boot

        wait_api()
        wait_warm()
        return _flow(args, spec)


def _check_inputs(args: argparse.Namespace, spec: Any) -> None:
    """Tell a missing image or mask directory (``ingest``, ``run``) or store (``segment``, ``train``),
    a training ``--out`` that cannot be a checkpoint file, a training ``--device`` this machine
    lacks, a store without images of one shape to train an image model on, and a validation split
    its images cannot make (too high a fraction, a group pattern that groups nothing or everything),
    before the cluster starts, with the message the flow would give after it."""
    if args.command in ("ingest", "run"):
        from segcore.collection.sources import check_sources

        check_sources(args.images, args.masks)
    if args.command in ("segment", "run"):
        _check_output(spec.out if args.command == "segment" else spec.segment.out, "run directory", "--out")
    if args.command in ("ingest", "run"):
        _check_output(spec.store if args.command == "ingest" else spec.ingest.store, "store", "--store")
    elif args.command in ("segment", "train"):
        from segcore.collection.store import open_store

        open_store(spec.store)
        if args.command == "train":
            from segcore.models import spatial_dims_of
            from segcore.models.checkpoint import check_checkpoint_path
            from segcore.training.from_store import labelled_slots

            check_checkpoint_path(spec.out, overwrite=spec.overwrite)
            if args.device and not args.dask_address:  # local workers: this machine's GPUs
                from segcore.models.predict import check_device

                check_device(args.device)
            if spatial_dims_of(spec.model) == 2:  # images of one shape with ground truth (the manifest only)
                ids = labelled_slots(spec.store)[1]
                if spec.kind == "semantic":  # the split the trainer will make, from the ids alone
                    from segcore.training.inputs import split_counts
                    from segcore.training.recipe import check_group_pattern

                    split_counts(len(ids), spec.val_fraction)
                    if spec.group_pattern and spec.val_fraction > 0:
                        check_group_pattern(ids, spec.group_pattern)


def _check_output(location: str, what: str, option: str) -> None:
    """Refuse an output folder that cannot be made or written (a file, a folder under a file) before any work."""
    from segcore import fsio
    from segcore.errors import ConfigError

    problem = fsio.write_problem(location, folder=True)
    if problem:
        raise ConfigError(f"cannot write the {what} {location!r}: {problem}; give another {option}")


#: ``segflow train`` options that are builder arguments of the model, by argument.
ARCH_OPTIONS = {"base": "--base", "depth": "--depth", "score_threshold": "--score-threshold",
                "overlap_threshold": "--overlap-threshold"}


def _check_arch_options(model: str, arch: dict[str, Any]) -> None:
    """Refuse, by their option names, builder options that ``model`` does not take (``--base`` for
    Mask R-CNN); an unknown model is left to the spec, which lists the valid names."""
    import inspect

    from segcore.errors import ConfigError
    from segcore.models import MODELS

    if model not in MODELS:
        return
    takes = set(inspect.signature(MODELS[model]).parameters)
    wrong = [ARCH_OPTIONS[k] for k in arch if k not in takes]
    if wrong:
        fits = [option for k, option in ARCH_OPTIONS.items() if k in takes]
        raise ConfigError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --model {model}; "
                          + (f"its options here: {', '.join(fits)}" if fits else "it takes none of "
                             + ", ".join(ARCH_OPTIONS.values())))


#: Options that name local files or folders (or URLs): made absolute for a cluster given by --dask-address.
PATH_OPTIONS = ("images", "masks", "store", "checkpoint", "out", "lake", "init")


def _spec(args: argparse.Namespace) -> Any:
    """The validated spec of the flow ``args.command`` starts (no Prefect needed): built before the
    cluster starts, so a bad option value is told in seconds."""
    from segcore.config import RunSpec

    if getattr(args, "dask_address", None):  # the workers of a cluster elsewhere do not share this directory
        from segcore import fsio

        for name in PATH_OPTIONS:
            if getattr(args, name, None):
                setattr(args, name, fsio.absolute(getattr(args, name)))
    if args.command == "ingest":
        return _ingest_spec(args, args.store)
    if args.command == "segment":
        return _segment_spec(args, args.store)
    if args.command in ("run", "serve"):  # serve: the incremental run it schedules
        store = args.store or os.path.join(args.out, "store.zarr")
        return RunSpec(ingest=_ingest_spec(args, store), segment=_segment_spec(args, store))
    if args.command == "train":
        from segcore.config import TrainSpec

        names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names is not None else None
        arch = _given(base=args.base, depth=args.depth, score_threshold=args.score_threshold,
                      overlap_threshold=args.overlap_threshold) or None
        _check_arch_options(args.model, arch or {})
        return TrainSpec(store=args.store, out=args.out, overwrite=args.overwrite, model=args.model,
                         execution=_execution(args),
                         **_given(epochs=args.epochs, val_fraction=args.val_fraction, class_names=names,
                                  arch_kwargs=arch, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                                  crop_size=args.crop_size, normalisation=args.normalisation,
                                  time_budget_s=args.time_budget, val_split=args.val_split,
                                  group_pattern=args.group_pattern, patch_size=args.patch_size,
                                  schedule=args.schedule, largest_region=args.largest_region,
                                  min_epoch_patches=args.min_epoch_patches, refit=args.refit,
                                  device=args.device, precision=args.precision,
                                  init=args.init))
    if args.command == "demo":
        from flows.demo import DemoSpec

        return DemoSpec(out=args.out, model=args.model, seed=args.seed, execution=_execution(args),
                        **_given(n_images=args.images, size=args.size, epochs=args.epochs))
    raise AssertionError(f"unknown command {args.command!r}")  # argparse allows only the commands above


def _flow(args: argparse.Namespace, spec: Any) -> str:
    from flows.pipeline import ingest_flow, run_flow, segment_flow, with_runner

    if args.command == "ingest":
        return json.dumps(with_runner(ingest_flow, _execution(args))(spec), indent=2)
    if args.command == "segment":
        return summary_text(with_runner(segment_flow, _execution(args))(spec))
    if args.command == "run":
        result = with_runner(run_flow, _execution(args))(spec)
        if result["segmented"]:
            return summary_text(result)
        return (f"nothing new in {args.images}: all {result['ingest']['files']} file(s) are already in "
                f"{spec.ingest.store} and segmented in {args.out}")
    if args.command == "train":
        from flows.train import train_flow

        return train_summary(with_runner(train_flow, spec.execution)(spec))
    if args.command == "demo":
        from flows.demo import demo_flow

        result = with_runner(demo_flow, spec.execution)(spec)
        return f"{summary_text(result)}\ndemo outputs are in {os.path.abspath(args.out)}"
    if args.command == "serve":
        from prefect import serve
        from prefect.deployments.runner import RunnerDeployment

        import flows.deployed

        # By entrypoint: each run imports the flows in a fresh process, as a worker does. (A served flow
        # object is pickled into the run's process, where the pipeline flow cannot resolve its spec types.)
        deployment = RunnerDeployment.from_entrypoint(
            f"{flows.deployed.__file__}:run_deployment_flow", name=args.name, cron=args.cron,
            parameters={"spec": spec.model_dump(mode="json")}, tags=["segflow", "incremental"],
            description=f"Incremental segflow run of the landing zone {args.images} into {args.out}")
        serve(deployment, limit=1)
        return ""
    raise AssertionError(f"unknown command {args.command!r}")  # argparse allows only the commands above


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
