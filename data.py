"""Stage 0, the dataset: contractor episodes of the built-in environment, written and read back.

Dreamer 4 learns the diamond challenge offline, from recorded contractor play (paper §4.1). This
file lets the scripted contractors of environment.py play fresh worlds, writes their episodes in
the format every later stage reads (the data contract below), loads them back for training, and
imports your own video as unlabeled episodes.

Reads nothing (or --from-frames image folders). Writes data/<name>/: episodes (.npz), meta.json,
episodes.png, episode.gif.

Run:
    python data.py                  # data/diamond64: 1,000 episodes × 256 frames, 64×64 (≈ 2 min)
    python data.py --preset cpu     # data/diamond32: 1,000 episodes × 256 frames, 32×32 (≈ 1 min)
    python data.py --preset smoke   # data/smoke: 8 episodes × 64 frames, 32×32 (tests)
    python data.py --from-frames DIR --out data/NAME   # image folders as unlabeled episodes
    python data.py --check DIR      # check a dataset folder against the data contract
    python data.py --bench          # environment frames/s (= python environment.py --bench)
    python data.py --eval-random    # random, contractor, expert (= environment.py --eval-random)

Paper map (no equations in this stage):
    §4.1 VPT contractor data                            -> generate (the players: environment.py)
    §3.3 "task-relevant" subset for agent finetuning    -> SequenceDataset.sample(relevant=…)

Data contract (written out here once; every stage relies on it)
    One episode = one file <id>.npz in the dataset folder (actions, rewards absent for unlabeled
    video):
      frames   uint8   (T, H, W, 3)
      actions  int64   (T, A)        row t = the action taken AT frame t; it leads to frame t+1.
                                     The last row is chosen but never executed (the episode
                                     ends on frame T−1).
      rewards  float32 (T, n_tasks)  row t = the reward received on ENTERING frame t; row 0 is 0.
          frame_0 --a_0--> frame_1, r_1 --a_1--> frame_2, r_2 --a_2--> …
    So the dynamics token of step t carries a_{t−1} ("no action" at t = 0 and for unlabeled
    clips): h_t has seen a_{t−1} and z_t; the policy head at h_t predicts a_t, the reward head r_t
    (DreamerV3 indexing; pinned in tests/test_data.py). Every action component is categorical (a
    button has 2 classes).
    meta.json: image_size (H = W), fps, action_components [[name, classes], …], tasks [names],
    episodes, frames, split {"train": [ids], "heldout": [ids]} (by episode, never by frame), seed.

Deviations from the paper and choices it leaves open: docs/deviations.md (section `data.py`).
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
import shutil
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

import common
import environment
from common import parse_args, seed_everything

BUILTIN = {"diamond64": "default", "diamond32": "cpu", "smoke": "smoke"}  # dataset name -> preset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what --from-frames imports
GENERATOR = "minidreamer4 data.py"  # meta.json "generator" of the datasets `generate` writes


@dataclass
class Args:
    preset: str = "default"  # default (GPU: 64×64), cpu (32×32, smaller) or smoke (seconds)
    name: str = "diamond64"  # dataset name; written to data/<name> unless --out is given
    out: str = ""  # output folder (default data/<name>)
    image_size: int = 64  # frame height = width in pixels, a multiple of 8
    episodes: int = 1000  # episodes to write, one random world each (not in paper)
    episode_len: int = 256  # frames per episode, fixed (paper: 60 min episodes)
    heldout: float = 0.1  # fraction of episodes held out for evaluation, split by episode
    fps: int = 10  # nominal frame rate written to meta.json and the GIF (paper: 20)
    seed: int = 0  # generation seed: same seed, same dataset
    assets: bool = True  # also copy the picture grid to assets/environment.png (README)
    bench: bool = False  # only measure environment frames/s on one core
    eval_random: bool = False  # only print success per task of random, contractor, expert players
    eval_episodes: int = 200  # episodes for --eval-random
    from_frames: str = ""  # import DIR/<episode>/<frames>.png as unlabeled episodes into --out
    resize: int = 0  # with --from-frames: resize images to N×N (0 = keep; sizes must agree)
    check: str = ""  # only check the dataset folder DIR against the data contract, then exit
    probe: bool = True  # with --check: also run the action-alignment probe (seconds)


PRESETS = {"smoke": dict(name="smoke", image_size=32, episodes=8, episode_len=64, assets=False,
                         eval_episodes=16),
           "cpu": dict(name="diamond32", image_size=32, episodes=1000, assets=False)}


# ==== Writing a dataset: contractor episodes and pictures, or imported image folders ==========
def split_ids(ids: list[str], heldout: float) -> dict:
    """Held-out = the last ⌈heldout·N⌉ sorted episodes (≥ 1 when N ≥ 2): by episode, never by
    frame."""
    ids = sorted(ids)
    n = 0
    if len(ids) >= 2 and heldout > 0:
        n = min(len(ids) - 1, max(1, int(np.ceil(heldout * len(ids)))))
    return {"train": ids[:len(ids) - n], "heldout": ids[len(ids) - n:]}


def write_episode(root: str, episode_id: str, frames: np.ndarray,
                  actions: np.ndarray | None = None, rewards: np.ndarray | None = None) -> str:
    """Write one episode in the data contract's format (frames; actions, rewards unless None):
    bring your own."""
    path, labels = os.path.join(root, episode_id + ".npz"), {"actions": actions, "rewards": rewards}
    np.savez_compressed(path, frames=frames, **{k: v for k, v in labels.items() if v is not None})
    return path


def write_meta(root: str, meta: dict) -> None:
    tmp = os.path.join(root, f"meta.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(root, "meta.json"))  # atomic: a reader never sees half a meta.json


def generate(args: Args) -> str:
    """Play contractors in fresh worlds; write into <out>.partial, renamed at the end: never half
    a dataset."""
    root = args.out or os.path.join("data", args.name)
    if os.path.exists(root) and os.listdir(root):
        ours = (os.path.exists(os.path.join(root, "meta.json"))
                and load_meta(root).get("generator") == GENERATOR)
        if not ours:
            raise FileExistsError(f"{root} exists and is not a dataset written by data.py; "
                                  f"choose another --out")
    tmp = root.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        return _generate_into(args, root, tmp)
    except BaseException:  # an error or Ctrl-C: never leave half a dataset behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _generate_into(args: Args, root: str, tmp: str) -> str:
    """The body of generate: the episodes and pictures into tmp, then tmp renamed to root."""
    ids, all_rewards, t0 = [f"ep{i:06d}" for i in range(args.episodes)], [], time.time()
    batch = 16  # episodes in lockstep (batched decoding); fixed: the data depends on seed only
    for start in range(0, args.episodes, batch):
        seeds = [environment.episode_seed(args.seed, "data", i)
                 for i in range(start, min(start + batch, args.episodes))]
        # fresh player profiles per batch
        policy = environment.ContractorPolicy(environment.episode_seed(args.seed, "players", start))
        ep = environment.rollout(policy, seeds, args.image_size, args.episode_len)
        for i in range(len(seeds)):
            write_episode(tmp, ids[start + i], ep["frames"][i], ep["actions"][i], ep["rewards"][i])
        all_rewards.append(ep["rewards"])
        if (start // batch) % 5 == 4 or start + len(seeds) == args.episodes:
            print(f"  {start + len(seeds)}/{args.episodes} episodes, {time.time() - t0:.1f}s",
                  flush=True)
    gen_s, rewards = time.time() - t0, np.concatenate(all_rewards)  # (episodes, T, n_tasks)
    meta = {"format_version": 1, "generator": GENERATOR,
            "render_version": environment.RENDER_VERSION,
            "name": os.path.basename(root.rstrip("/")),
            "image_size": args.image_size, "fps": args.fps, "episode_len": args.episode_len,
            "action_components": [list(c) for c in environment.ACTION_COMPONENTS],
            "tasks": environment.TASKS, "episodes": len(ids),
            "frames": len(ids) * args.episode_len, "split": split_ids(ids, args.heldout),
            "seed": args.seed, "args": asdict(args)}
    write_meta(tmp, meta)
    order = np.argsort(-rewards.sum((1, 2)), kind="stable")  # episodes by milestones reached
    shown = [{"frames": load_frames(os.path.join(tmp, ids[i] + ".npz")), "rewards": rewards[i]}
             for i in order[[0, len(order) // 2, -1]]]  # the best, a median and the weakest
    asset = os.path.join("assets", "environment.png") if args.assets else None
    save_pictures(tmp, shown, args.fps, asset)
    shutil.rmtree(root, ignore_errors=True)  # an older dataset of ours (checked above)
    os.replace(tmp, root)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(root, "*.npz")))
    n_frames = meta["frames"]
    print(f"wrote {root}: {len(ids)} episodes, {n_frames:,} frames of "
          f"{args.image_size}×{args.image_size}, {size:,} bytes on disk "
          f"({size / 2 ** 20:.1f} MiB, {size / n_frames:.0f} B/frame), in {gen_s:.1f}s "
          f"({n_frames / gen_s:,.0f} frames/s incl. contractors and compression)")
    rates = {"success": environment.success_rates(rewards), "episodes": len(ids),
             "return": {"mean": float(rewards.sum((1, 2)).mean())}}
    environment.print_rates("contractor success in the dataset", rates)
    print(f"environment speed: {environment.bench_env(args.image_size, 5000):,.0f} frames/s "
          f"on one core (rendering included)")
    return root


def save_pictures(root: str, episodes: list, fps: int, asset_path: str | None = None) -> None:
    """episodes.png: episodes [{frames (T, H, W, 3), rewards (T, n_tasks)}] as rows of frames, the
    first at its milestones (filled up with evenly spaced frames); episode.gif: the first.
    asset_path: a copy of the grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    cols, (T, S) = 8, episodes[0]["frames"].shape[:2]
    first = episodes[0]["rewards"]  # (T, n_tasks)
    events = [(int(t), environment.TASKS[k]) for t, k in zip(*np.nonzero(first))][:cols]
    times = [int(t) for t in np.linspace(0, T - 1, cols + 2)[1:-1]
             if all(abs(t - e) > 2 for e, _ in events)]
    rows = [sorted(events + [(t, "") for t in times[:cols - len(events)]])]
    rows += [[(int(t), "") for t in np.linspace(0, T - 1, cols)] for _ in episodes[1:]]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.45 * len(rows)),
                             squeeze=False)
    for r, (row, ep) in enumerate(zip(rows, episodes)):
        for ax, (t, name) in zip(axes[r], row):
            ax.imshow(ep["frames"][t], interpolation="nearest")
            ax.set_title(f"t={t} {name.replace('_', ' ')}", fontsize=6,
                         color="C3" if name else "black")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"built-in environment {S}×{S}: the best contractor episode at its milestones "
                 f"(top), a median and the weakest contractor (below); inventory strip at the "
                 f"bottom of each frame", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "episodes.png"), dpi=120)
    plt.close(fig)
    size = S * max(1, 128 // S)  # the GIF scaled up to about 128 pixels, nearest neighbour
    gif = [Image.fromarray(f).resize((size, size), Image.NEAREST) for f in episodes[0]["frames"]]
    gif[0].save(os.path.join(root, "episode.gif"), save_all=True, append_images=gif[1:],
                duration=1000 // fps, loop=0)
    if asset_path:
        os.makedirs(os.path.dirname(asset_path), exist_ok=True)
        shutil.copyfile(os.path.join(root, "episodes.png"), asset_path)


def _read_image(path: str, resize: int) -> np.ndarray:
    """One image as uint8 (H, W, 3), resized to resize×resize (bilinear) unless resize is 0."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize:
            im = im.resize((resize, resize), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)  # (H, W, 3)


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: frame_2 before frame_10 (ffmpeg writes %d.png)."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def import_frames(src: str, out: str, resize: int = 0, fps: int = 10, heldout: float = 0.1) -> str:
    """DIR/<episode>/<frame images, sorted by name> -> out/ep000000.npz … (frames only) +
    meta.json. Images must share one square size unless `resize` > 0 resizes all to
    resize×resize (bilinear)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--from-frames {src} does not exist (or is not a folder)")
    folders = sorted((d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))),
                     key=natural_key)
    if not folders:
        raise FileNotFoundError(f"{src}: expected one sub-folder of images per episode "
                                f"({src}/<episode>/<frame>.png), found no sub-folder")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    tmp = out.rstrip("/") + ".partial"  # written in full, then renamed (as in generate)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _import_into(src, folders, tmp, resize, fps, heldout, os.path.basename(out.rstrip("/")))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an import behind
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    meta = load_meta(out)
    resized = f" (resized to {resize}×{resize})" if resize else ""
    print(f"imported {meta['episodes']} unlabeled episodes of {meta['image_size']}×"
          f"{meta['image_size']} frames into {out}{resized}")
    print_check(out, check_dataset(out))  # the same checks as `python data.py --check`
    return out


