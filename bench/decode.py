"""Decode throughput on CPU, SmolLM2-135M-Instruct: quantrt vs transformers `generate`, same run.

    python bench/decode.py [--quick] [--json out.json] [--profile] [--skip-bf16] [--configs NAMES]
                           [--llamacpp-venv .cache/venvs/llamacpp] [--threads N] [--profile-bf16] [--kernels]

Rows "quantrt bf16 (export)" (our own bf16 path), "quantrt int8wo bf16 (export)" and "quantrt int4wo-32 bf16
(export)" (the same export quantized online; on `cpu_native_int` when the native extension loads, else the
int8-pack op / int4-pack op) give the int8 / int4 vs bf16
ratios printed under the table. `--profile-bf16`: torch.profiler top ops of the native-Q4_1 bf16 path;
`--kernels`: every CPU linear path timed alone on SmolLM2's batch-1 shapes.

Every row: greedy decoding of `--new` tokens (ignore EOS) after an 8-token prompt, batch 1 and 16,
one warm-up per (config, batch). `tok/s` = batch*new / time, prefill included. `steady` is the
prefill-free step time, (time(new) - time(short)) / (new - short); `steady CPU` is the same difference of
process CPU time (all threads; spin-waiting counts): on a shared box, `--threads 1` makes it the work per
step, which contention barely moves, while wall times can double. `ratio` compares tok/s with
HF fp32 at the same batch; `same` is the share of rows whose tokens equal HF fp32's.

Peer row "llama.cpp (gguf)": when the llama-cpp-python venv exists (a benchmark-only dependency,
built from the PyPI sdist: see docs/PERFORMANCE.md), llama.cpp runs the same GGUF in a subprocess of
that venv (bench/_llamacpp_peer.py): batch 1 only, same 8 prompt ids, greedy, EOS ignored,
n_threads = torch's thread count, same warm-up / best-of / steady rules.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm2_export import export_smollm2  # noqa: E402

from quantrt.demo_model import default_model_path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_VENV = REPO_ROOT / ".cache" / "venvs" / "llamacpp"
PROMPT_LEN = 8
TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on a warm windowsill and the "
        "birds sing in the old oak tree near the river that flows quietly toward the distant sea.")
Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, new tokens) -> new ids


def prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` distinct 8-token windows of one text (no shared prefix for a prefix cache to reuse)."""
    ids = tokenizer(TEXT)["input_ids"]
    return [ids[i:i + PROMPT_LEN] for i in range(batch)]


def quantrt_generate(model_path: str, **kw) -> tuple[Generate, object, Callable[[], None]]:
    from quantrt import Engine

    engine = Engine(model_path=model_path, max_total_tokens=4096, **kw)

    def gen(ids: list[list[int]], n: int) -> list[list[int]]:
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        return [o["output_ids"] for o in engine.generate(input_ids=ids, sampling_params=params)]

    gen.engine = engine  # type: ignore[attr-defined]  (profile_bf16's wall breakdown hooks its modules)
    return gen, engine.tokenizer, lambda: getattr(engine, "shutdown", lambda: None)()


def hf_generate(model) -> Generate:
    @torch.inference_mode()
    def gen(ids: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(ids)
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=2)
        return out[:, x.shape[1]:].tolist()

    return gen


def timed(gen: Generate, ids: list[list[int]], n: int, repeats: int) -> tuple[float, list[list[int]]]:
    best, out = float("inf"), []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = gen(ids, n)
        best = min(best, time.perf_counter() - t0)
        _CPU[n] = min(_CPU.get(n, float("inf")), time.process_time() - c0)
    return best, out


_CPU: dict[int, float] = {}  # best process CPU seconds per token count of the last config (all threads)


