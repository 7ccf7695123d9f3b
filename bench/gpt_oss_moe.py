"""gpt-oss MoE block throughput: MXFP4 experts (the platform's MoE kernel: the Triton fused MoE kernel
on CUDA, the reference elsewhere) vs the same weights dequantized to the compute dtype (grouped
torch._grouped_mm on CPU, the Triton fused MoE kernel on CUDA), with gpt-oss-20b's layer shape by default (H = I = 2880, 32 experts, top-4).

    python bench/gpt_oss_moe.py [--experts 32 --top-k 4 --hidden 2880 --inter 2880 --tokens 1,8,64]
                                [--dtype bfloat16] [--iters 20] [--skip-dense] [--e2e | --e2e-only]

On CUDA a second table times the MXFP4 block (router + `triton_moe`) as CUDA-graph replays (the decode
setting: no host launch cost) with the activation fused into the first launch's epilogue (the kernel as
it is) vs unfused (the path before: the gate/up GEMM writes [P, 2I] fp32, the clamped SwiGLU runs as
torch ops, then the down GEMM; reproduced here from the same prepared kernel). `--e2e` adds greedy decode
of a small gpt-oss-shaped model (`--e2e-layers` layers of H = I = `--e2e-hidden`, the same experts / top-k,
online MXFP4 experts) through the engine with decode graphs on and off.
"""

from __future__ import annotations

import argparse
import time

import torch

from quantrt.layers.moe.gpt_oss_block import GptOssMoE
from quantrt.platform import current_platform
from quantrt.quant.formats.mxfp4 import Mxfp4Format
from quantrt.quant.moe_kernel import expert_activation


