"""W4A16 / W8A16 at 2-4 rows: the dispatch (`TritonWNA16Kernel.apply`) next to the one-row GEMV (`skinny_wna16`)
on the same prepared weights, and bf16 cuBLAS, at the Llama-3.1-8B shapes (H100; CUDA-graph replay over weight
copies, `kernels.time_us`). What `wna16.SKINNY_M2_MAX_N` was set from.

    cd bench && python _skinny_m2.py
"""

from __future__ import annotations

import kernels as K  # bench/ is sys.path[0]
import torch

from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16


def main() -> None:
    K.REP_MS = 25
    for name in ("w8a16_g32", "w8a16_ch", "w4a16_g32", "w4a16_g32_offset"):
        for k, n in K.SHAPES:
            fns, _ = K.build(name, k, n)
            kerns = [f.__defaults__[0] for f in fns]            # the prepared kernels behind the bench closures
            bf, _ = K.build("bf16", k, n)
            row = []
            for m in (2, 3, 4):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

                def gemv(kk, x=x):
                    return skinny_wna16(x, kk.packed, kk.scale, kk.zero, kk.group, kk.container,
                                        zero_const=kk.zero_const, offset=kk.raw_offset)

                ref = kerns[0].apply(x, None).float()
                err = float((gemv(kerns[0]).float() - ref).norm() / ref.norm())
                tb = K.time_us([lambda f=f, x=x: f(x) for f in bf])
                td = K.time_us([lambda kk=kk, x=x: kk.apply(x, None) for kk in kerns])
                ts = K.time_us([lambda kk=kk: gemv(kk) for kk in kerns])
                row.append(f"M={m} bf16 {tb:.1f} dispatch {td:.1f} gemv {ts:.1f} (rel. diff {err:.1e})")
            print(f"{name} {k}x{n}: " + " | ".join(row), flush=True)
            del fns, kerns, bf
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