def bench_config(name: str, gen: Generate, tok, args, rows: list[dict], ref: dict) -> None:
    for bs in args.batches:
        ids = prompts(tok, bs)
        gen(ids, args.short)  # warm-up
        _CPU.clear()
        t_long, out = timed(gen, ids, args.new, args.repeats)
        t_short, _ = timed(gen, ids, args.short, args.repeats)
        assert all(len(o) == args.new for o in out), f"{name}: wrong output length"
        if name == "hf fp32":
            ref[bs] = out
        row = {"config": name, "batch": bs, "seconds": t_long, "tok_s": bs * args.new / t_long,
               "ms_per_step": 1e3 * t_long / args.new,
               "steady_ms_per_step": 1e3 * (t_long - t_short) / (args.new - args.short),
               "same_as_hf_fp32": (sum(a == b for a, b in zip(out, ref[bs])) / bs) if bs in ref else None}
        row["steady_tok_s"] = bs * 1e3 / row["steady_ms_per_step"]
        row["steady_cpu_ms_per_step"] = 1e3 * (_CPU[args.new] - _CPU[args.short]) / (args.new - args.short)
        rows.append(row)
        print(f"  {name:22s} bs={bs:<3d} {row['tok_s']:8.1f} tok/s  {row['ms_per_step']:7.1f} ms/step  "
              f"steady {row['steady_ms_per_step']:7.1f} ms", flush=True)


def wanted(args, name: str) -> bool:
    return not args.configs or name in args.configs


