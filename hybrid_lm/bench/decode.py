"""Decode benchmark: `hybrid-lm bench decode`, or `python -m hybrid_lm.bench.decode`.

Generated tokens per second and cache bytes versus generation length for each architecture at one
preset (the same size for all), at each batch size. One row per architecture and batch size:
a fresh model (seeded init), a deterministic random prompt prefilled into the model's own
HybridCache, then a manual decode loop that feeds each step's argmax token back, one token per
`model(tokens, past_key_values=cache, logits_to_keep=1)` call, under torch.inference_mode in eval
mode (bf16 on a GPU, fp32 on a CPU). At checkpoints (1/8, 1/4, 1/2, 3/4 and all of the generation)
the row records the instantaneous throughput (batch * steps / time over the last `window_steps`
steps before the checkpoint), the cumulative throughput since the prefill, and the cache's bytes
(HybridCache.nbytes()). A randomly initialised model's argmax text is meaningless, but the work
per step does not depend on the tokens.

Default sweeps (each value overridable; --quick picks the test sweep on any device):

  GPU    preset phi4-mini-flash (3.8B: the size of the SambaY paper's claim,
         https://arxiv.org/abs/2507.06607), prompt 2048, up to 32768 generated, batch 1 and 64,
         bf16. Eager decoding at that size takes minutes per row, so a full sweep takes well over 10
         minutes: pass --gen-len to fit a shorter slot.
  CPU    preset tiny, prompt 128, up to 512 generated, batch 1 and 8, fp32: a smoke run of the
         whole path in seconds; tiny models are bound by Python overhead, not by cache reads. On a
         busy machine torch's CPU threads wait on each other and step times swing tenfold (the meta
         records the load average): OMP_NUM_THREADS=1 steadies them.
  quick  preset tiny, prompt 32, up to 64 generated, batch 1 and 2.

Timing: on a GPU, CUDA events recorded between decode steps and read (one synchronize) only at
checkpoints, so the host runs ahead as it would in serving; on a CPU, perf_counter. Before each row
a short warm-up at the row's batch size compiles the kernels and measures how the cache grows; on a
GPU a row whose estimated peak memory exceeds MEM_SHARE of the free memory is skipped with the
estimate as its reason (an out-of-memory error all the same becomes that row's error).

On a GPU each decode step is one CUDA-graph replay over a static cache; on a CPU it is an eager
call over the growing cache (DECODE_STEP, also in the JSON's meta).

With --engine vllm the rows come from vLLM engines (compiled, as vLLM serves; --eager skips the
compilation), and each arch also gets a prefill point (--prefill-len, default 4096, quick 256:
one prompt of that many fresh tokens, 16 generated). SambaY runs it with vLLM's fast prefill on
and off, and the JSON records the speed-up (hybrid_lm.bench.vllm_engine).

Output in --out: decode-<device>.jsonl (a meta line, then each row as it is measured, so a run cut
off by a time limit still leaves results), decode-<device>.json (meta, the SambaY / Transformer
throughput ratios, all rows) and decode-<device>.png (tokens/s and cache bytes versus generated
length, per batch size). The table and the ratios are printed last. An architecture that fails to
build or run (a bad config, an error in its code, out of memory) becomes an error row and the sweep
goes on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Union

import torch

import hybrid_lm
from hybrid_lm.cli import non_negative_int, positive_int

from . import vllm_engine
from .common import (add_arch_arguments, chosen_archs, default_device, free_memory, jsonl_writer, model_dtype,
                     progress, pyplot, report_failure, results_stem, run_meta, save_figure, vllm_version,
                     write_json)


class Sweep(NamedTuple):
    preset: str
    prompt_len: int
    gen_len: int
    batch_sizes: tuple


SWEEPS = {"gpu": Sweep("phi4-mini-flash", 2048, 32768, (1, 64)),
          "cpu": Sweep("tiny", 128, 512, (1, 8)),
          "quick": Sweep("tiny", 32, 64, (1, 2))}
DEFAULT_ARCHS = ("transformer", "samba", "sambay", "lrt")
PREFILL_LEN = {"full": 4096, "quick": 256}  # vLLM's prefill point: prompt tokens (16 generated)
CHECKPOINTS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)  # fractions of --gen-len
WINDOW_STEPS = 64  # steps timed for the instantaneous throughput (fewer if the first checkpoint is earlier)
PROBE_STEPS = 8  # decode steps of the warm-up, over which the cache's growth per token is measured
MEM_SHARE = 0.9  # a GPU row runs when its estimated peak fits in this share of the free memory
SEED = 0
PAPER = "paper: SambaY up to 10x a Transformer's decode throughput at 3.8B, 2K prompt + 32K generated, in vLLM"
DECODE_STEP = {
    "cuda": "CUDA graph: each decode step (model + argmax, feeding the next token in place) is one graph "
            "replay over a static cache (HybridCache with max_len: buffers allocated once, written at slots "
            "held on the device); prefill and two warm-up steps run eagerly",
    "cpu": "eager: one model(...) call per token over the growing cache (no CUDA graphs on a CPU)",
}
# every row's fields, in order. A skipped or failed row has no measurements (None). peak_bytes: the
# most allocated on the GPU during the row, weights included (None on a CPU). status: ok, skipped, error.
FIELDS = ("arch", "preset", "batch", "prompt_len", "params", "status", "generated", "tokens_per_s", "cum_tokens_per_s",
          "step_ms", "window_steps", "cache_bytes", "peak_bytes", "prefill_s", "error")


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

class Clock:
    """Timestamps on the device's timeline: CUDA events on a GPU (nothing waits until one is read),
    perf_counter on a CPU (where every op has finished when it returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Union[float, torch.cuda.Event]:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def random_prompt(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The same tokens for every architecture and every run: a seeded CPU generator."""
    generator = torch.Generator().manual_seed(SEED + batch)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def next_token(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed `tokens` [B, T] after what the cache holds; the argmax of the last position, [B, 1]."""
    return model(tokens, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)


def warm_up(model, batch: int, prompt_len: int, total_len: int, device: torch.device) -> float:
    """Run a short prefill and PROBE_STEPS decode steps at this batch size (kernel compiles, cuBLAS
    plans) and return a rough, conservative estimate of the row's peak bytes beyond the weights.
    The probe's prompt passes the sliding window, so windowed layers are full and the cache grows
    linearly from there. The growing part counts twice: torch.cat allocates a layer's grown K,V
    while the old ones are alive, and in SambaY one layer holds nearly all of the growth. The
    prefill's activations scale with the prompt."""
    n = (model.config.sliding_window or 0) + 16
    cache = model.new_cache(batch)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    tokens = next_token(model, random_prompt(batch, n, model.config.vocab_size, device), cache)
    # activations (and this cache) scale with the prompt: counted again for the real one
    prefill = (torch.cuda.max_memory_allocated(device) - base) * prompt_len / n if on_gpu else 0.0
    filled = cache.nbytes()
    for _ in range(PROBE_STEPS):
        tokens = next_token(model, tokens, cache)
    per_token = (cache.nbytes() - filled) / PROBE_STEPS
    if on_gpu:
        torch.cuda.synchronize(device)
    return filled + 2 * per_token * (total_len - n) + prefill


def checkpoints(gen_len: int) -> list[int]:
    return sorted({max(1, round(f * gen_len)) for f in CHECKPOINTS})


def graph_step(model, tokens: torch.Tensor, cache) -> Callable[[], torch.Tensor]:
    """Capture one decode step in a CUDA graph: the model reads the token buffer, and the argmax is
    written back into it, so replays chain on the device with no host work. Two eager warm-up steps
    (real decode steps) run first on a side stream, as torch.cuda.graph asks."""
    buffer = tokens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            buffer.copy_(next_token(model, buffer, cache))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        buffer.copy_(next_token(model, buffer, cache))
    cache.seen -= 1  # capture records the step without running it; the host counter ran ahead

    def step() -> torch.Tensor:
        graph.replay()
        cache.seen += 1
        return buffer
    return step


def decode(model, prompt: torch.Tensor, gen_len: int, device: torch.device) -> Iterator[dict]:
    """Prefill `prompt` into a fresh cache, then decode gen_len steps, each feeding the last argmax
    token; yield the measurements at every checkpoint (one host sync each on a GPU). On a GPU the
    cache is static and each step a CUDA-graph replay (its two warm-up steps count as generated)."""
    batch = prompt.shape[0]
    stops = checkpoints(gen_len)
    window = min(WINDOW_STEPS, stops[0])
    marked = {0} | set(stops) | {s - window for s in stops}
    clock = Clock(device)
    graphs = device.type == "cuda"
    cache = model.new_cache(batch, max_len=prompt.shape[1] + gen_len + 1) if graphs else model.new_cache(batch)
    start = clock.mark()
    tokens = next_token(model, prompt, cache)
    marks = {0: clock.mark()}  # step -> timestamp after it; step 0 is the prefill
    first = 1
    if graphs:
        step_fn, first = graph_step(model, tokens, cache), 3
        for s in (1, 2):
            marks[s] = marks[0]  # the warm-up steps are not timed on their own
    else:
        def step_fn() -> torch.Tensor:
            nonlocal tokens
            tokens = next_token(model, tokens, cache)
            return tokens
    for step in range(first, gen_len + 1):
        step_fn()
        if step in marked:
            marks[step] = clock.mark()
        if step in stops:
            span = clock.seconds(marks[step - window], marks[step])
            yield {"generated": step, "tokens_per_s": batch * window / span,
                   "cum_tokens_per_s": batch * step / clock.seconds(marks[0], marks[step]),
                   "step_ms": span / window * 1e3, "cache_bytes": cache.nbytes(),
                   "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                   "prefill_s": clock.seconds(start, marks[0]), "window_steps": window}


def build_model(arch: str, preset: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(SEED)
    with torch.device(device):  # initialise on the device: a 3.8B model's random init on the host is slow
        model = hybrid_lm.build(hybrid_lm.config(arch, preset))
    return model.to(dtype).eval()


def bench_arch(arch: str, sweep: Sweep, device: torch.device, dtype: torch.dtype, emit, bar) -> None:
    """Every batch size of one architecture; failures and skips become rows, never exceptions."""
    n_stops = len(checkpoints(sweep.gen_len))
    row = {"arch": arch, "preset": sweep.preset, "prompt_len": sweep.prompt_len, "params": None}
    try:
        model = build_model(arch, sweep.preset, device, dtype)
        row["params"] = sum(p.numel() for p in model.parameters())
    except Exception as e:  # a bad config, an error in the model's code, no memory left for the weights
        for batch in sweep.batch_sizes:
            emit(dict(row, batch=batch, status="error", error=f"build: {type(e).__name__}: {e}"))
            bar.update(n_stops)
        return
    for batch in sweep.batch_sizes:
        base = dict(row, batch=batch)
        bar.set_postfix_str(f"{arch} batch {batch}", refresh=False)
        done = 0
        try:
            with torch.inference_mode():
                need = warm_up(model, batch, sweep.prompt_len, sweep.prompt_len + sweep.gen_len, device)
                free_memory(device)
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
                if free is not None and need > MEM_SHARE * free:
                    emit(dict(base, status="skipped", error=f"needs about {need / 1e9:.1f} GB (cache at "
                              f"{sweep.prompt_len + sweep.gen_len} tokens + prefill), {free / 1e9:.1f} GB free"))
                else:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    prompt = random_prompt(batch, sweep.prompt_len, model.config.vocab_size, device)
                    for point in decode(model, prompt, sweep.gen_len, device):
                        emit(dict(base, status="ok", error=None, **point))
                        done += 1
                        bar.update(1)
        except Exception as e:  # out of memory included: the rows measured so far stay
            emit(dict(base, status="error", error=f"{type(e).__name__}: {e}"))
        bar.update(n_stops - done)
        free_memory(device)
    del model
    free_memory(device)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

def ratios(rows: list, arch: str = "sambay", base: str = "transformer") -> list[dict]:
    """Per batch size: arch's throughput over base's at the longest generated length both reached."""
    ok = {(r["arch"], r["batch"], r["generated"]): r for r in rows if r["status"] == "ok"}
    out = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        both = [g for a, b, g in ok if a == arch and b == batch and (base, batch, g) in ok]
        entry = {"arch": arch, "base": base, "batch": batch, "prompt_len": None, "generated": None, "instant": None,
                 "cumulative": None}
        if both:
            x, y = ok[(arch, batch, max(both))], ok[(base, batch, max(both))]
            entry.update(prompt_len=x["prompt_len"], generated=max(both), instant=x["tokens_per_s"] / y["tokens_per_s"],
                         cumulative=x["cum_tokens_per_s"] / y["cum_tokens_per_s"])
        else:  # say why: the skipped and failed rows of either
            entry["why"] = "; ".join(f"{r['arch']} {r['status']}: {r['error']}" for r in rows if r["batch"] == batch
                                     and r["arch"] in (arch, base) and r["status"] != "ok") or "not run"
        out.append(entry)
    return out


def ratio_lines(entries: list) -> list[str]:
    lines = []
    for e in entries:
        head = f"{e['arch']} / {e['base']} tokens/s, batch {e['batch']}"
        if e["generated"] is None:
            lines.append(f"{head}: not measured ({e['why'][:200]})")
        else:
            lines.append(f"{head}, prompt {e['prompt_len']} + {e['generated']} generated: {e['instant']:.2f}x "
                         f"(last steps), {e['cumulative']:.2f}x (cumulative)")
    return lines + [f"({PAPER})"]


def print_table(rows: list) -> None:
    """Grouped by batch size and architecture; `vs tf` is the instantaneous tokens/s over the
    Transformer's at the same batch size and length."""
    tf = {(r["batch"], r["generated"]): r["tokens_per_s"] for r in rows
          if r["arch"] == "transformer" and r["status"] == "ok"}
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    rows = sorted(rows, key=lambda r: (batches.index(r["batch"]), archs.index(r["arch"]), r["generated"] or 0))
    print(f"{'arch':12} {'batch':>5} {'prompt':>6} {'gen':>6} {'tok/s':>10} {'cum tok/s':>10} {'ms/step':>8} "
          f"{'cache MiB':>10} {'vs tf':>6}")
    for r in rows:
        line = f"{r['arch']:12} {r['batch']:5d} {r['prompt_len']:6d}"
        if report_failure(line, r):
            continue
        mine = tf.get((r["batch"], r["generated"]))
        vs = f"{r['tokens_per_s'] / mine:.2f}x" if mine and r["arch"] != "transformer" else ""
        print(f"{line} {r['generated']:6d} {r['tokens_per_s']:10.1f} {r['cum_tokens_per_s']:10.1f} "
              f"{r['step_ms']:8.3f} {r['cache_bytes'] / 2**20:10.3f} {vs:>6}")


def fast_prefill_speedups(prefill: list) -> dict:
    """Per arch run both ways: time to first token with SambaY's fast prefill off over on."""
    ok = {(r["arch"], r["fast_prefill"]): r["first_token_s"] for r in prefill if r["status"] == "ok"}
    return {arch: ok[(arch, False)] / ok[(arch, True)] for arch, fast in ok if fast and (arch, False) in ok}


def print_prefill(prefill: list) -> None:
    print(f"\nprefill point: {'arch':12} {'fast prefill':>12} {'prompt':>6} {'first token s':>13} "
          f"{'prefill tok/s':>13} {'+16 tokens s':>12}")
    for r in prefill:
        line = f"{'':15}{r['arch']:12} {str(r['fast_prefill']):>12} {r['prompt_len']:6d}"
        if report_failure(line, r):
            continue
        print(f"{line} {r['first_token_s']:13.3f} {r['prefill_tokens_per_s']:13.1f} {r['total_s']:12.3f}")
    for arch, x in fast_prefill_speedups(prefill).items():
        print(f"{arch}: fast prefill {x:.2f}x faster to the first token than without")


def plot(rows: list, title: str, path: Path) -> bool:
    """Per batch size: tokens/s (solid: last steps, dashed: cumulative) and cache bytes versus
    generated length, one colour per architecture."""
    ok = [r for r in rows if r["status"] == "ok"]
    plt = pyplot()
    if plt is None or not ok:
        return False
    batches = list(dict.fromkeys(r["batch"] for r in ok))
    archs = list(dict.fromkeys(r["arch"] for r in rows))  # colours stay put when an arch is missing
    fig, axes = plt.subplots(len(batches), 2, figsize=(13, 3.8 * len(batches)), squeeze=False, layout="constrained")
    for (speed, memory), batch in zip(axes, batches):
        for i, arch in enumerate(archs):
            mine = [r for r in ok if r["arch"] == arch and r["batch"] == batch]
            if not mine:
                continue
            x = [r["generated"] for r in mine]
            # hollow markers of shrinking size, so identical curves (LRT's cache is the Transformer's) stay visible
            style = dict(color=f"C{i}", marker="osD^v"[i % 5], markersize=9 - i, markerfacecolor="none")
            speed.plot(x, [r["tokens_per_s"] for r in mine], "-", label=arch, **style)
            speed.plot(x, [r["cum_tokens_per_s"] for r in mine], "--", color=f"C{i}", alpha=0.6)
            memory.plot(x, [r["cache_bytes"] / 2**20 for r in mine], "-", label=arch, **style)
        prompt = ok[0]["prompt_len"]
        speed.set(xlabel=f"generated tokens (after a {prompt}-token prompt)", ylabel="tokens/s (whole batch)",
                  title=f"batch {batch}: throughput (solid: last steps, dashed: cumulative)")
        memory.set(xlabel=f"generated tokens (after a {prompt}-token prompt)", ylabel="cache MiB", yscale="log",
                   title=f"batch {batch}: cache bytes")
        for ax in (speed, memory):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def model_sizes(arch: str, preset: str) -> dict:
    try:
        c = hybrid_lm.config(arch, preset)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {k: getattr(c, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "sliding_window", "vocab_size")}


def meta(device: torch.device, dtype: torch.dtype, sweep: Sweep, archs: list, quick: bool) -> dict:
    stops = checkpoints(sweep.gen_len)
    return run_meta(
        device, packages=("triton", "transformers"), device_type=device.type, cpu_threads=torch.get_num_threads(),
        load_avg_1min=os.getloadavg()[0],  # CPU timings on a busy machine mean little
        dtype=str(dtype).removeprefix("torch."), preset=sweep.preset, archs=archs,
        models={arch: model_sizes(arch, sweep.preset) for arch in archs},
        prompt_len=sweep.prompt_len, gen_len=sweep.gen_len, batch_sizes=list(sweep.batch_sizes),
        checkpoints=stops, window_steps=min(WINDOW_STEPS, stops[0]), quick=quick, seed=SEED,
        decode_step=DECODE_STEP["cuda" if device.type == "cuda" else "cpu"],
        timing=("CUDA events between decode steps, one synchronize per checkpoint" if device.type == "cuda"
                else "perf_counter"),
        memory_guard=f"rows whose estimated peak exceeds {MEM_SHARE:.0%} of free GPU memory are skipped",
        HYBRID_LM_BACKEND=os.environ.get("HYBRID_LM_BACKEND"))


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hybrid-lm bench decode`; a value left out comes from the device's sweep."""
    gpu, cpu = SWEEPS["gpu"], SWEEPS["cpu"]
    add_arch_arguments(parser, DEFAULT_ARCHS, gpu.preset, cpu.preset)
    parser.add_argument("--prompt-len", type=positive_int, default=None,
                        help=f"prompt tokens (default: {gpu.prompt_len} on a GPU, {cpu.prompt_len} on a CPU)")
    parser.add_argument("--gen-len", type=positive_int, default=None,
                        help=f"tokens generated (default: {gpu.gen_len} on a GPU, {cpu.gen_len} on a CPU)")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=None, metavar="B",
                        help=f"batch sizes (default: {' '.join(map(str, gpu.batch_sizes))} on a GPU, "
                             f"{' '.join(map(str, cpu.batch_sizes))} on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the test sweep: " + ", ".join(f"{k} {v}" for k, v in SWEEPS["quick"]._asdict().items()))
    parser.add_argument("--prefill-len", type=non_negative_int, default=None,
                        help=f"vLLM engine: also time one prompt of this many tokens with {vllm_engine.PREFILL_GEN} "
                             f"generated, per arch (SambaY with fast prefill on and off); default "
                             f"{PREFILL_LEN['full']} ({PREFILL_LEN['quick']} with --quick), 0: none")
    parser.add_argument("--eager", action="store_true", help="vLLM engine: " + vllm_engine.EAGER_HELP)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="hf: our models' own decode loop (default); vllm: served through hybrid_lm.serve, "
                             "one generate call per row, prefill included (hybrid_lm.bench.vllm_engine)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every row ran (skips included), 1 when any row failed."""
    archs = chosen_archs(args.archs, DEFAULT_ARCHS)
    if archs is None:
        return 2
    device = default_device()
    default = SWEEPS["quick" if args.quick else "gpu" if device.type == "cuda" else "cpu"]
    sweep = Sweep(args.preset or default.preset, args.prompt_len or default.prompt_len,
                  args.gen_len or default.gen_len, tuple(args.batch_sizes or default.batch_sizes))
    dtype = model_dtype(device)
    vllm = args.engine == "vllm"
    stem = results_stem(args.out, "decode-vllm" if vllm else "decode", device)
    if vllm:
        vllm_engine.require_vllm()

    info = meta(device, dtype, sweep, archs, args.quick)
    info.update(engine=args.engine, vllm=vllm_version() if vllm else None)
    prefill, prefill_len = [], 0
    if vllm:
        info["decode_step"] = vllm_engine.DECODE_ROW
        prefill_len = PREFILL_LEN["quick" if args.quick else "full"] if args.prefill_len is None else args.prefill_len
        info.update(eager=args.eager, prefill_len=prefill_len, prefill_point=vllm_engine.PREFILL_ROW)
    print(f"{info['device']}, {info['dtype']}: {sweep.preset} models, prompt {sweep.prompt_len}, up to "
          f"{sweep.gen_len} generated, batch {', '.join(map(str, sweep.batch_sizes))}; torch {info['torch']}")
    rows = []
    bar = progress(len(archs) * len(sweep.batch_sizes) * len(checkpoints(sweep.gen_len)))
    with jsonl_writer(stem, info) as write:
        def emit(row: dict) -> None:
            row = {k: row.get(k) for k in FIELDS}
            rows.append(row)
            write(row)
            if row["status"] == "error":
                bar.write(f"error: {row['arch']} batch {row['batch']}: {row['error'][:300]}")

        def emit_prefill(row: dict) -> None:
            prefill.append(row)
            write({"prefill_point": row})

        for arch in archs:
            if vllm:
                vllm_engine.decode_rows(arch, sweep, checkpoints(sweep.gen_len), dtype, emit, bar, prefill_len,
                                        emit_prefill, enforce_eager=args.eager)
            else:
                bench_arch(arch, sweep, device, dtype, emit, bar)
        bar.close()

    summary = ratios(rows)
    points = dict(prefill_point=prefill, fast_prefill_speedup=fast_prefill_speedups(prefill)) if vllm else {}
    write_json(stem, info, rows, sambay_vs_transformer=summary, **points)
    print_table(rows)
    if prefill:
        print_prefill(prefill)
    step = "vLLM" if vllm else "CUDA-graph decode step" if device.type == "cuda" else "eager decode step"
    title = (f"hybrid-lm decode, {info['device']}, {info['dtype']}, {sweep.preset} models, prompt {sweep.prompt_len}, "
             f"{step}")
    wrote_png = plot(rows, title, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, {stem}.jsonl"
          + (f", {stem}.png" if wrote_png else " (no PNG: matplotlib missing, or no row ran)"))
    print("\n".join(ratio_lines(summary)))
    return int(any(r["status"] == "error" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
