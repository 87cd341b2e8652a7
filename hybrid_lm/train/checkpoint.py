"""Run folders and checkpoints that a kill cannot tear.

A training run's folder (--out) looks like this:

    OUT/checkpoints/step-000120/   one whole checkpoint: weights, config.json, tokenizer files and
                                   trainer_state.pt (optimizer, data position, RNG, step, and the
                                   SHA-256 of the weight files it belongs to)
    OUT/checkpoints/latest         a symlink to the newest whole checkpoint
    OUT/config.json, OUT/*.safetensors, OUT/tokenizer.json, ...
                                   symlinks through checkpoints/latest, so that
                                   AutoModelForCausalLM.from_pretrained(OUT) and vLLM load it
    OUT/metrics.jsonl, OUT/loss.png

Why a folder per checkpoint: a checkpoint is several files, and a kill between two in-place
writes pairs new weights with an old optimizer. `save` writes every file into
`checkpoints/step-N.tmp/`, fsyncs them and the folder, renames the folder to `step-N`, then
points `latest` at it by renaming a fresh symlink over the old one. Renames are atomic on POSIX,
so a kill at any instant leaves `latest` on the previous checkpoint or on the new one, each
whole. The next start removes what a kill left (`*.tmp`, checkpoints newer than `latest`).
Resume checks that the weights are the ones the trainer state was saved with.

A new run never replaces an existing one unless asked: `claim_output` refuses a non-empty
folder, naming `--resume` and `--overwrite`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"step-(\d+)$")
# Files a hybrid-lm command writes at the top of its output folder; --overwrite only deletes a
# folder holding at least one of them (never a home folder given by mistake).
RUN_MARKERS = ("config.json", CHECKPOINTS, "metrics.jsonl", STATE_FILE)
# Tests widen the save window with HYBRID_LM_SAVE_PAUSE=seconds: each point prints a line and
# pauses, so a test can kill the process at exactly that point.
SAVE_PAUSE_ENV = "HYBRID_LM_SAVE_PAUSE"


def claim_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a run may write into `out`: a new run needs it missing or empty, unless
    `overwrite`, which deletes the previous run there first. A resumed run takes it as it is."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one (continue the run in --out, or replace it)")
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"--out {out}: already holds files ({shown}); pass --resume to continue that run, "
                              "--overwrite to replace it, or choose another folder")
    if not any(name in entries for name in RUN_MARKERS):
        raise FileExistsError(f"--out {out}: not a hybrid-lm run folder (none of {', '.join(RUN_MARKERS)}); "
                              "--overwrite only replaces runs: choose an empty or new folder")
    for path in out.iterdir():
        _remove(path)


def step_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def latest(out: Path) -> Path:
    """The newest whole checkpoint folder of the run in `out`; FileNotFoundError naming what is
    missing when there is none."""
    link = out / CHECKPOINTS / LATEST
    if not out.is_dir():
        raise FileNotFoundError(f"--resume: {out} does not exist")
    if not has_checkpoint(out):
        legacy = " (it holds a trainer_state.pt from an older layout: retrain)" if (out / STATE_FILE).exists() else ""
        raise FileNotFoundError(f"--resume: no checkpoint in {out}: {link} is missing{legacy}")
    return link.resolve()


def has_checkpoint(out: Path) -> bool:
    """Whether `out` holds a run with at least one whole checkpoint."""
    link = out / CHECKPOINTS / LATEST
    return link.is_symlink() and link.resolve().is_dir()


def clean(out: Path) -> None:
    """Remove what a kill during a save can leave: temporary folders and links, and whole
    checkpoints that `latest` never pointed at (a kill between the two renames)."""
    for path in out.glob("*.tmp"):  # e.g. metrics.jsonl.tmp
        if path.is_file():
            path.unlink()
    root = out / CHECKPOINTS
    if not root.is_dir():
        return
    current = _step(latest(out)) if has_checkpoint(out) else -1
    for path in root.iterdir():
        if path.name.endswith(".tmp"):
            _remove(path)
        elif STEP_DIR.match(path.name) and _step(path) > current:
            shutil.rmtree(path)


def save(out: Path, step: int, write_files: Callable[[Path], None], state: dict, keep: int) -> Path:
    """Write checkpoint `step` whole, then make it the latest; keep the newest `keep` checkpoints.

    write_files(folder) writes the model's files (weights, config, tokenizer) into `folder`;
    `state` (the trainer state) is stored with the SHA-256 of the weight files beside them."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_point("folder made")
    write_files(tmp)
    _save_point("weights written")
    state = {**state, "step": step, "weights_sha256": weight_hashes(tmp)}
    torch.save(state, tmp / STATE_FILE)
    _save_point("state written")
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():  # a checkpoint of this step that `latest` never pointed at (see clean)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    _save_point("folder renamed")
    pointer = root / (LATEST + ".tmp")
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(final.name)
    os.replace(pointer, root / LATEST)  # the switch: one atomic rename
    _fsync(root)
    _save_point("latest switched")
    link_top_level(out)
    _save_point("links made")
    _prune(root, keep)
    return final


def link_top_level(out: Path) -> None:
    """Symlink every file of the latest checkpoint (but the trainer state) into `out`, through
    `checkpoints/latest`, so the links follow each switch without being rewritten."""
    for path in (out / CHECKPOINTS / LATEST).iterdir():
        link = out / path.name
        if path.name == STATE_FILE or link.is_symlink():
            continue
        if link.exists():
            raise FileExistsError(f"{link}: a file is in the way of the link to the latest checkpoint")
        link.symlink_to(Path(CHECKPOINTS, LATEST, path.name))


def load_state(folder: Path, arch: str) -> dict:
    """The trainer state of checkpoint `folder`, refused with a clear error when missing, corrupt,
    made for another architecture, or not saved with the weights beside it."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {folder} (not a hybrid-lm training checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or not a torch file
        raise ValueError(f"--resume: {path} is corrupt or not a trainer state: {e}") from e
    if state.get("arch") != arch:
        raise ValueError(f"--resume: {path} was written for arch {state.get('arch')!r}, not {arch!r}")
    match = STEP_DIR.match(folder.name)
    if match and int(match.group(1)) != state.get("step"):
        raise ValueError(f"--resume: {path} is the state of step {state.get('step')}, not of {folder.name}")
    if state.get("weights_sha256") != weight_hashes(folder):
        raise ValueError(f"--resume: the weights in {folder} are not the ones {STATE_FILE} was saved with "
                         "(the checkpoint was modified); refusing to continue from a mismatched pair")
    return state


def weight_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight file in `folder`, by file name."""
    hashes = {}
    for path in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        hashes[path.name] = digest.hexdigest()
    return hashes


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and not p.is_symlink()), key=_step)
    current = (root / LATEST).resolve()
    for path in steps[:-keep]:
        if path != current:
            shutil.rmtree(path)


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points at) or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_point(name: str) -> None:
    pause = os.environ.get(SAVE_PAUSE_ENV)
    if pause:
        print(f"save point: {name}", file=sys.stderr, flush=True)
        time.sleep(float(pause))
