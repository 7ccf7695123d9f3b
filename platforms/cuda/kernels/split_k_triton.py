"""The split-K epilogue shared by the tensor-core linears (`tc_wna16`, `swap_fp8`; imported lazily).

With SPLIT == 1 the program stores its tile. Otherwise each split stores its fp32 partial into the workspace
`ws` [SPLIT, M, N], and the last split to arrive at a tile (an acq_rel counter per tile, `split_counters`)
sums the partials in split order, stores the output and resets the counter for the next launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT: tl.constexpr):
    # acc: fp32 tile; ym / ymask: its offsets into y [M, N] and their mask (same shape as acc)
    if SPLIT == 1:
        tl.store(y_ptr + ym, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(ws_ptr + pid_k * M * N + ym, acc, mask=ymask)
        tl.debug_barrier()                                          # every thread's partial is stored
        tile = pid_m * tl.num_programs(0) + pid_n
        cnt = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tot = tl.zeros(acc.shape, dtype=tl.float32)
            for sp in range(SPLIT):
                tot += tl.load(ws_ptr + sp * M * N + ym, mask=ymask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + ym, tot.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
