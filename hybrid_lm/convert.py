"""`hybrid-lm convert SRC DST`: Phi-4-mini-flash-reasoning's released format <-> ours.

A checkpoint in the release's format (config.json with model_type "phi4flash", sharded
safetensors with an index) becomes our native sambay-da checkpoint; one of ours built as the
release (sambay-da at the phi4-mini-flash preset, or any size with the release's fixed choices)
becomes the release's format, so a fine-tuned or distilled model can be published where others
read it. The two formats share the module tree, so the tensors keep their names and are copied
bit for bit, dtype included, into the same files as the source's (or re-sharded on request);
only config.json is rewritten (archs/phi4flash.py): a round trip gives back identical files. Other files
(tokenizer, generation config, the release's code) are copied; trainer state is not. The bos, eos
and pad token ids are written only where the source's config.json has them inside its vocabulary.

Every tensor is checked against the target model's names and shapes before anything is
written. The output is assembled in a temporary folder beside DST and renamed at the end: a
failed conversion leaves nothing behind, and an existing DST is replaced only with --overwrite
(swapped out after the new one is whole).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm
from transformers.utils.hub import convert_file_size_to_int

from hybrid_lm.archs import expected_shapes
from hybrid_lm.archs.config import SambaYConfig
from hybrid_lm.archs.model import open_tensors
from hybrid_lm.archs.phi4flash import TOKEN_IDS, Phi4FlashConfig, native_config, release_dict

INDEX = "model.safetensors.index.json"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors$")
# rewritten, or training state and logs (a training run's folder is a valid source: its top-level
# links lead to the latest checkpoint, copied as files)
NOT_COPIED = {"config.json", INDEX, "trainer_state.pt", "checkpoints", "metrics.jsonl", "loss.png"}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' (transformers' max_shard_size syntax) or a byte count -> bytes."""
    try:
        size = int(text) if str(text).isdigit() else convert_file_size_to_int(str(text))
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or a byte count, got {text!r}")
    return size