def build(e: int, k: int, h: int, i: int, mxfp4: bool, dtype: torch.dtype, platform, seed: int = 0) -> GptOssMoE:
    """A block fed random checkpoint tensors: MXFP4 blocks/scales, or their exact dense dequantization."""
    g = torch.Generator().manual_seed(seed)
    fmt = Mxfp4Format() if mxfp4 else None
    block = GptOssMoE("m", h, i, e, k)
    for proj, (n, kk) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
        blocks = torch.randint(0, 256, (e, n, kk // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 124, (e, n, kk // 32), dtype=torch.uint8, generator=g)
        if mxfp4:
            block.claim(f"m.experts.{proj}_blocks", blocks, fmt)
            block.claim(f"m.experts.{proj}_scales", scales, fmt)
        else:
            dense = torch.stack([w.dequantize() for w in Mxfp4Format().make_experts(
                proj, {"blocks": blocks, "scales": scales}, (e, n, kk))])
            block.claim(f"m.experts.{proj}", dense.transpose(1, 2).contiguous(), fmt)   # [E, K, N]
    block.claim("m.router.weight", torch.randn(e, h, generator=g) * 0.02, fmt)
    block.claim("m.router.bias", torch.zeros(e), fmt)
    block.claim("m.experts.gate_up_proj_bias", torch.randn(e, 2 * i, generator=g) * 0.01, fmt)
    block.claim("m.experts.down_proj_bias", torch.randn(e, h, generator=g) * 0.01, fmt)
    assert not block.missing()
    block.finish_loading(dtype, platform.device(), platform)
    return block


def timed(fn, iters: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters * 1e6


def unfused_experts(block: GptOssMoE, x: torch.Tensor) -> torch.Tensor:
    """The triton_moe path before the epilogue fusion, on the same prepared kernel: gate/up GEMM -> [P, 2I]
    fp32 (interleaved pairs), clamped SwiGLU as torch ops, down GEMM, top-k sum."""
    from quantrt.platforms.cuda.kernels.moe_triton import moe_align

    kern = block.kernel
    weights, ids = block.route(x)
    t, k = ids.shape
    p, i = t * k, kern.inter
    cfg = kern.config(p)
    sid, eid = moe_align(ids, kern.num_experts, cfg.block_m)
    gu = kern._gemm(x, kern.w13, 2 * i, sid, eid, p, k, None, cfg, kern.b13)                      # [P, 2I] fp32
    hh = expert_activation(kern.activation, gu[:, 0::2], gu[:, 1::2])                                # [P, I] fp32
    y = kern._gemm(hh.to(x.dtype), kern.w2, kern.hidden, sid, eid, p, 1,
                   weights.reshape(-1).float().contiguous(), cfg, kern.b2)                           # [P, H] fp32
    return y.view(t, k, -1).sum(1).to(x.dtype)


def graph_us(fn, iters: int) -> float:
    """Mean µs of CUDA-graph replays of fn (captured after two warm-up calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, iters, torch.cuda.synchronize)


def graph_table(q: GptOssMoE, a) -> None:
    print("\n| tokens | fused activation, graph µs | unfused (before), graph µs | fused / unfused | max abs diff |")
    print("|---|---|---|---|---|")
    for t in (int(s) for s in a.tokens.split(",")):
        x = (torch.randn(t, a.hidden, generator=torch.Generator().manual_seed(t)) * 0.5).to("cuda", q.dtype)
        tf = graph_us(lambda x=x: q(x), a.iters * 5)
        tu = graph_us(lambda x=x: unfused_experts(q, x), a.iters * 5)
        diff = float((q(x).float() - unfused_experts(q, x).float()).abs().max())
        print(f"| {t} | {tf:.1f} | {tu:.1f} | {tf / tu:.2f} | {diff:.3g} |")


def e2e(a) -> None:
    """Greedy decode of a small gpt-oss-shaped model, decode graphs on vs off (batch 1 and 8)."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, GptOssConfig, PreTrainedTokenizerFast

    from quantrt import Engine

    h = a.e2e_hidden
    cfg = GptOssConfig(vocab_size=32000, hidden_size=h, intermediate_size=h, head_dim=64, num_hidden_layers=a.e2e_layers,
                       num_attention_heads=h // 64, num_key_value_heads=max(1, h // 512),
                       num_local_experts=a.experts, num_experts_per_tok=a.top_k, sliding_window=128,
                       max_position_embeddings=4096, eos_token_id=2, bos_token_id=0, pad_token_id=0)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d, safe_serialization=True)
        tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(cfg.vocab_size)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t2", pad_token="t0").save_pretrained(d)
        print(f"\ne2e: gpt-oss-shaped, {a.e2e_layers} layers, H = I = {h}, {a.experts} experts top-{a.top_k}, "
              f"MXFP4 experts (online), bf16, {a.e2e_new} new tokens after 8-token prompts")
        print("| graphs | batch | steady ms/step | tok/s (steady) |")
        print("|---|---|---|---|")
        for graphs in (False, True):
            eng = Engine(model_path=d, dtype="bfloat16", quantization="mxfp4", max_total_tokens=8192,
                         disable_cuda_graph=not graphs, random_seed=0)
            for b in (1, 8):
                prompts = [[(7 * r + j) % 30000 + 3 for j in range(8)] for r in range(b)]

                def run(n, prompts=prompts, eng=eng):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                                     "ignore_eos": True})
                    torch.cuda.synchronize()
                    return time.perf_counter() - t0

                run(a.e2e_new)                                              # warm-up (compiles, captures)
                steady = (run(a.e2e_new) - run(8)) / (a.e2e_new - 8)
                print(f"| {'on' if graphs else 'off'} | {b} | {steady * 1e3:.2f} | {b / steady:.0f} |")
            print(f"  ({eng.scheduler.runner.graph_status()})")
            eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--inter", type=int, default=2880)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-dense", action="store_true", help="no dense block (its CPU-side build is slow)")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end decode table")
    ap.add_argument("--e2e-layers", type=int, default=4)
    ap.add_argument("--e2e-hidden", type=int, default=1024)
    ap.add_argument("--e2e-new", type=int, default=40)
    a = ap.parse_args()
    platform, dtype = current_platform(), getattr(torch, a.dtype)
    if a.e2e_only:
        e2e(a)
        return
    sync = torch.cuda.synchronize if platform.device_type == "cuda" else (lambda: None)
    q = build(a.experts, a.top_k, a.hidden, a.inter, True, dtype, platform)
    d = None if a.skip_dense else build(a.experts, a.top_k, a.hidden, a.inter, False, dtype, platform)
    print(f"platform {platform.name}; mxfp4 experts: {q.impl} [{q.kernel_desc}]; dense: {d.impl if d else 'skipped'}")
    expert_bytes = 3 * a.hidden * a.inter                                    # one expert's weights, elements
    print("| tokens | experts hit | mxfp4 us | dense us | mxfp4 / dense | mxfp4 GB/s (weights) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for t in (int(s) for s in a.tokens.split(",")):
        x = (torch.randn(t, a.hidden, generator=torch.Generator().manual_seed(t)) * 0.5).to(platform.device(), dtype)
        hit = int(q.route(x)[1].unique().numel())
        tq = timed(lambda x=x: q(x), a.iters, sync)
        td = timed(lambda x=x: d(x), a.iters, sync) if d else float("nan")
        diff = float((q(x).float() - d(x).float()).abs().max()) if d else float("nan")
        gbs = hit * expert_bytes * (0.5 + 1 / 32) / (tq * 1e-6) / 1e9       # fp4 codes + e8m0 bytes
        print(f"| {t} | {hit} | {tq:.0f} | {td:.0f} | {tq / td:.2f} | {gbs:.0f} | {diff:.3g} |")
    if platform.device_type == "cuda" and q.impl == "triton_moe":
        graph_table(q, a)
    if a.e2e:
        e2e(a)


if __name__ == "__main__":
    main()
