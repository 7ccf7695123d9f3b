"""CUDA decode benchmark (bench/decode.py --cuda): a Llama-3.1-8B-shaped model with random weights.

quantrt bf16, fp8 (online `--quantization fp8`) and int4 (online `--torchao-config int4wo-128`, our
IntWeight -> Triton W4A16), batch 1 and 64, with and without decode graphs, plus HF transformers bf16
`generate` on the same GPU and checkpoint. Every row: greedy, EOS ignored, 8-token prompts; `steady`
= (time(new) - time(short)) / (new - short), prefill excluded. Roofline: bytes one decode step must
read (every weight the kernels read except the embedding table, plus the KV of the batch) over the
step time, against a device-to-device copy measured in the same run (bytes read + written).
`quantrt bf16 (unfused)` runs the CUDA platform with its fused per-layer ops switched off (torch rotary and
index_copy KV writes, torch residual add + RMSNorm, silu * up): the A/B of the fused kernels in one run.
`quantrt bf16 (cuBLAS dense)` runs the unquantized linears on cuBLAS (F.linear) instead of the Triton dense
GEMV (`TritonDenseGemvKernel`, batch 1) and launches without PDL (QUANTRT_CUDA_PDL=0): the code before that
kernel, in the same run; `quantrt bf16 (no PDL)` is the GEMV without programmatic dependent launch.
Any config name + " (no overlap)" runs it with `--disable-overlap-schedule` (each decode step's tokens are read
before the next step is queued): the overlap schedule's A/B in one run.
`--profile`: per config, the kernels of 32 graph-replayed decode steps at each batch (torch.profiler, CUDA activity
only), per step: calls, µs, share of the kernel time; the step time minus the kernel time is launch gaps. With PDL
kernels overlap, so the profile also charges each kernel only the wall-clock time it adds (`_cuda_profile`).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch
from _cuda_checkpoint import arch_paths, write_checkpoint

PROMPT_LEN = 8


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (median of 20)."""
    a = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * 2**30 / sorted(times[5:])[len(times[5:]) // 2]


def use_prompt(tokens: int | None) -> None:
    """`--prompt`: this run's prompt length (long contexts, the attention's key splits); None keeps PROMPT_LEN."""
    global PROMPT_LEN
    PROMPT_LEN = tokens or PROMPT_LEN


def context_len(args) -> int:
    """The engine's context: 2048, or what `--prompt` plus the new tokens need."""
    return max(2048, PROMPT_LEN + args.new + 64)


def prompts(bs: int) -> list[list[int]]:
    return [[(977 * r + 131 * j) % 120000 + 10 for j in range(PROMPT_LEN)] for r in range(bs)]


def step_bytes(eng) -> int:
    """Bytes of every device tensor the linear kernels, norms and rotary tables hold (what a decode
    step reads at batch 1; the embedding table, of which a step reads B rows, is excluded)."""
    from quantrt.layers.linear import QuantLinear

    seen: dict[int, int] = {}

    def add(v) -> None:
        if isinstance(v, torch.Tensor):
            if v.is_cuda:
                seen[v.data_ptr()] = v.numel() * v.element_size()
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            for w in vars(v).values():
                if isinstance(w, torch.Tensor) and w.is_cuda:
                    seen[w.data_ptr()] = w.numel() * w.element_size()

    for m in eng.model.modules():
        kernels = m.kernels if isinstance(m, QuantLinear) else []
        for k in kernels:
            for v in vars(k).values():
                add(v)
        for name in ("_scale", "_bias"):
            add(getattr(m, name, None))
    if getattr(eng.model, "tied_head", None) is not None:
        for v in vars(eng.model.tied_head).values():
            add(v)
    return sum(seen.values())


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def steady(gen, bs: int, new: int, short: int, repeats: int, step_times=None
           ) -> tuple[float, float, list[list[int]], float | None]:
    """(seconds for `new` tokens, steady seconds per step, output ids, median decode step in seconds) for
    `gen(ids, n)`. `steady` is (time(new) - time(short)) / (new - short) over best-of-`repeats` totals: the
    difference of two noisy totals, which on a shared host swung by +-10-15% (and once below the HBM floor).
    The median is taken over the `new` steps of one more run, each step timed on its own by
    `step_times(ids, n) -> [seconds per decode step]` (every step ends in a host sync: the sampled tokens)."""
    ids = prompts(bs)
    gen(ids, new)   # warm-up: compiles, captures every length bucket the timed runs touch
    out: list[list[int]] = []

    def long() -> None:
        nonlocal out
        out = gen(ids, new)

    t_long = _timed(long, repeats)
    t_short = _timed(lambda: gen(ids, short), repeats)
    median = statistics.median(step_times(ids, new)) if step_times is not None else None
    return t_long, (t_long - t_short) / (new - short), out, median


def unfused_platform():
    """The CUDA platform without its fused per-layer ops (the layers' torch math runs instead)."""
    from quantrt.platform.interface import without_fused_layer_ops
    from quantrt.platforms.cuda.platform import CudaPlatform

    return without_fused_layer_ops(CudaPlatform)()


def cublas_dense_platform():
    """The CUDA platform with unquantized linears on F.linear (cuBLAS) instead of the Triton dense GEMV."""
    from quantrt.platforms.cuda.kernels.dense_gemv import TritonDenseGemvKernel
    from quantrt.platforms.cuda.platform import CudaPlatform

    class CublasDensePlatform(CudaPlatform):
        def linear_kernels(self):
            return [k for k in super().linear_kernels() if k is not TritonDenseGemvKernel]

    return CublasDensePlatform()


def profile_steps(gen, steps: int = 32, top: int = 24, cpu: bool = False, bs: int = 1, layers: int = 32) -> dict:
    """Kernels of `steps` decode steps of `bs` rows (one 8-token prefill included), per step, heaviest first
    (`cpu`: CPU ops instead, for a dry run without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompts(bs)
    gen(ids, steps + 1)   # graphs for every length bucket captured before the profile
    with profile(activities=[ProfilerActivity.CPU if cpu else ProfilerActivity.CUDA]) as prof:
        gen(ids, steps + 1)
    kernels = []
    for e in prof.key_averages():
        us = e.self_cpu_time_total if cpu else e.device_time_total
        if us > 0:
            kernels.append({"kernel": e.key, "calls_per_step": e.count / steps, "us_per_step": us / steps})
    kernels.sort(key=lambda k: -k["us_per_step"])
    total = sum(k["us_per_step"] for k in kernels)
    calls = sum(k["calls_per_step"] for k in kernels)
    print(f"    profile: {calls:.0f} kernels, {total:.0f} µs of kernel time per decode step (batch {bs})", flush=True)
    for k in kernels[:top]:
        print(f"      {k['calls_per_step']:6.1f} x {k['us_per_step'] / max(k['calls_per_step'], 1e-9):7.1f} µs "
              f"= {k['us_per_step']:7.1f} µs/step ({100 * k['us_per_step'] / total:4.1f}%)  {k['kernel'][:90]}",
              flush=True)
    out = {"kernel_us_per_step": total, "kernels_per_step": calls, "kernels": kernels[:60]}
    if not cpu:
        from _cuda_profile import exposed_time  # bench/ is sys.path[0]

        out["exposed"] = exposed_time(prof, steps, top, layers)
    return out


def agreement(out: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of sequences equal to ref, mean length of the common prefix as a share of the output)."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    same = sum(a == b for a, b in zip(out, ref)) / len(out)
    return same, sum(prefix(a, b) / max(len(a), 1) for a, b in zip(out, ref)) / len(out)


def bench_quantrt(path: Path, name: str, kw: dict, args, bw: float, rows: list[dict],
                  ref: dict[int, list] | None = None) -> dict[int, list]:
    from quantrt import Engine

    t0 = time.perf_counter()
    if kw.pop("unfused", False):
        kw["platform"] = unfused_platform()
    if kw.pop("cublas_dense", False):
        kw["platform"] = cublas_dense_platform()
    env = dict(kw.pop("env", {}), **({"QUANTRT_CUDA_PDL": "0"} if kw.pop("no_pdl", False) else {}))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)         # for the engine's whole run (PDL is read at each launch: every graph captured)
    eng = Engine(model_path=str(path), dtype="bfloat16", context_length=context_len(args), max_running_requests=64,
                 max_total_tokens=max(64 * 256, max(args.batches) * (PROMPT_LEN + args.new + 16)), cuda_graph_max_bs=64,
                 random_seed=0, **kw)
    load_s = time.perf_counter() - t0
    kernels = sorted({m.kernel_desc.split(" ")[0] for m in eng.model.modules() if hasattr(m, "kernel_desc")})
    wbytes = step_bytes(eng)
    print(f"{name}: loaded in {load_s:.0f} s; kernels {kernels}; {wbytes / 1e9:.2f} GB read per step", flush=True)
    runner = eng.scheduler.runner
    plat = eng.platform
    outs: dict[int, list] = {}

    def gen(ids: list[list[int]], n: int) -> list[list[int]]:
        p = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        return [o["output_ids"] for o in eng.generate(input_ids=ids, sampling_params=p)]

    sched = eng.scheduler

    def step_times(ids: list[list[int]], n: int) -> list[float]:
        """Wall time of each decode step of one `gen(ids, n)` (the first step, the prefill, dropped)."""
        times: list[float] = []
        inner = sched.step

        def timed_step():
            t0 = time.perf_counter()
            r = inner()
            times.append(time.perf_counter() - t0)
            return r

        sched.step = timed_step
        try:
            gen(ids, n)
        finally:
            del sched.step
        return times[1:]

    modes = {"both": (True, False), "on": (True,), "off": (False,)}[getattr(args, "graphs", "both")]
    for graphs in modes:
        runner.configure_graphs(plat, not graphs, 64, 64, context_len(args))
        for bs in args.batches:
            t_long, step, out, med = steady(gen, bs, args.new, args.short, args.repeats, step_times)
            if graphs:
                outs[bs] = out
            agree = agreement(out, ref[bs]) if ref and bs in ref else None
            if agree is not None:
                print(f"  {name}: same greedy tokens as quantrt bf16 in {100 * agree[0]:.0f}% of sequences, "
                      f"common prefix {100 * agree[1]:.0f}%", flush=True)
            avg_len = PROMPT_LEN + (args.new + args.short) / 2
            moved = wbytes + bs * avg_len * eng.kv_bytes_per_token
            row = {"config": name, "graphs": graphs, "batch": bs, "tok_s": bs * args.new / t_long,
                   "steady_ms": 1e3 * step, "steady_tok_s": bs / step, "bytes_per_step": moved,
                   "median_ms": 1e3 * med, "median_tok_s": bs / med, "roofline_median": moved / med / bw,
                   "roofline": moved / step / bw, "graph_status": runner.graph_status(), "kernels": kernels,
                   "same_as_quantrt_bf16": agree}
            rows.append(row)
            print(f"  {name:24s} graphs={'on ' if graphs else 'off'} bs={bs:<3d} {row['tok_s']:9.1f} tok/s  "
                  f"steady {row['steady_ms']:7.2f} ms/step {row['steady_tok_s']:9.1f} tok/s  "
                  f"{100 * row['roofline']:5.1f}% of copy BW; median step {row['median_ms']:7.2f} ms "
                  f"({100 * row['roofline_median']:5.1f}%)", flush=True)
            if graphs and getattr(args, "profile", False):
                row["profile"] = profile_steps(gen, bs=bs, layers=getattr(args, "layers", 32))
    eng.shutdown()
    eng = runner = None  # noqa: F841 - drop the engine before the next load
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    gc.collect()
    torch.cuda.empty_cache()
    return outs


def bench_hf(path: Path, args, bw: float, rows: list[dict], ref: dict[int, list]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to("cuda").eval()
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)

    @torch.inference_mode()
    def gen(ids: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(ids, device="cuda")
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
        return out[:, x.shape[1]:].tolist()

    class StepClock:
        """A logits processor that only stamps the time: generate() calls it once per new token, after that
        step's forward (no extra sync, no other code path than a plain generate)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    @torch.inference_mode()
    def step_times(ids: list[list[int]], n: int) -> list[float]:
        from transformers import LogitsProcessorList

        clock = StepClock()
        x = torch.tensor(ids, device="cuda")
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        st = clock.stamps[1:]            # stamps at each decode step's logits; the prefill's dropped
        return [b - a for a, b in zip(st, st[1:])]

    for bs in args.batches:
        t_long, step, out, med = steady(gen, bs, args.new, args.short, args.repeats, step_times)
        same = agreement(out, ref[bs]) if bs in ref else None     # (equal sequences, common prefix)
        row = {"config": "hf transformers bf16", "graphs": False, "batch": bs, "tok_s": bs * args.new / t_long,
               "steady_ms": 1e3 * step, "steady_tok_s": bs / step, "bytes_per_step": wbytes,
               "median_ms": 1e3 * med, "median_tok_s": bs / med, "roofline_median": wbytes / med / bw,
               "roofline": wbytes / step / bw, "same_as_quantrt_bf16": same}
        rows.append(row)
        print(f"  {'hf transformers bf16':24s} graphs=off bs={bs:<3d} {row['tok_s']:9.1f} tok/s  "
              f"steady {row['steady_ms']:7.2f} ms/step {row['steady_tok_s']:9.1f} tok/s  "
              f"{100 * row['roofline']:5.1f}% of copy BW; median step {row['median_ms']:7.2f} ms; "
              f"same tokens as quantrt bf16: {same}", flush=True)
    model = None  # noqa: F841 - free the GPU
    gc.collect()
    torch.cuda.empty_cache()


CONFIGS = {"quantrt bf16": {}, "quantrt bf16 (unfused)": {"unfused": True}, "quantrt bf16 (no PDL)": {"no_pdl": True},
           "quantrt bf16 (cuBLAS dense)": {"cublas_dense": True, "no_pdl": True}, "quantrt fp8": {"quantization": "fp8"},
           "quantrt int4 (gptq g128)": {"gptq": True},
           "quantrt int4 (gptq g128; fp8 kv)": {"gptq": True, "kv_cache_dtype": "fp8_e4m3"},
           "quantrt int4 (gptq g128; fp4 kv)": {"gptq": True, "kv_cache_dtype": "fp4_e2m1"},
           "quantrt int4 (awq g128)": {"awq": True},      # zero points per group (uint8 in the kernels)
           # float zero points (w = q s + o), the kernels' path for GGUF Q4_1 / K-quant mins at g32
           "quantrt int4 (torchao int4wo-32)": {"torchao_config": "int4wo-32"},
           "quantrt int4 (torchao int4wo-128)": {"torchao_config": "int4wo-128"},
           "quantrt fp8 (codes unfused)": {"quantization": "fp8", "env": {"QUANTRT_CUDA_FUSED_CODES": "0"}},
           "quantrt fp8 (no PDL)": {"quantization": "fp8", "no_pdl": True},
           "quantrt fp8 (no PDL; codes unfused)": {"quantization": "fp8", "no_pdl": True,
                                                   "env": {"QUANTRT_CUDA_FUSED_CODES": "0"}},
           "quantrt int8": {"quantization": "w8a8_int8"},
           "quantrt int8 (codes unfused)": {"quantization": "w8a8_int8", "env": {"QUANTRT_CUDA_FUSED_CODES": "0"}}}
NO_OVERLAP = " (no overlap)"    # any config + this suffix: the same engine with --disable-overlap-schedule


def config_kw(name: str) -> dict:
    """The engine arguments of a config name: a CONFIGS key, optionally + NO_OVERLAP, optionally + " [K=V;...]"
    environment overrides for that engine's run (A/B of a switch in one call, e.g. "quantrt int4 (gptq g128)
    [QUANTRT_CUDA_STREAM_PDL=ring;QUANTRT_CUDA_PDL_MIN_ROWS=1]")."""
    env: dict[str, str] = {}
    if name.endswith("]") and " [" in name:
        name, spec = name[:-1].rsplit(" [", 1)
        for item in filter(None, spec.split(";")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"config env override {item!r} is not KEY=VALUE")
            env[key.strip()] = value.strip()
    base = name.removesuffix(NO_OVERLAP)
    if base not in CONFIGS:
        raise ValueError(f"unknown config {base!r}; configs: {', '.join(CONFIGS)}, hf transformers bf16")
    kw = dict(CONFIGS[base], **({"disable_overlap_schedule": True} if base != name else {}))
    if env:
        kw["env"] = dict(kw.get("env", {}), **env)
    return kw


def print_table(rows: list[dict], bw: float) -> None:
    """One row per (config, batch). `median` columns: the median decode step (robust to a noisy host); `steady`:
    the difference of two runs' totals (the older method, kept for comparison with earlier tables)."""
    hf = {r["batch"]: r["median_tok_s"] for r in rows if r["config"].startswith("hf")}
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print("| engine / method | graphs | batch | tok/s | median ms/step | median tok/s | GB/step | % of copy BW (median) "
          "| vs HF bf16 (median) | steady ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["batch"], r["config"], not r["graphs"])):
        ratio = f"{r['median_tok_s'] / hf[r['batch']]:.2f}x" if r["batch"] in hf else "-"
        print(f"| {r['config']} | {'on' if r['graphs'] else 'off'} | {r['batch']} | {r['tok_s']:.1f} | "
              f"{r['median_ms']:.2f} | {r['median_tok_s']:.1f} | {r['bytes_per_step'] / 1e9:.2f} | "
              f"{100 * r['roofline_median']:.1f}% | {ratio} | {r['steady_ms']:.2f} |")


def config_checkpoint(kw: dict, base: Path, checkpoint: str, layers: int, arch: str = "llama3-8b") -> Path:
    """The checkpoint a config's engine loads: `base` (bf16), or the GPTQ / AWQ one written beside it (`kw`'s
    "gptq" / "awq" flag, popped)."""
    for fmt in ("gptq", "awq"):
        if kw.pop(fmt, False):
            t0 = time.perf_counter()
            src = write_checkpoint(Path(f"{checkpoint}-{fmt}"), layers, **{fmt: True}, arch=arch)
            print(f"{fmt} checkpoint {src} ready in {time.perf_counter() - t0:.0f} s", flush=True)
            return src
    return base


def run_cuda(args) -> list[dict]:
    use_prompt(getattr(args, "prompt", None))
    arch = getattr(args, "arch", "llama3-8b")
    args.layers, args.checkpoint = arch_paths(arch, getattr(args, "layers", None), getattr(args, "checkpoint", None))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {arch}, {args.layers} layers; prompt "
          f"{PROMPT_LEN}, {args.new} new (steady: minus {args.short}), best of {args.repeats}", flush=True)
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    path = write_checkpoint(Path(args.checkpoint), args.layers, arch=arch)
    print(f"checkpoint {path} ready in {time.perf_counter() - t0:.0f} s; copy {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    ref: dict[int, list] = {}
    def dump() -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                             "copy_bytes_per_s": bw, "rows": rows}, indent=1, default=str))

    order = [n for n in (args.configs or [*CONFIGS, "hf transformers bf16"])]
    for name in order:
        try:
            if name == "hf transformers bf16":
                bench_hf(path, args, bw, rows, ref)
            else:
                kw = config_kw(name)
                src = config_checkpoint(kw, path, args.checkpoint, args.layers, arch)
                outs = bench_quantrt(src, name, kw, args, bw, rows, ref)
                if name == "quantrt bf16":
                    ref = outs
        except Exception:  # noqa: BLE001 - report and go on with the next configuration
            traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
        dump()
    print_table(rows, bw)
    return rows