def tensor_files(src: Path) -> dict[str, Path]:
    """Each tensor name of the checkpoint at `src` -> the safetensors file holding it."""
    if (src / INDEX).is_file():
        try:
            weight_map = json.loads((src / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{src / INDEX}: expected JSON with a 'weight_map', could not read it ({e})") from e
        files = {name: src / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in {INDEX} but missing")
        return files
    if (src / "model.safetensors").is_file():
        with open_tensors(src / "model.safetensors") as f:
            return dict.fromkeys(f.keys(), src / "model.safetensors")
    raise FileNotFoundError(f"{src}: expected model.safetensors or {INDEX}, found neither")


def check_tensors(files: dict[str, Path], config: SambaYConfig) -> dict[str, int]:
    """Raise ValueError naming every missing, unexpected or wrong-shaped tensor; returns each
    tensor's size in bytes, in the model's order (embeddings, layers in order, final norm)."""
    shapes = expected_shapes(config)
    found: dict[str, tuple[list[int], int]] = {}
    for file in sorted(set(files.values())):
        with open_tensors(file) as f:
            for name in f.keys():
                if files.get(name) == file:
                    t = f.get_slice(name)
                    found[name] = (list(t.get_shape()), _element_size(t.get_dtype()))
    problems = [f"missing: {n}" for n in shapes if n not in found]
    problems += [f"unexpected: {n}" for n in files if n not in shapes]
    problems += [f"{n}: expected shape {list(s)}, found {found[n][0]}" for n, s in shapes.items()
                 if n in found and found[n][0] != list(s)]
    problems += [f"{n}: listed in the index, not in {files[n].name}" for n in files if n in shapes and n not in found]
    if problems:
        raise ValueError(f"checkpoint tensors do not match a {config.model_type} model of this config:\n  "
                         + "\n  ".join(problems))
    return {n: found[n][1] * math.prod(found[n][0]) for n in shapes}


_ELEMENT_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _element_size(dtype: str) -> int:
    if dtype not in _ELEMENT_BYTES:
        raise ValueError(f"checkpoint: a tensor of safetensors dtype {dtype}; expected one of {sorted(_ELEMENT_BYTES)}")
    return _ELEMENT_BYTES[dtype]


def source_shards(files: dict[str, Path], order: list[str]) -> list[tuple[str, list[str]]]:
    """The source's own layout: (file name, its tensor names in model order) per file."""
    by_file: dict[str, list[str]] = {}
    for name in order:
        by_file.setdefault(files[name].name, []).append(name)
    return sorted(by_file.items())


def sized_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    """Consecutive tensors (model order) in shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own), named model-0000i-of-0000n.safetensors, or model.safetensors alone."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    n = len(shards)
    if n == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", names) for i, names in enumerate(shards)]


def write_tensors(dst: Path, files: dict[str, Path], shards: list[tuple[str, list[str]]], sizes: dict[str, int],
                  index: bool) -> None:
    """Copy each shard's tensors from their source files into dst/<shard file>; with `index`,
    also write model.safetensors.index.json."""
    progress = tqdm(total=len(sizes), desc="tensors", unit="tensor")
    for shard_name, names in shards:
        tensors = {}
        for name in names:
            with open_tensors(files[name]) as f:
                tensors[name] = f.get_tensor(name)
            progress.update()
        save_file(tensors, dst / shard_name, metadata={"format": "pt"})
    progress.close()
    if index:
        weight_map = {name: shard_name for shard_name, names in shards for name in names}
        (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                                            indent=2) + "\n")


def convert(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: int | None = None,
            overwrite: bool = False) -> str:
    """Convert the checkpoint at `src` (release format or ours) into the other format at `dst`
    (which must not exist, or be an empty folder, or with `overwrite` a checkpoint folder to
    replace). The tensors keep the source's files (shard names, which tensor in which, the
    index), unless max_shard_size (bytes) asks for new shards. Returns the format written:
    "phi4flash" or "hybrid_sambay"."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: expected a checkpoint folder with config.json")
    replace = dst.exists() and (not dst.is_dir() or any(dst.iterdir()))
    if replace and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not an empty folder; pass --overwrite to replace it, or choose "
                              "a new output path")
    if replace and not (dst / "config.json").is_file():
        raise FileExistsError(f"{dst}: not a checkpoint folder (no config.json); --overwrite only replaces "
                              "checkpoints: choose a new output path")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output must differ from the source")
    try:
        source = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{src / 'config.json'}: not valid JSON ({e})") from e
    model_type = source.get("model_type")
    if model_type == Phi4FlashConfig.model_type:
        target = native_config(Phi4FlashConfig(**source))
    elif model_type == SambaYConfig.model_type:
        target = Phi4FlashConfig(**release_dict(SambaYConfig.from_pretrained(src)))
    else:
        raise ValueError(f"{src / 'config.json'}: expected model_type 'phi4flash' (the release) or "
                         f"'hybrid_sambay' (ours, sambay-da), got {model_type!r}")
    keep_token_ids(target, source, src / "config.json")
    target.validate_arch()
    files = tensor_files(src)
    sizes = check_tensors(files, target)

    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if max_shard_size is None:
            write_tensors(tmp, files, source_shards(files, list(sizes)), sizes, (src / INDEX).is_file())
        else:
            shards = sized_shards(sizes, max_shard_size)
            write_tensors(tmp, files, shards, sizes, len(shards) > 1)
        if isinstance(target, Phi4FlashConfig):
            (tmp / "config.json").write_text(json.dumps(release_dict(target), indent=2, sort_keys=True) + "\n")
        else:
            target.save_pretrained(tmp)
        weight_files = {file.name for file in files.values()}
        for item in src.iterdir():
            if item.name in NOT_COPIED or item.name in weight_files or WEIGHT_FILE.fullmatch(item.name):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        if dst.exists():
            dst.rename(old)  # kept until the new folder is in place
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target.model_type


def keep_token_ids(target: SambaYConfig, source: dict, path: Path) -> None:
    """Give `target` the bos/eos/pad token ids of the `source` config.json (read from `path`) that
    lie in the vocabulary, None for the others. Both config classes can add ids of their own: the
    phi4-mini-flash preset's (the release's 199999), outside a smaller model's vocabulary."""
    for name in TOKEN_IDS:
        value = source.get(name)
        ids = value if isinstance(value, list) else [value]  # eos_token_id may list several
        inside = all(isinstance(i, int) and 0 <= i < target.vocab_size for i in ids)
        if value is not None and not inside:
            warnings.warn(f"{path}: {name}={value} is not a token id of the vocabulary (vocab_size "
                          f"{target.vocab_size}); not written")
        setattr(target, name, value if inside else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint folder: the release's format (phi4flash) or ours (sambay-da)")
    parser.add_argument("dst", help="output folder (must not exist yet, unless --overwrite); gets the other format")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it holds a checkpoint")
    parser.add_argument("--max-shard-size", type=parse_size, default=None,
                        help="re-shard into files of at most this size, e.g. 5GB or 500MB (default: keep the "
                             "source's files, so a round trip gives back the same files)")


def run(args: argparse.Namespace) -> int:
    written = convert(args.src, args.dst, args.max_shard_size, args.overwrite)
    print(f"wrote {args.dst} ({'the released Phi-4-mini-flash format' if written == 'phi4flash' else 'hybrid-lm sambay-da'})")
    return 0