def _import_into(src: str, folders: list[str], tmp: str, resize: int, fps: int, heldout: float,
                 name: str) -> None:
    """The body of import_frames: every episode folder of src into tmp, then meta.json."""
    size, sources = None, {}  # sources: episode id -> its sub-folder
    for d in folders:
        files = sorted((f for f in os.listdir(os.path.join(src, d))
                        if f.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
        if not files:
            warnings.warn(f"{os.path.join(src, d)}: no images; skipped")
            continue
        frames = []
        for f in files:
            path = os.path.join(src, d, f)
            a = _read_image(path, resize)  # (H, W, 3)
            if size is None and a.shape[0] != a.shape[1]:
                raise ValueError(f"{path}: {a.shape[0]}×{a.shape[1]} is not square; "
                                 f"pass --resize N")
            if size is not None and a.shape != size:
                raise ValueError(f"{path}: {a.shape[0]}×{a.shape[1]} differs from the first "
                                 f"image ({size[0]}×{size[1]}); pass --resize N to resize every "
                                 f"image to N×N")
            size = a.shape
            frames.append(a)
        sources[f"ep{len(sources):06d}"] = d
        write_episode(tmp, list(sources)[-1], np.stack(frames))  # frames only: (T, H, W, 3)
    if not sources:
        raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) in any "
                                f"episode sub-folder")
    write_meta(tmp, {"format_version": 1, "generator": "data.py --from-frames",
                     "name": name, "image_size": size[0], "fps": fps,
                     "action_components": [], "tasks": [], "episodes": len(sources),
                     "split": split_ids(list(sources), heldout), "seed": None,
                     "sources": sources})