def bench_llamacpp(gguf: str, tok, args, rows: list[dict], ref: dict) -> None:
    """Batch-1 llama.cpp row from a subprocess in the llama-cpp-python venv (skipped if it is absent)."""
    py = Path(args.llamacpp_venv) / "bin" / "python"
    if 1 not in args.batches:
        return
    if not py.is_file():
        print(f"  llama.cpp: no venv at {args.llamacpp_venv}, row skipped", flush=True)
        return
    spec = {"ids": prompts(tok, 1)[0], "new": args.new, "short": args.short, "repeats": args.repeats,
            "threads": torch.get_num_threads()}
    res = subprocess.run([str(py), str(Path(__file__).with_name("_llamacpp_peer.py")), gguf, json.dumps(spec)],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(f"  llama.cpp failed (rc {res.returncode}): {res.stderr[-2000:]}", flush=True)
        return
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  llama.cpp {out['version']}: {out['system_info']}", flush=True)
    t_long, t_short = out["t_long"], out["t_short"]
    row = {"config": "llama.cpp (gguf)", "batch": 1, "seconds": t_long, "tok_s": args.new / t_long,
           "ms_per_step": 1e3 * t_long / args.new,
           "steady_ms_per_step": 1e3 * (t_long - t_short) / (args.new - args.short),
           "same_as_hf_fp32": float(out["tokens"] == ref[1][0]) if 1 in ref else None,
           "llama_cpp_version": out["version"], "tokens": out["tokens"]}
    row["steady_tok_s"] = 1e3 / row["steady_ms_per_step"]
    row["steady_cpu_ms_per_step"] = 1e3 * (out["c_long"] - out["c_short"]) / (args.new - args.short)
    rows.append(row)
    print(f"  {'llama.cpp (gguf)':22s} bs=1   {row['tok_s']:8.1f} tok/s  {row['ms_per_step']:7.1f} ms/step  "
          f"steady {row['steady_ms_per_step']:7.1f} ms", flush=True)


def run_all(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    gguf = default_model_path()
    export = export_smollm2(gguf)
    rows: list[dict] = []
    ref: dict[int, list[list[int]]] = {}
    folder, fname = str(Path(gguf).parent), Path(gguf).name
    hf = None
    if wanted(args, "hf fp32") or wanted(args, "hf bf16"):
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    gen, tok, close = quantrt_generate(gguf)  # its tokenizer serves every config
    if wanted(args, "hf fp32"):
        bench_config("hf fp32", hf_generate(hf), tok, args, rows, ref)
    if wanted(args, "quantrt fp32 (gguf)"):
        bench_config("quantrt fp32 (gguf)", gen, tok, args, rows, ref)
    close()
    configs: list[tuple[str, dict]] = [("quantrt fp32 (export)", {}), ("quantrt fp8 (export)", {"quantization": "fp8"})]
    if not args.skip_bf16:
        configs.append(("quantrt bf16 (gguf)", {"dtype": "bfloat16", "path": gguf}))
        configs += [("quantrt bf16 (export)", {"dtype": "bfloat16"}),      # our own bf16 path (int8 tied head)
                    ("quantrt int8wo bf16 (export)", {"dtype": "bfloat16", "torchao_config": "int8wo"}),
                    ("quantrt int4wo-32 bf16 (export)", {"dtype": "bfloat16", "torchao_config": "int4wo-32"})]
    for name, kw in configs:
        if not wanted(args, name):
            continue
        gen, _, close = quantrt_generate(kw.pop("path", export), **kw)
        bench_config(name, gen, tok, args, rows, ref)
        close()
        gc.collect()
    if wanted(args, "llama.cpp (gguf)"):
        bench_llamacpp(gguf, tok, args, rows, ref)
    if not args.skip_bf16 and wanted(args, "hf bf16"):
        bench_config("hf bf16", hf_generate(hf.to(torch.bfloat16)), tok, args, rows, ref)
    return rows


def profile_split(batches: list[int], n: int) -> list[dict]:
    """Share of quantrt fp32 decode time in GEMMs (self CPU time of matmul ops) vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    gen, tok, _ = quantrt_generate(default_model_path())
    gemm_ops = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")
    out = []
    for bs in batches:
        ids = prompts(tok, bs)
        gen(ids, 8)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen(ids, n)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        gemm = sum(e.self_cpu_time_total for e in events if e.key in gemm_ops) / 1e6
        attn = sum(e.self_cpu_time_total for e in events if "attention" in e.key) / 1e6
        out.append({"batch": bs, "wall_s": wall, "gemm_s": gemm, "sdpa_s": attn,
                    "gemm_share": gemm / wall, "top": [(e.key, e.self_cpu_time_total / 1e6) for e in
                                                       sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]]})
        print(f"  profile bs={bs}: wall {wall:.2f}s under profiler, GEMM {gemm:.2f}s ({100 * gemm / wall:.0f}%), "
              f"attention {attn:.2f}s", flush=True)
    a = torch.empty(64 * 2**20)  # 256 MiB fp32
    b = torch.empty_like(a)
    for _ in range(2):
        t0 = time.perf_counter()
        b.copy_(a)
        copy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        a.sum()
        sum_s = time.perf_counter() - t0
    bw = {"copy_gb_s": 2 * a.nbytes / copy_s / 1e9, "read_gb_s": a.nbytes / sum_s / 1e9}
    print(f"  bandwidth: copy {bw['copy_gb_s']:.1f} GB/s (read+write), sum {bw['read_gb_s']:.1f} GB/s (read)")
    return out + [bw]


def profile_bf16(n: int) -> dict:
    """torch.profiler over `n` batch-1 steps of quantrt bf16 on the GGUF: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    gen, tok, close = quantrt_generate(default_model_path(), dtype="bfloat16")
    ids = prompts(tok, 1)
    gen(ids, 8)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen(ids, n)
    wall = time.perf_counter() - t0
    walls = wall_breakdown(gen, ids, n)
    close()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    top = [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / n,
            "us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in ev[:14]]
    print(f"  profile bf16 (gguf) bs=1: {1e3 * wall / n:.1f} ms/step under the profiler, "
          f"{sum(e.count for e in ev) / n:.0f} aten calls/step")
    for t in top:
        print(f"    {t['op']:48s} {100 * t['share']:5.1f}%  {t['calls_per_step']:6.1f}/step  {t['us_per_call']:8.1f} us")
    return {"profile_bf16_ms_per_step": 1e3 * wall / n, "top": top, "wall_ms_per_step": walls}


def wall_breakdown(gen, ids: list[list[int]], n: int, short: int = 8) -> dict[str, float]:
    """Per decode step wall time (ms) inside each kind of module (forward hooks; the tied head's kernel
    wrapped), from the difference of an n-token and a short run; 'rest' = step minus all of them."""
    from collections import defaultdict

    from quantrt.layers.attention import PagedAttention
    from quantrt.layers.linear import QuantLinear
    from quantrt.layers.norm import RMSNorm

    engine = gen.engine
    acc: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    for mname, m in engine.model.named_modules():
        if isinstance(m, QuantLinear):
            name = mname.rsplit(".", 1)[-1]
        elif isinstance(m, PagedAttention):
            name = "attention (KV write + gather + SDPA)"
        elif isinstance(m, RMSNorm):
            name = "rms_norm"
        else:
            continue
        handles.append(m.register_forward_pre_hook(lambda mod, a: started.__setitem__(id(mod), time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, a, o, name=name: acc.__setitem__(name, acc[name] + time.perf_counter() - started[id(mod)])))
    head = getattr(engine.model, "tied_head", None)
    if head is not None:
        orig = head.apply

        def timed(x, b):
            t0 = time.perf_counter()
            y = orig(x, b)
            acc["lm_head (tied)"] += time.perf_counter() - t0
            return y

        head.apply = timed
    totals = []
    for steps in (n, short):
        acc.clear()
        t0 = time.perf_counter()
        gen(ids, steps)
        totals.append((time.perf_counter() - t0, dict(acc)))
    for h in handles:
        h.remove()
    if head is not None:
        del head.apply
    (t_long, a_long), (t_short, a_short) = totals
    per = {k: 1e3 * (a_long[k] - a_short.get(k, 0.0)) / (n - short) for k in a_long}
    per["rest (rotary, residual adds, SiLU, Python, engine)"] = 1e3 * (t_long - t_short) / (n - short) - sum(per.values())
    per["step"] = 1e3 * (t_long - t_short) / (n - short)
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"    wall {k:52s} {v:7.2f} ms/step")
    return per


def kernel_shapes() -> dict:
    """Batch-1 time (us, best of 5 x 50 calls) of each CPU linear path on SmolLM2's shapes [N, K]."""
    def clock(f, reps: int = 50) -> float:
        for _ in range(5):
            f()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            best = min(best, (time.perf_counter() - t0) / reps)
        return 1e6 * best

    out = {}
    shapes = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
              "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}
    # each call takes the next of `copies` weights (30 = one per layer, like a decode step), so the
    # working set is the model's and not a cache-resident single matrix
    from quantrt.platforms.xpu import cpu_ext

    native = cpu_ext.load()   # quantrt_cpu::int_gemm: Q4_1-like 4-bit (Q8_0-like 8-bit for the head) 32-blocks
    print("\n| shape [N, K] | int4 pack g32 (bf16) | int8 pack (bf16) | fp32 oneDNN packed | fp32 F.linear | bf16 F.linear "
          "| native int_gemm (fp32 x) |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, k) in shapes.items():
        row = _shape_row(n, k, clock, native)
        out[name] = row
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row.values()) + " |", flush=True)
    return {"kernels_us": out, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def _shape_row(n: int, k: int, clock, native: bool) -> dict:
    """One row of `kernel_shapes`: each CPU linear path on [N, K], cycling through `copies` weights."""
    copies = 1 if n > 10000 else 30
    x = torch.randn(1, k)
    xb = x.bfloat16()
    w = [torch.randn(n, k) for _ in range(copies)]
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
              for _ in range(copies)]
    sz = [torch.rand(k // 32, n, 2).bfloat16() for _ in range(copies)]
    c8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
    s8 = [torch.rand(n).bfloat16() for _ in range(copies)]
    wp = [torch.ops.mkldnn._reorder_linear_weight(t, 16) for t in w]
    wb = [t.bfloat16() for t in w]
    bits = 8 if n > 10000 else 4
    nq = [torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8).view(torch.int8 if bits == 8 else torch.uint8)
          for _ in range(copies)]
    ns = [torch.rand(n, k // 32).half() for _ in range(copies)]
    nm = [torch.rand(n, k // 32).half() if bits == 4 else None for _ in range(copies)]
    reps = 5 if n > 10000 else 60
    it = iter(range(10**9))

    def nxt() -> int:
        return next(it) % copies

    row = {"int4": clock(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed[(i := nxt())], 32, sz[i]), reps),
           "int8": clock(lambda: torch.ops.aten._weight_int8pack_mm(xb, c8[(i := nxt())], s8[i]), reps),
           "fp32_onednn": clock(lambda: torch.ops.mkldnn._linear_pointwise(x, wp[nxt()], None, "none", [], ""), reps),
           "fp32": clock(lambda: torch.nn.functional.linear(x, w[nxt()]), reps),
           "bf16": clock(lambda: torch.nn.functional.linear(xb, wb[nxt()]), reps)}
    if native:
        row["native"] = clock(lambda: torch.ops.quantrt_cpu.int_gemm(x, nq[(i := nxt())], ns[i], nm[i], bits, None),
                              reps)
    return row


def print_table(rows: list[dict]) -> None:
    base = {r["batch"]: r["tok_s"] for r in rows if r["config"] == "hf fp32"}
    print("\n| engine / method | batch | tok/s | ms/step | steady ms/step | steady tok/s | steady CPU ms/step | vs HF fp32 | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["batch"]):
        same = "-" if r["same_as_hf_fp32"] is None else f"{100 * r['same_as_hf_fp32']:.0f}%"
        ratio = f"{r['tok_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        print(f"| {r['config']} | {r['batch']} | {r['tok_s']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['steady_ms_per_step']:.1f} | {r['steady_tok_s']:.1f} | {r['steady_cpu_ms_per_step']:.1f} | {ratio} | {same} |")
    own = {r["batch"]: r for r in rows if r["config"] == "quantrt bf16 (export)"}
    for r in rows:
        if r["config"].startswith(("quantrt int8wo", "quantrt int4wo")) and r["batch"] in own:
            o = own[r["batch"]]
            print(f"{r['config']} vs quantrt bf16 (export), batch {r['batch']}: {r['tok_s'] / o['tok_s']:.2f}x tok/s, "
                  f"{o['steady_ms_per_step'] / r['steady_ms_per_step']:.2f}x steady, "
                  f"{o['steady_cpu_ms_per_step'] / r['steady_cpu_ms_per_step']:.2f}x steady CPU time")
    peer = {r["batch"]: r for r in rows if r["config"] == "llama.cpp (gguf)"}
    for r in rows:
        if r["config"] == "quantrt bf16 (gguf)" and r["batch"] in peer:
            p = peer[r["batch"]]
            print(f"quantrt bf16 (native Q4_1) vs llama.cpp, batch {r['batch']}: {r['tok_s'] / p['tok_s']:.2f}x tok/s, "
                  f"{p['steady_ms_per_step'] / r['steady_ms_per_step']:.2f}x steady, "
                  f"{p['steady_cpu_ms_per_step'] / r['steady_cpu_ms_per_step']:.2f}x steady CPU time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--short", type=int, default=8, help="new tokens of the run subtracted for 'steady'")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--configs", type=lambda s: [c.strip() for c in s.split(",")], default=None,
                   help="comma-separated subset of row names, e.g. 'quantrt bf16 (gguf),llama.cpp (gguf)'")
    p.add_argument("--llamacpp-venv", default=str(LLAMACPP_VENV), help="venv holding llama-cpp-python")
    p.add_argument("--profile", action="store_true", help="also split quantrt fp32 step time (torch.profiler)")
    p.add_argument("--profile-bf16", action="store_true",
                   help="also profile quantrt bf16 (gguf) batch-1 decode: top ops by self time, calls per step")
    p.add_argument("--kernels", action="store_true",
                   help="also time each CPU linear path on SmolLM2's batch-1 shapes (int4 pack, int8 pack, fp32, bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and llama.cpp n_threads)")
    p.add_argument("--json", type=Path, help="write rows (and profile) here")
    p.add_argument("--cuda", action="store_true", help="the CUDA benchmark instead (bench/_cuda_decode.py): "
                   "Llama-3.1-8B-shaped random model, bf16/fp8/int4, graphs on/off, HF transformers peer")
    p.add_argument("--arch", default="llama3-8b", help="--cuda: the random model's shape: llama3-8b, qwen2.5-7b "
                   "(q/k/v biases), qwen3-8b (q/k norms) or gemma3-4b (sandwich norms, sliding windows, tied head)")
    p.add_argument("--checkpoint", default=None, help="--cuda: where the random checkpoint goes (/tmp/<arch>-random)")
    p.add_argument("--layers", type=int, default=None, help="--cuda: decoder layers (default: the model's; 32 for "
                   "Llama-3.1-8B)")
    p.add_argument("--graphs", choices=["both", "on", "off"], default="both", help="--cuda: decode-graph rows to run")
    p.add_argument("--prompt", type=int, default=None, help="--cuda: prompt tokens (default 8; long contexts)")
    args = p.parse_args()
    if args.cuda:
        from _cuda_decode import run_cuda

        if args.batches == [1, 16]:
            args.batches = [1, 64]
        run_cuda(args)
        return
    if args.quick:
        args.new, args.short, args.repeats = 16, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"load {os.getloadavg()[0]:.2f}; prompt {PROMPT_LEN} tokens, {args.new} new (steady: minus {args.short}), best of {args.repeats}")
    from quantrt.platforms.xpu import cpu_ext

    # the GGUF rows' int linears and Q8_0 head run on cpu_native_int when the extension loads
    print(f"quantrt CPU extension: {cpu_ext.status()}")
    rows = run_all(args)
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()} (other processes skew CPU timings)")
    prof = profile_split(args.batches, args.new) if args.profile else None
    if args.profile_bf16:
        prof = (prof or []) + [profile_bf16(args.new)]
    if args.kernels:
        prof = (prof or []) + [kernel_shapes()]
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "profile": prof}, indent=1))


if __name__ == "__main__":
    main()
