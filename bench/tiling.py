"""Large images through the pipeline: tiled vs whole-image agreement, memory, instance stitching.

Every segmentation here is a `segflow` command in a child process (ingest, then segment through
Prefect + Dask), sampled every 0.1 s for the resident memory of its process tree. Prints the
figures for bench/RESULTS.md.

    .venv/bin/python bench/tiling.py semantic [--size 4096]
        Trains the demo UNet (or takes --checkpoint), segments one synthetic size x size image tiled
        (defaults: 512-px tiles, 128 px overlap, Gaussian blending) and whole (--tile-size 0);
        prints their pixel agreement and Dice.
    .venv/bin/python bench/tiling.py memory [--sizes 4096 8192 16384]
        Peak RSS of the segmenting worker process and of the whole tree, per image size.
    .venv/bin/python bench/tiling.py instance [--size 4096]
        Trains the demo Mask R-CNN (or takes --checkpoint), segments one synthetic image of
        nuclei tiled (defaults) and whole (same weights rebuilt with caps large enough for the
        whole image), and counts split and duplicated objects and objects on seams.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segcore.models.checkpoint import load_checkpoint, read_meta, save_checkpoint  # noqa: E402
from segcore.metrics.instance import instance_iou, match_instances  # noqa: E402
from segcore.run.results import open_run  # noqa: E402
from segcore.synthetic_large import make_large_sample  # noqa: E402


def segflow(*args: str) -> dict:
    """Run ``segflow ARGS`` in a child process; returns seconds and peak RSS (tree, largest process)."""
    cmd = [sys.executable, "-m", "flows.cli", *args]
    print("$ segflow " + " ".join(args), flush=True)
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree": 0, "single": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                procs = [proc] + proc.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                peak["tree"] = max(peak["tree"], sum(rss))
                peak["single"] = max(peak["single"], max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(out[-4000:])
        raise SystemExit(f"segflow {args[0]} failed with exit code {proc.returncode}")
    gib = 1024**3
    return {"seconds": round(seconds, 1), "peak_rss_tree_gib": round(peak["tree"] / gib, 3),
            "peak_rss_largest_process_gib": round(peak["single"] / gib, 3)}


def write_image(work: Path, name: str, image: np.ndarray, labels: np.ndarray) -> None:
    for kind, array in (("images", image), ("masks", labels)):
        (work / kind).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(work / kind / f"{name}.tif", array)


def ingest(work: Path, mask_kind: str) -> str:
    store = str(work / "store.zarr")
    segflow("ingest", "--images", str(work / "images"), "--masks", str(work / "masks"), "--mask-kind", mask_kind,
            "--store", store)
    return store


def train_demo_unet(work: Path) -> str:
    from segcore.training import semantic as tr
    from segcore.collection.imageio import read_image, read_mask
    from segcore.synthetic import CLASS_NAMES, generate_collection

    ids = generate_collection(work / "train", n_images=tr.DEMO_N_TRAIN, size=tr.DEMO_IMAGE_SIZE, seed=0)
    images = np.stack([read_image(work / "train" / "images" / f"{i}.png") for i in ids])
    masks = np.stack([read_mask(work / "train" / "masks" / f"{i}.png") for i in ids])
    model, meta, _ = tr.train_semantic(images, masks.astype(np.int64), class_names=CLASS_NAMES,
                                       arch_kwargs=tr.DEMO_ARCH_KWARGS, normalisation=tr.DEMO_NORMALISATION,
                                       epochs=tr.DEMO_EPOCHS, batch_size=tr.DEMO_BATCH_SIZE, lr=tr.DEMO_LR, seed=0)
    return str(save_checkpoint(work / "unet.safetensors", model, meta))


def train_demo_maskrcnn(work: Path) -> str:
    from segcore.training import instance as ti
    from segcore.collection.imageio import read_image, read_mask
    from segcore.synthetic import INSTANCE_CLASS_NAMES, generate_instance_collection

    ids = generate_instance_collection(work / "train", n_images=ti.DEMO_INSTANCE_N_TRAIN,
                                       size=ti.DEMO_INSTANCE_IMAGE_SIZE, seed=0)
    images = np.stack([read_image(work / "train" / "images" / f"{i}.png") for i in ids])
    labels = np.stack([read_mask(work / "train" / "masks" / f"{i}.png") for i in ids])
    model, meta, _ = ti.train_instance(images, labels.astype(np.int64), arch=ti.DEMO_INSTANCE_ARCH,
                                       arch_kwargs=ti.DEMO_INSTANCE_ARCH_KWARGS, class_names=INSTANCE_CLASS_NAMES,
                                       normalisation=ti.DEMO_INSTANCE_NORMALISATION, epochs=ti.DEMO_INSTANCE_EPOCHS,
                                       batch_size=ti.DEMO_INSTANCE_BATCH_SIZE, lr=ti.DEMO_INSTANCE_LR, seed=0)
    return str(save_checkpoint(work / "maskrcnn.safetensors", model, meta))


def dice_by_class(run_dir: str) -> dict[str, float]:
    table = open_run(run_dir).dice_table().to_pandas()
    return {r.class_name: float(r.dice) for r in table.itertuples()}


def cmd_semantic(args: argparse.Namespace, work: Path) -> dict:
    ckpt = args.checkpoint or train_demo_unet(work)
    image, labels = make_large_sample(np.random.default_rng(args.seed), height=args.size, width=args.size)
    write_image(work, "big", image, labels)
    store = ingest(work, "class")
    tiled = segflow("segment", "--store", store, "--checkpoint", ckpt, "--out", str(work / "tiled"))
    whole = segflow("segment", "--store", store, "--checkpoint", ckpt, "--out", str(work / "whole"), "--tile-size", "0")
    a, b = open_run(str(work / "tiled")).mask("big"), open_run(str(work / "whole")).mask("big")
    dt, dw = dice_by_class(str(work / "tiled")), dice_by_class(str(work / "whole"))
    return {"size": args.size, "agreement": float((a == b).mean()), "pixels_differing": int((a != b).sum()),
            "dice_tiled": dt, "dice_whole": dw, "max_abs_delta_dice": max(abs(dt[k] - dw[k]) for k in dt),
            "tiled": tiled, "whole": whole}


def cmd_memory(args: argparse.Namespace, work: Path) -> dict:
    ckpt = args.checkpoint or train_demo_unet(work)
    rows = []
    for size in args.sizes:
        sub = work / f"s{size}"
        image, labels = make_large_sample(np.random.default_rng(args.seed), height=size, width=size, per_128=2.0)
        write_image(sub, "big", image, labels)
        del image, labels
        store = ingest(sub, "class")
        rec = segflow("segment", "--store", store, "--checkpoint", ckpt, "--out", str(sub / "tiled"))
        rows.append({"size": size, **rec, "megapixels_per_s": round(size * size / 1e6 / rec["seconds"], 2)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(sub)
    return {"rows": rows}


def _crossing_ids(labels: np.ndarray, step: int) -> set[int]:
    """Ground-truth objects whose pixels lie on both sides of a line at a multiple of ``step``."""
    from scipy.ndimage import find_objects

    return {i + 1 for i, sl in enumerate(find_objects(labels.astype(np.int32)))
            if sl is not None and any(s.start // step != (s.stop - 1) // step for s in sl)}


def _objects_crossing(labels: np.ndarray, step: int) -> int:
    return len(_crossing_ids(labels, step))


def _matched(pred: np.ndarray, labels: np.ndarray) -> set[int]:
    """Ground-truth objects matched one-to-one at IoU >= 0.5."""
    iou, _, gt_ids = instance_iou(pred, labels)
    return {int(g) for g in gt_ids[match_instances(iou, threshold=0.5)[1]]}


def _in_pieces(pred: np.ndarray, labels: np.ndarray) -> set[int]:
    """Ground-truth objects covered by two or more predicted objects, each lying mostly (>= 50 % of its
    pixels) inside the object and covering >= 10 % of it: an object split, or detected twice."""
    m = int(pred.max()) + 1
    sel = (labels > 0) & (pred > 0)
    codes, counts = np.unique(labels[sel].astype(np.int64) * m + pred[sel].astype(np.int64), return_counts=True)
    g, p = codes // m, codes % m
    g_area, p_area = np.bincount(labels.ravel().astype(np.int64)), np.bincount(pred.ravel().astype(np.int64))
    piece = (counts >= 0.5 * p_area[p]) & (counts >= 0.1 * g_area[g])
    return {int(v) for v, n in zip(*np.unique(g[piece], return_counts=True)) if n >= 2}


def cmd_instance(args: argparse.Namespace, work: Path) -> dict:
    ckpt = args.checkpoint or train_demo_maskrcnn(work)
    image, labels = make_large_sample(np.random.default_rng(args.seed), height=args.size, width=args.size,
                                      kind="instance", per_128=args.per_128)
    write_image(work, "big", image, labels)
    store = ingest(work, "instance")
    tiled = segflow("segment", "--store", store, "--checkpoint", ckpt, "--out", str(work / "tiled"))
    # The same weights with caps that let one pass over the whole image keep every object.
    model, meta = load_checkpoint(ckpt)
    n_gt = int(labels.max())
    big = meta.model_copy(update={"arch_kwargs": {**meta.arch_kwargs, "box_detections_per_img": 3 * n_gt,
                                                  "proposals_per_img": 6 * n_gt}})
    big_ckpt = save_checkpoint(work / "maskrcnn-uncapped.safetensors", model, big)
    whole = segflow("segment", "--store", store, "--checkpoint", str(big_ckpt), "--out", str(work / "whole"),
                    "--tile-size", "0")
    rt, rw = open_run(str(work / "tiled")), open_run(str(work / "whole"))
    pt, pw = rt.instances("big"), rw.instances("big")
    mt = rt.instance_metrics_table().to_pylist()[0]
    mw = rw.instance_metrics_table().to_pylist()[0]
    # Ground-truth objects the whole-image pass finds (IoU >= 0.5): does tiling split or duplicate them?
    found, found_tiled = _matched(pw, labels), _matched(pt, labels)
    lost = found - found_tiled
    in_pieces_t, in_pieces_w = _in_pieces(pt, labels), _in_pieces(pw, labels)
    by_tiling = (in_pieces_t - in_pieces_w) & found
    crossing = _crossing_ids(labels, args.tile)
    seam_table = rt.seam_table().to_pylist()
    seam_row = {k: v for k, v in seam_table[0].items() if k not in ("checkpoint_sha256", "run_id")}
    return {"size": args.size, "gt_objects": n_gt, "gt_objects_crossing_detector_seams": len(crossing),
            "gt_objects_crossing_block_seams": _objects_crossing(labels, 1024), "found_by_whole": len(found),
            "in_pieces_tiled": len(in_pieces_t), "in_pieces_whole": len(in_pieces_w),
            "split_or_duplicated_by_tiling": len(by_tiling),
            "split_or_duplicated_by_tiling_on_seams": len(by_tiling & crossing),
            "found_by_whole_missed_by_tiled": len(lost), "of_which_on_seams": len(lost & crossing),
            "f1_tiled": mt["f1"], "f1_whole": mw["f1"], "delta_f1": mt["f1"] - mw["f1"],
            "ap_tiled": mt["ap"], "ap_whole": mw["ap"], "seams": seam_row, "tiled": tiled, "whole": whole,
            "model": read_meta(ckpt).arch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["semantic", "memory", "instance"])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--per-128", type=float, default=3.0, help="instance mode: objects per 128 x 128 px")
    ap.add_argument("--tile", type=int, default=256, help="instance mode: the detector core of the run (for seam counts)")
    ap.add_argument("--checkpoint", help="use this checkpoint instead of training the demo model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "tiling"))
    args = ap.parse_args()
    work = Path(args.workdir) / args.mode
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.checkpoint:
        args.checkpoint = str(Path(args.checkpoint).resolve())
    result = {"semantic": cmd_semantic, "memory": cmd_memory, "instance": cmd_instance}[args.mode](args, work)
    result["command"] = "bench/tiling.py " + " ".join(sys.argv[1:])
    print("RESULT " + json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