# ==== Reading a dataset: validation, meta.json, the window sampler ============================
REGENERATE = ("Write this episode again in the data contract's format (`python data.py --help`), "
              "or take its id out of the \"split\" lists of meta.json; then `python data.py "
              "--check {}` lists what remains.")
HOW_TO_MAKE = ("Generate the built-in dataset with `python data.py`, or import images with "
               "`python data.py --from-frames DIR --out {}`.")


def _bad(path: str, problem: str, error=ValueError) -> Exception:
    """The error for a bad file: names the file and says how to fix it. A dataset that `generate`
    wrote gets the exact command that writes it again (the advice must not go in a circle:
    deleting one episode only trades this error for "listed in meta.json but missing")."""
    root = os.path.dirname(path)
    try:
        with open(os.path.join(root, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    if meta.get("generator") == GENERATOR and isinstance(meta.get("args"), dict):
        how = common.command_for("data.py", Args, PRESETS, root, recorded=meta["args"])
        return error(f"{path}: {problem} This dataset was written by data.py: delete the folder "
                     f"{root} and write it again with `{how}`.")
    return error(f"{path}: {problem} {REGENERATE.format(root)}")


def _read_episode(path: str) -> tuple:
    """(frames shape, frames dtype, actions or None, rewards or None) of one .npz, the frames left
    compressed."""
    keys = []
    try:
        with np.load(path) as z:
            keys = sorted(z.files)
            with z.zip.open("frames.npy") as f:  # KeyError if there is none
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            labels = (z[k] if k in keys else None for k in ("actions", "rewards"))
            return shape, dtype, *labels
    except KeyError:
        raise _bad(path, f"missing key 'frames' (found {keys}); every episode needs "
                         f"frames uint8 (T, H, W, 3).") from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, …
        raise _bad(path, f"cannot read it, the file is truncated or corrupt "
                         f"({type(e).__name__}: {e}).") from None


def check_episode(path: str, meta: dict) -> dict:
    """Check one episode file against the data contract and meta.json, without decoding its
    frames. Returns {"T", "actions" (T, A) int64 or None, "rewards" (T, n_tasks) float32 or
    None}."""
    shape, dtype, actions, rewards = _read_episode(path)
    S, T = meta["image_size"], shape[0] if shape else 0
    A, K = len(meta["action_components"]), len(meta["tasks"])
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise _bad(path, f"frames must be uint8 (T, H, W, 3), got {dtype} {shape}.")
    if shape[1:3] != (S, S):
        raise _bad(path, f"frames are {shape[1]}×{shape[2]} but meta.json says image_size {S}; "
                         f"all episodes of a dataset must share one size "
                         f"(import with --from-frames --resize {S}).")
    if T < 1:
        raise _bad(path, "the episode has no frames.")
    if actions is not None and (actions.dtype != np.int64 or actions.shape != (T, A)):
        raise _bad(path, f"actions must be int64 (T={T}, A={A}) to match meta.json, got "
                         f"{actions.dtype} {actions.shape}.")
    for j, (name, n) in enumerate(meta["action_components"] if actions is not None else []):
        lo, hi = actions[:, j].min(), actions[:, j].max()
        if lo < 0 or hi >= n:
            raise _bad(path, f"action component '{name}' has values in [{lo}, {hi}] "
                             f"but meta.json declares {n} classes (0…{n - 1}).")
    if rewards is not None and (rewards.dtype != np.float32 or rewards.shape != (T, K)):
        raise _bad(path, f"rewards must be float32 (T={T}, n_tasks={K}) to match meta.json, "
                         f"got {rewards.dtype} {rewards.shape}.")
    return {"T": T, "actions": actions, "rewards": rewards}


def load_frames(path: str) -> np.ndarray:
    """Decode the frames of one episode (the expensive part: ≈ 5 ms for 256 frames at 64×64)."""
    try:
        with np.load(path) as z:
            return z["frames"]
    except Exception as e:  # a CRC error shows up only here, when the data is decompressed
        raise _bad(path, f"cannot decode frames, the file is corrupt "
                         f"({type(e).__name__}: {e}).") from None


def mapped_frames(root: str, episode_id: str) -> np.ndarray:
    """The frames of one episode as a read-only memory map of a decoded copy,
    <root>/.decoded/<id>.npy, written on first use (and again when the .npz is newer); the OS
    pages it in and out."""
    src = os.path.join(root, episode_id + ".npz")
    dst = os.path.join(root, ".decoded", episode_id + ".npy")
    if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst[:-4]}.tmp{os.getpid()}.npy"  # write, then rename: readers never see half
        np.save(tmp, load_frames(src))
        os.replace(tmp, dst)
    return np.load(dst, mmap_mode="r")  # (T, H, W, 3) uint8


def _infer_meta(root: str, files: list[str]) -> dict:
    """meta.json for a bring-your-own folder without one: names a0…, task0…; classes = largest
    action + 1; the last 10 % of sorted ids held out (not in paper, docs/deviations.md)."""
    heads = [_read_episode(f) for f in files]  # (frames shape, dtype, actions, rewards) each
    sizes = {tuple(h[0][1:3]) for h in heads}
    n_tasks = {h[3].shape[-1] for h in heads if h[3] is not None}
    maxima = [h[2].max(0) for h in heads if h[2] is not None and len(h[2])]  # (A,) per episode
    widths = {len(m) for m in maxima}
    if len(sizes) != 1 or len(widths) > 1 or len(n_tasks) > 1:
        raise ValueError(f"{root}: episodes disagree (image sizes {sorted(sizes)}, action widths "
                         f"{sorted(widths)}, reward widths {sorted(n_tasks)}); write meta.json "
                         f"yourself or fix the files.")
    # largest action + 1 per component
    classes = [max(2, int(m) + 1) for m in (np.max(maxima, axis=0) if maxima else [])]
    ids = [os.path.basename(f)[:-4] for f in files]
    return {"format_version": 1, "generator": "inferred by data.py",
            "name": os.path.basename(root.rstrip("/")), "image_size": next(iter(sizes))[0],
            "fps": 10, "action_components": [[f"a{j}", c] for j, c in enumerate(classes)],
            "tasks": [f"task{k}" for k in range(next(iter(n_tasks), 0))], "episodes": len(ids),
            "split": split_ids(ids, 0.1), "seed": None,
            # a guess, not a declaration: --check warns until the user confirms it
            "action_classes_inferred": bool(classes)}


def load_meta(root: str) -> dict:
    """Read meta.json; action_components become (name, classes) tuples. A bring-your-own folder
    without one gets it inferred from the episodes and written (_infer_meta)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist. "
                                f"{HOW_TO_MAKE.format(root)}")
    path, files = os.path.join(root, "meta.json"), sorted(glob.glob(os.path.join(root, "*.npz")))
    if not os.path.exists(path):
        if not files:
            raise FileNotFoundError(f"{root}: no .npz episodes and no meta.json. "
                                    f"{HOW_TO_MAKE.format(root)}")
        write_meta(root, _infer_meta(root, files))
        with open(path) as f:
            comps = json.load(f)["action_components"]
        print(f"note: {path} was missing; inferred it from the episodes and wrote it. Action "
              f"classes = largest action seen + 1 ({comps}): if your game has more classes "
              f"than the episodes show, correct them there.")
    with open(path) as f:
        meta = json.load(f)
    missing = {"image_size", "fps", "action_components", "tasks", "split"} - set(meta)
    if missing:
        raise _bad(path, f"missing fields {sorted(missing)}. Delete meta.json to have it "
                         f"inferred, or")
    meta["action_components"] = _components(meta["action_components"], path)
    meta["split"] = {k: [_episode_id(i) for i in meta["split"].get(k, [])]
                     for k in ("train", "heldout")}
    return meta


EXPECTED_COMPONENTS = ('"action_components": [["move", 5], ["use", 2]] (name, number of '
                       'classes; [] for unlabeled video)')


def _components(value, path: str) -> list[tuple[str, int]]:
    """meta.json's action_components as [(name, classes)]. Accepted: [[name, classes], …] (what
    data.py writes), [{"name": …, "classes": …}, …] and {name: classes, …}."""
    if isinstance(value, dict):
        value = list(value.items())
    try:
        pairs = [(c["name"], c["classes"]) if isinstance(c, dict) else tuple(c) for c in value]
        comps = [(str(n), int(c)) for n, c in pairs]
    except (KeyError, TypeError, ValueError):
        comps = []
    if len(comps) != len(value) or any(c < 2 for _, c in comps):
        raise ValueError(f"{path}: action_components {json.dumps(value)[:120]} is not understood; "
                         f"expected {EXPECTED_COMPONENTS}, every component with ≥ 2 classes")
    return comps


def _episode_id(name: str) -> str:
    """An episode id as the split lists it: the file name without .npz (either is accepted)."""
    name = os.path.basename(str(name))
    return name[:-4] if name.endswith(".npz") else name


def _split_ids(root: str, meta: dict, split: str) -> list[str]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if split == "all":
        ids = meta["split"]["train"] + meta["split"]["heldout"]
    else:
        ids = meta["split"][split]
    for path in (os.path.join(root, i + ".npz") for i in ids):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: listed in meta.json but missing; put the file "
                                    f"back or remove '{os.path.basename(path)[:-4]}' from "
                                    f"split in meta.json.")
    return ids


def iter_episodes(root: str, split: str = "train"):
    """Yield every episode of a split whole: {"id", "frames" (T, H, W, 3) uint8, "actions" (T, A)
    int64 or None, "rewards" (T, n_tasks) float32 or None} as numpy arrays (the tokenizer encodes
    them all)."""
    meta = load_meta(root)
    for i in _split_ids(root, meta, split):
        path = os.path.join(root, i + ".npz")
        yield {"id": i, "frames": load_frames(path), **check_episode(path, meta)}


class SequenceDataset:
    """Random windows of `seq_len` frames from one split of a dataset folder, drawn with the
    dataset's own numpy Generator `rng` (seeded by `seed`: the data stream does not depend on
    model initialisation). Episodes are validated up front (headers, labels); frames come from
    memory-mapped decoded copies, `open_episodes` at most."""

    def __init__(self, root: str, split: str = "train", seq_len: int = 16, seed: int = 0,
                 open_episodes: int = 256):
        self.root, self.split, self.seq_len, self.meta = root, split, seq_len, load_meta(root)
        self.image_size, self.tasks = self.meta["image_size"], self.meta["tasks"]
        self.action_components = self.meta["action_components"]
        checked = {i: check_episode(os.path.join(root, i + ".npz"), self.meta)
                   for i in _split_ids(root, self.meta, split)}  # id -> {"T", "actions", "rewards"}
        for i in [i for i, e in checked.items() if e["T"] < seq_len]:
            warnings.warn(f"{root}/{i}.npz: {checked.pop(i)['T']} frames < seq_len {seq_len}; "
                          f"skipped")
        self.ids, self.episodes = list(checked), list(checked.values())
        if not self.ids:
            raise ValueError(f"{root}: split '{split}' has no episode of at least "
                             f"seq_len={seq_len} frames; `python data.py --check {root}` "
                             f"lists what to fix (or lower --seq-len)")
        self.n_frames = sum(e["T"] for e in self.episodes)
        # Uniform sampling over every valid window: episode i owns T_i − seq_len + 1 starts.
        starts = [e["T"] - seq_len + 1 for e in self.episodes]
        self.offsets = np.cumsum([0] + starts)  # (n_episodes + 1,)
        self.events = {}  # task -> its reward events [(episode index, t)], for "relevant" windows
        for i, e in enumerate(self.episodes):
            for t, k in zip(*np.nonzero(e["rewards"] > 0)) if e["rewards"] is not None else []:
                self.events.setdefault(int(k), []).append((i, int(t)))
        self.rng = np.random.default_rng(seed)
        ids = self.ids

        def frames_of(i: int) -> np.ndarray:  # episode index -> memory-mapped (T, H, W, 3)
            return mapped_frames(root, ids[i])
        # Each open map holds a file descriptor, so only the `open_episodes` most recently used
        # stay open.
        self._frames = functools.lru_cache(open_episodes)(frames_of)

    def _window(self, relevant: bool) -> tuple[int, int, int]:
        """(episode index, start, task). Uniform: over every valid window (task −1). Relevant: a
        window holding a reward event and the action that caused it: the task uniformly among the
        tasks with events (so rare rungs are not drowned out), then one of its events, then the
        start among the windows with t−1 and t."""
        if not relevant:
            u = int(self.rng.integers(self.offsets[-1]))  # a window index
            i = int(np.searchsorted(self.offsets, u, side="right")) - 1
            return i, u - int(self.offsets[i]), -1
        k = sorted(self.events)[self.rng.integers(len(self.events))]
        i, t = self.events[k][self.rng.integers(len(self.events[k]))]
        lo = max(0, t - self.seq_len + 1)
        hi = min(self.episodes[i]["T"] - self.seq_len, max(lo, t - 1))
        return i, int(self.rng.integers(lo, hi + 1)), k

    def sample(self, batch_size: int, relevant: float = 0.0) -> dict:
        """A batch of windows, CPU tensors: frames uint8 (B, T, H, W, 3); actions int64 (B, T, A),
        rewards float32 (B, T, n_tasks), zeros where unlabeled, with has_actions / has_rewards
        bool (B,); task int64 (B,) (the event's task, −1 for uniform rows); relevant bool (B,);
        episode (index into .ids), start int64 (B,). relevant: the fraction of rows (the first
        ones) drawn from task-relevant windows; True = all."""
        n_rel, T = int(round(batch_size * float(relevant))), self.seq_len
        if n_rel and not self.events:
            raise ValueError(f"{self.root}: no reward events in split '{self.split}', "
                             f"so no relevant windows")
        rows = [self._window(b < n_rel) for b in range(batch_size)]
        frames = np.stack([self._frames(i)[s:s + T] for i, s, _ in rows])  # (B, T, H, W, 3)
        out = {"frames": torch.from_numpy(frames)}
        for key, width, dtype in [("actions", len(self.action_components), np.int64),
                                  ("rewards", len(self.tasks), np.float32)]:
            labels = np.zeros((batch_size, T, width), dtype)  # (B, T, A) or (B, T, n_tasks)
            for b, (i, s, _) in enumerate(rows):
                if self.episodes[i][key] is not None:
                    labels[b] = self.episodes[i][key][s:s + T]
            out[key] = torch.from_numpy(labels)
            out["has_" + key] = torch.tensor([self.episodes[i][key] is not None
                                              for i, _, _ in rows])

        def column(j: int) -> torch.Tensor:  # (B,) int64: field j of every row's (i, start, task)
            return torch.tensor([r[j] for r in rows], dtype=torch.int64)
        return {**out, "task": column(2), "relevant": torch.arange(batch_size) < n_rel,
                "episode": column(0), "start": column(1)}


# ==== Checking a dataset: the contract, then quick data-quality controls ======================
# `python data.py --check DIR` and every --from-frames import run `check_dataset`: one finding per
# problem, each naming the fix. Errors stop training; warnings are mistakes that train silently.
CHECK_EPISODES = 64  # episodes the quality controls look at (evenly spaced): seconds, not minutes
PROBE_STEPS = 300  # Adam steps of the alignment probe's one net (≈ 5 s on one core)
PROBE_TRANSITIONS = 4096  # transitions the probe sees at most (evenly spaced): bounded memory


def preset_windows() -> dict[str, dict[str, int]]:
    """preset -> {stage flag: frames} of the windows the stages cut from an episode; an episode
    shorter than a window is left out of that stage's training."""
    import agent
    import dynamics
    import imagine
    import tokenizer
    windows = {}
    for preset in ("default", "cpu", "smoke"):
        def value(module, field):  # the preset's value of one Args field
            return module.PRESETS.get(preset, {}).get(field, getattr(module.Args, field))
        windows[preset] = {"tokenizer.py --seq-len": value(tokenizer, "seq_len"),
                           "dynamics.py --seq-len-long": value(dynamics, "seq_len_long"),
                           "agent.py --seq-len": value(agent, "seq_len"),
                           "imagine.py --context": value(imagine, "context")}
    return windows


def _pooled(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S) float32 in [0, 1], average-pooled to at most 32×32
    pixels: the probe needs what moved and where, not the fine detail."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    return torch.nn.functional.adaptive_avg_pool2d(x, 32) if x.shape[-1] > 32 else x


def _probe_input(now: torch.Tensor, after: torch.Tensor, blind: bool) -> torch.Tensor:
    """(B, 3, S, S) frames t and t+1 -> (B, 10, S, S): frame t, frame t+1, their difference and a
    flag plane. blind: frame t+1 replaced by frame t and the flag set, so that one net learns both
    what frame t alone tells about an action and what the pair tells."""
    if blind:
        after = now
    flag = torch.full_like(now[:, :1], float(blind))
    return torch.cat([now, after, after - now, flag], 1)


def alignment_probe(episodes: list[dict], components: list, seed: int = 0) -> dict[int, np.ndarray]:
    """What frame t+1 tells about an action row beyond what frame t tells, for the rows a_{t−1},
    a_t and a_{t+1} of each transition t → t+1: shift (−1, 0, 1) -> one value per held-out
    transition, the cross-entropy of a tiny conv net given frame t only minus that of the same net
    given frames t and t+1 (nats, summed over the action components).

    Why beyond frame t: a game's frame often shows the previous action (where the player faces),
    and a scripted player's next action follows from the next frame, so rows t−1 and t+1 can be
    read off a frame pair too; only the action that leads to frame t+1 shows in frame t+1 and not
    already in frame t. Under the data contract that is row t, so shift 0 must win; ±1 winning
    means the actions are stored one frame off, nothing winning that they do not belong to the
    frames. Held out: every other episode (the last third of a single episode)."""
    pairs, ys, held, frames = [], [], [], []  # pairs: (episode, t) of each transition
    for i, ep in enumerate(episodes):
        T = len(ep["frames"])
        t = np.arange(1, T - 2)  # transitions t → t+1 whose a_{t−1} and a_{t+1} exist
        frames.append(_pooled(ep["frames"]))  # (T, 3, S, S)
        pairs += [(i, int(u)) for u in t]
        ys.append(np.stack([ep["actions"][t + s] for s in (-1, 0, 1)]))  # (3, n, A)
        held.append(np.full(len(t), i % 2 == 1) if len(episodes) > 1
                    else np.arange(len(t)) >= 2 * len(t) // 3)
    if not pairs:
        return {}
    keep = np.unique(np.linspace(0, len(pairs) - 1, min(PROBE_TRANSITIONS, len(pairs))).astype(int))
    y = torch.from_numpy(np.concatenate(ys, 1)[:, keep])  # (3, N, A)
    test = torch.from_numpy(np.concatenate(held)[keep])  # (N,) bool
    pairs = [pairs[j] for j in keep]
    sizes = [n for _, n in components]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(  # strided: ≈ 5 s for the smoke data on one core
        torch.nn.Conv2d(10, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),  # where it happened does not matter
        torch.nn.Linear(32, 3 * sum(sizes)))  # one head per shift: the same features for all
    opt = torch.optim.Adam(net.parameters(), 3e-3)

    def nll(rows: torch.Tensor, blind: bool) -> torch.Tensor:  # (3, len(rows)) per shift and row
        now = torch.stack([frames[pairs[r][0]][pairs[r][1]] for r in rows.tolist()])
        after = torch.stack([frames[pairs[r][0]][pairs[r][1] + 1] for r in rows.tolist()])
        logits = net(_probe_input(now, after, blind)).reshape(len(rows), 3, sum(sizes))
        return torch.stack([sum(torch.nn.functional.cross_entropy(lg, y[k, rows, j],
                                                                  reduction="none")
                                for j, lg in enumerate(logits[:, k].split(sizes, -1)))
                            for k in range(3)])
    train_rows = torch.nonzero(~test).squeeze(1)
    for _ in range(PROBE_STEPS):
        batch = train_rows[torch.randint(len(train_rows), (64,))]
        opt.zero_grad()
        (nll(batch, blind=False).mean() + nll(batch, blind=True).mean()).backward()
        opt.step()
    with torch.no_grad():
        rows = torch.nonzero(test).squeeze(1)
        told = torch.cat([nll(c, blind=True) - nll(c, blind=False) for c in rows.split(512)], 1)
    return {shift: told[k].numpy() for k, shift in enumerate((-1, 0, 1))}


def _beats(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether per-transition values a exceed b on the same transitions by more than 3 standard
    errors of the mean difference (the probe's noise: shuffled actions stay well inside it)."""
    d = a - b
    return len(d) > 1 and d.mean() > 3 * d.std(ddof=1) / np.sqrt(len(d))


def check_dataset(root: str, probe: bool = True) -> list[tuple[str, str]]:
    """Check a dataset folder against the data contract, then measure what a user cannot easily
    see by hand. Returns [(level, message)], level "ok" (a figure), "warn" (trains, but probably
    not as meant) or "error" (the stages refuse it); every problem names its fix."""
    out: list[tuple[str, str]] = []
    try:
        meta = load_meta(root)
    except (OSError, ValueError) as e:
        return [("error", str(e))]
    ids = meta["split"]["train"] + meta["split"]["heldout"]
    for split in ("train", "heldout"):
        if not meta["split"][split]:
            n_ep = len(ids)
            fix = ("import or record at least 2 episodes" if n_ep < 2 else
                   "list some episode ids under split.\"heldout\" in meta.json")
            out.append(("error", f"split '{split}' is empty ({n_ep} episode(s) in all): the "
                                 f"tokenizer trains on 'train' and evaluates on 'heldout'; {fix}."))
    if len(set(ids)) < len(ids):
        out.append(("error", "an episode id is listed twice in meta.json's split (train and "
                             "heldout must not share episodes); list each id once."))
    on_disk = {os.path.basename(f)[:-4] for f in glob.glob(os.path.join(root, "*.npz"))}
    unlisted = sorted(on_disk - set(ids))
    if unlisted:
        out.append(("warn", f"{len(unlisted)} .npz file(s) are in no split and never used "
                            f"(e.g. {unlisted[0]}); add them to split in meta.json."))
    episodes = {}  # id -> {"T", "actions", "rewards"}
    for i in ids:
        path = os.path.join(root, i + ".npz")
        try:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in meta.json but missing; put the file "
                                        f"back or remove '{i}' from split in meta.json.")
            episodes[i] = check_episode(path, meta)
        except (OSError, ValueError) as e:
            out.append(("error", str(e)))
    if not episodes:
        return out
    lengths = np.array([e["T"] for e in episodes.values()])
    S = meta["image_size"]
    out.append(("ok", f"{len(episodes)} episodes ({len(meta['split']['train'])} train, "
                      f"{len(meta['split']['heldout'])} held out), {lengths.sum():,} frames of "
                      f"{S}×{S}, {lengths.min()}–{lengths.max()} frames per episode"))
    if S % 8:
        out.append(("warn", f"image_size {S} is not a multiple of 8, as the tokenizer's patches "
                            f"need; re-import with --resize {max(8, S // 8 * 8)}."))
    for preset, windows in preset_windows().items():
        flag, need = max(windows.items(), key=lambda kv: kv[1])
        short = int((lengths < need).sum())
        if short:
            out.append(("warn", f"{short} of {len(lengths)} episodes have fewer than {need} "
                                f"frames, the longest window of --preset {preset} "
                                f"({flag} {need}): those stages skip them. Record longer "
                                f"episodes or lower that flag."))
    out += _check_labels(meta, episodes)
    out += _check_quality(root, meta, episodes, probe)
    return out


def _check_labels(meta: dict, episodes: dict) -> list[tuple[str, str]]:
    """Action classes declared vs seen; the reward kind the agent stages expect (sparse 0/1)."""
    out = []
    actions = [e["actions"] for e in episodes.values() if e["actions"] is not None]
    rewards = [e["rewards"] for e in episodes.values() if e["rewards"] is not None]
    if not actions:
        out.append(("ok", "unlabeled video (no actions): the tokenizer and the dynamics' "
                          "video pretraining use it; the agent stages need labeled episodes"))
    elif len(actions) < len(episodes):
        out.append(("ok", f"{len(actions)} of {len(episodes)} episodes carry actions"))
    if actions and meta.get("action_classes_inferred"):
        out.append(("warn", f"the action classes {meta['action_components']} were guessed from "
                            f"the largest action seen (meta.json was missing): a class the "
                            f"episodes never show is missing, and a trained checkpoint keeps "
                            f"this action space. Correct the classes in meta.json and delete its "
                            f"\"action_classes_inferred\" entry."))
    if actions:
        seen = np.concatenate(actions)  # (frames, A)
        for j, (name, n) in enumerate(meta["action_components"]):
            used = len(np.unique(seen[:, j]))
            if used < n:
                out.append(("warn", f"action component '{name}' declares {n} classes but only "
                                    f"{used} occur (max {seen[:, j].max()}); fine if the players "
                                    f"never used the rest, else fix 'classes' in meta.json."))
    if rewards:
        r = np.concatenate(rewards)  # (frames, n_tasks)
        if (r < 0).any() or not np.isin(r, (0, 1)).all():
            out.append(("warn", f"rewards are shaped (values in [{r.min():g}, {r.max():g}], "
                                f"not only 0 and 1); the agent stages expect one sparse 0/1 "
                                f"reward per task, paid on the frame a milestone is reached. "
                                f"Store (reward > 0) per task, or keep them knowingly."))
        elif not r.any():
            out.append(("warn", "every reward is 0: the reward head and the agent's task "
                                "success have nothing to learn from."))
    return out


def _check_quality(root: str, meta: dict, episodes: dict, probe: bool) -> list[tuple[str, str]]:
    """How much consecutive frames change, the copy-last-frame baseline, suspicious jumps (frames
    out of order, cuts) and, for labeled data, the action alignment probe."""
    out, ids = [], list(episodes)
    picked = [ids[int(k)] for k in np.linspace(0, len(ids) - 1, min(CHECK_EPISODES, len(ids)))]
    eps = [{"id": i, "frames": load_frames(os.path.join(root, i + ".npz")), **episodes[i]}
           for i in dict.fromkeys(picked)]
    change, mse = [], []  # per transition: mean |Δ| in 0…255, mean squared error of copying
    for ep in eps:
        d = np.diff(ep["frames"].astype(np.float32), axis=0)  # (T − 1, H, W, 3)
        change.append(np.abs(d).mean((1, 2, 3)))
        mse.append((d ** 2).mean((1, 2, 3)))
    change, mse = np.concatenate(change), np.concatenate(mse)
    if not len(change):
        return [("warn", "every episode has 1 frame: nothing to predict.")]
    psnr = 10 * np.log10(255 ** 2 / max(mse.mean(), 1e-10))
    still = float((change == 0).mean())
    out.append(("ok", f"consecutive frames: mean |change| {change.mean():.2f}/255, "
                      f"{still:.0%} exact repeats; copy-last-frame baseline PSNR {psnr:.1f} dB "
                      f"(the dynamics must beat this)"))
    if still > 0.5:
        out.append(("warn", f"{still:.0%} of consecutive frames are identical: duplicated frames "
                            f"(extract at the video's real frame rate, e.g. ffmpeg -vf fps=10)."))
    typical = np.median(change)
    jumps = int((change > 8 * max(typical, 0.5)).sum())
    if jumps > max(1, 0.02 * len(change)):
        out.append(("warn", f"{jumps} of {len(change)} frame-to-frame changes are over 8× the "
                            f"median: frames out of order or scene cuts inside episodes. Check "
                            f"the frame order; split episodes at cuts."))
    # Frame files sorted as text (frame_1, frame_10, frame_11, …, frame_2) leave a tell: put back
    # in numeric order, the frames change less from one to the next.
    stored = text = 0.0
    for ep in (e for e in eps if len(e["frames"]) > 10):
        as_text = sorted(range(len(ep["frames"])), key=str)  # position i holds frame as_text[i]
        x = ep["frames"].astype(np.float32)
        stored += np.abs(np.diff(x, axis=0)).mean()
        text += np.abs(np.diff(x[np.argsort(as_text)], axis=0)).mean()
    if stored > 0 and text < 0.8 * stored:
        out.append(("warn", f"the frames look sorted as text (frame_10 before frame_2): put in "
                            f"numeric order they change {1 - text / stored:.0%} less from one to "
                            f"the next. Re-import with this data.py (it sorts numbers by value) "
                            f"or name frames with zero padding (ffmpeg: %06d.png)."))
    labeled = [e for e in eps if e["actions"] is not None]
    if probe and labeled and meta["action_components"]:
        told = alignment_probe(labeled, meta["action_components"])
        if told:
            text = ", ".join(f"a_(t{s:+d}) {v.mean():.3f}".replace("t+0", "t")
                             for s, v in told.items())
            out.append(("ok", f"action probe, nats that frame t+1 tells about each action row "
                              f"beyond frame t (held-out episodes): {text} (row t must win)"))
            best = max((-1, 1), key=lambda s: told[s].mean())
            if _beats(told[best], told[0]):
                fix = ("row t holds the action that led TO frame t: move every row one row "
                       "earlier, actions = np.concatenate([actions[1:], actions[-1:]])"
                       if best == 1 else
                       "row t holds the action taken at frame t+1: move every row one row "
                       "later, actions = np.concatenate([actions[:1], actions[:-1]])")
                out.append(("warn", f"the actions are stored one frame off: a_(t{best:+d}), not "
                                    f"a_t, shows in frame t+1. {fix}, in every episode (data "
                                    f"contract: row t = the action taken AT frame t)."))
            elif not _beats(told[0], 0 * told[0]):
                out.append(("warn", "the actions do not show in the next frame at any alignment "
                                    "(the probe's figures are noise): check that each "
                                    "episode's actions belong to its frames."))
    return out


def print_check(root: str, findings: list[tuple[str, str]]) -> int:
    """Print the findings; returns the number of errors."""
    marks = {"ok": "  ok  ", "warn": "  WARN", "error": "  ERROR"}
    print(f"checking {root}")
    for level, text in findings:  # wrapped to 100 columns, the continuation indented
        print(textwrap.fill(text, 100, initial_indent=marks[level] + " ",
                            subsequent_indent=" " * 8))
    errors = sum(level == "error" for level, _ in findings)
    warns = sum(level == "warn" for level, _ in findings)
    print(f"{errors} error(s), {warns} warning(s)"
          + ("" if errors else "; the stages can train on it"))
    return errors


def ensure_dataset(name_or_path: str) -> str:
    """The dataset folder for a stage's --data flag. A missing built-in dataset (diamond64,
    diamond32, smoke; as a name or data/<name>) is generated on the spot; a missing other path is
    an error."""
    bare_name = os.sep not in name_or_path and not os.path.exists(name_or_path)
    path = os.path.join("data", name_or_path) if bare_name else name_or_path
    name = os.path.basename(os.path.normpath(path))
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path) or glob.glob(os.path.join(path, "*.npz")):
        if name in BUILTIN and os.path.exists(meta_path):
            want = PRESETS.get(BUILTIN[name], {}).get("episodes", Args.episodes)
            with open(meta_path) as f:
                meta = json.load(f)
            have = meta.get("episodes")
            if have != want:  # e.g. a folder written before the preset grew
                print(f"!! {path} holds {have} episodes but the built-in '{name}' preset now "
                      f"writes {want}: figures will differ from the README's. Delete {path} to "
                      f"regenerate it.", flush=True)
            drawn = meta.get("render_version", 1)  # datasets before the version was recorded: 1
            if drawn != environment.RENDER_VERSION:
                print(f"!! {path} was drawn by older sprites (render version {drawn}, now "
                      f"{environment.RENDER_VERSION}): the evaluation in the real environment "
                      f"will not look like the training frames. Delete {path} to regenerate it.",
                      flush=True)
        return path
    if name not in BUILTIN:
        raise FileNotFoundError(f"dataset {path} does not exist. Built-in datasets: "
                                f"{sorted(BUILTIN)} (`python data.py`); your own frames: "
                                f"`python data.py --from-frames DIR --out {path}`.")
    cmd = "python data.py" + ("" if BUILTIN[name] == "default" else f" --preset {BUILTIN[name]}")
    print(f"dataset {path} not found: generating the built-in '{name}' dataset now (`{cmd}`)",
          flush=True)
    generate(parse_args(Args, PRESETS, ["--preset", BUILTIN[name], "--out", path, "--no-assets"]))
    return path


def simulate_future(root: str, episode_id: str, t: int, plans: list, rng_seed=None,
                    meta: dict | None = None):
    """The true environment as a world model: rebuild the world of a generated episode, replay its
    recorded actions to frame t once, then play each plan (H, A) of `plans` from frame t on (row h
    is taken at frame t + h) and return, per plan, the H frames that follow, (H, H_px, W_px, 3)
    uint8. rng_seed draws afresh what nobody controls (the creature, regrowing trees, where a
    scared creature lands), the same draws for every plan; None keeps the episode's own draws.
    Returns None when the episode cannot be replayed: not a dataset written by `generate` (ids
    ep000000, …), or the replay does not reproduce frame t (other rules)."""
    meta = meta or load_meta(root)
    generated_id = episode_id[:2] == "ep" and episode_id[2:].isdigit()
    if meta.get("generator") != GENERATOR or not generated_id:
        return None
    recorded = check_episode(os.path.join(root, episode_id + ".npz"), meta)["actions"]  # (T_ep, A)
    env = environment.Env(meta["image_size"], meta.get("episode_len", 256))
    frame = env.reset(environment.episode_seed(meta["seed"], "data", int(episode_id[2:])))
    for a in recorded[:t]:
        frame, *_ = env.step(a)
    if not np.array_equal(frame, mapped_frames(root, episode_id)[t]):
        return None  # written by another version of the rules: no replay
    futures = []
    for plan in plans:
        branch = copy.deepcopy(env)  # every plan starts from the same state at frame t
        if rng_seed is not None:
            branch.rng = np.random.default_rng(rng_seed)
        futures.append(np.stack([branch.step(a)[0] for a in plan]))  # (H, H_px, W_px, 3)
    return futures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, PRESETS, argv)
    print("args:", json.dumps(asdict(args)))
    seed_everything(args.seed)
    if args.bench:  # the environment's own command line, environment.py --bench
        environment.run_bench(args.image_size, args.episode_len, args.seed)
    elif args.eval_random:  # environment.py --eval-random
        environment.run_eval_random(args.eval_episodes, args.seed, args.image_size,
                                    args.episode_len)
    elif args.check:
        if print_check(args.check, check_dataset(args.check, args.probe)):
            raise SystemExit(1)
    elif args.from_frames:
        if not args.out:
            raise SystemExit("--from-frames needs --out data/NAME (the folder to write the "
                             "episodes to)")
        import_frames(args.from_frames, args.out, args.resize, args.fps, args.heldout)
    else:
        generate(args)


if __name__ == "__main__":
    main()
