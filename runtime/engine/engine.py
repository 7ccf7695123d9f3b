"""The Python API: quantrt.Engine(model_path=..., quantization=..., ...).generate(...), SGLang's shape."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from quantrt.engine.kv_info import kv_cache_info
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.kv_quant import resolve_kv_cache_dtype
from quantrt.engine.model_runner import ModelRunner
from quantrt.engine.page_allocator import PageAllocator
from quantrt.engine.request import LogprobOptions, Request
from quantrt.engine.sampling_params import SamplingParams
from quantrt.engine.scheduler import Scheduler
from quantrt.engine.stop import StopChecker
from quantrt.errors import ConfigError
from quantrt.layers.attention import PagedAttention

log = logging.getLogger(__name__)


def _eos_ids(tokenizer, config) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


class Engine:
    """Load a model once, then generate for prompts. Every ServerArgs field is a keyword argument."""

    def __init__(self, progress: bool = False, platform: Any = None, **kwargs: Any):
        """`platform`: a Platform instance to run on instead of the resolved one (emulated platforms in tests)."""
        from quantrt.loader.model_loader import load_model
        from quantrt.platform import current_platform
        from quantrt.server_args import ServerArgs

        self.server_args = args = ServerArgs.from_kwargs(**kwargs)
        self.platform = platform if platform is not None else current_platform(args.device)
        self.platform.check_config(args)
        if args.random_seed is not None:
            torch.manual_seed(args.random_seed)
            random.seed(args.random_seed)
        lm = load_model(args, self.platform, progress=progress)
        self.model, self.config, self.tokenizer = lm.model, lm.config, lm.tokenizer
        self.dtype, self.quant_method, self.quant_format = lm.dtype, lm.quant_method, lm.fmt
        self.context_len = args.context_length or getattr(self.config, "max_position_embeddings", 4096)
        c = self.config
        self.kv_geometry = geo = self.model.kv_geometry()  # per-token KV rows the model declares
        qcfg = getattr(c, "quantization_config", None)
        self.kv_spec = kv_spec = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype, self.platform,
                                                        qcfg if isinstance(qcfg, dict) else None)
        kv_spec.check_shape(geo.num_kv_heads, geo.head_dim)
        if kv_spec.dtype == torch.float8_e4m3fnuz:  # same bits decode to half the value (FORMATS.md §7.7)
            for m in self.model.modules():
                if isinstance(m, PagedAttention):
                    m.k_scale, m.v_scale = 2 * m.k_scale, 2 * m.v_scale
        self.kv_bytes_per_token = geo.bytes_per_token(kv_spec)
        ps = args.page_size
        self.max_total_tokens = self._kv_capacity()
        num_pages = max(1, self.max_total_tokens // ps)
        pool = KVPool(geo.num_layers, num_pages * ps, geo.num_kv_heads, geo.head_dim, kv_spec,
                      self.platform.device(), has_v=geo.has_v)
        self.kv_pool = pool
        self.allocator = PageAllocator(num_pages, ps)
        runner = ModelRunner(self.model, pool, ps, self.platform.device())
        runner.configure_graphs(self.platform, args.disable_cuda_graph, args.cuda_graph_max_bs,
                                args.max_running_requests, self.context_len)
        self.scheduler = Scheduler(runner, self.allocator, StopChecker(self.tokenizer, _eos_ids(self.tokenizer, c)),
                                   args.max_running_requests, args.chunked_prefill_size or args.max_prefill_tokens
                                   or 8192, self.context_len,
                                   overlap=not args.disable_overlap_schedule and runner.can_overlap())
        log.info("overlap schedule: %s", self.overlap_status())
        self._rng = torch.Generator().manual_seed(args.random_seed if args.random_seed is not None
                                                  else random.randrange(2**31))
        info = self.kv_info()
        log.info("KV cache: %d tokens (%d pages of %d), %d bytes/token, %s (%s), %.0f tokens/GiB "
                 "(%.2fx bf16)", info["max_total_tokens"], num_pages, ps, info["bytes_per_token"],
                 info["kv_cache_dtype"], info["storage"], info["tokens_per_gib"], info["capacity_vs_bf16"])

    def overlap_status(self) -> str:
        """'on' or 'off: why', as the startup log and `quantrt env` print it."""
        if self.server_args.disable_overlap_schedule:
            return "off: --disable-overlap-schedule"
        if not self.scheduler.runner.can_overlap():
            return "off: needs decode graphs (" + self.scheduler.runner.graph_status() + ")"
        return "on (greedy decode steps without penalties or logprobs)"

    def kv_info(self) -> dict[str, Any]:
        """The KV cache as /get_server_info and `quantrt env` show it (see engine/kv_info.py)."""
        return kv_cache_info(self)

    def _kv_capacity(self) -> int:
        args = self.server_args
        if args.max_total_tokens:
            return args.max_total_tokens
        _, total = self.platform.memory_info()
        frac = args.mem_fraction_static or self.platform.default_mem_fraction()
        weights = _model_bytes(self.model)
        budget = frac * total - weights
        if budget <= self.kv_bytes_per_token * args.page_size:
            raise ConfigError(f"--mem-fraction-static {frac} leaves no memory for the KV cache "
                              f"(weights take {weights / 2**30:.2f} GiB of {total / 2**30:.2f} GiB)")
        cap = args.max_running_requests * self.context_len
        return int(min(budget // self.kv_bytes_per_token, cap))

    # -- requests -----------------------------------------------------------------------
    def _make_requests(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                       top_logprobs_num) -> tuple[list[Request], bool]:
        if (prompt is None) == (input_ids is None):
            raise ConfigError("generate() takes exactly one of `prompt` (text) or `input_ids`")
        single = isinstance(prompt, str) or (input_ids is not None and input_ids and isinstance(input_ids[0], int))
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise ConfigError("prompt must be a string or a list of strings")
            ids_list = [self.tokenizer.encode(p) for p in prompts]
        else:
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(ids_list)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        if len(params) != n:
            raise ConfigError(f"got {len(params)} sampling_params for {n} prompts")
        reqs = []
        vocab = self.config.vocab_size
        for i, ids in enumerate(ids_list):
            if not ids:
                raise ConfigError(f"prompt {i} is empty")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise ConfigError(f"prompt {i}: input_ids must be integers in [0, {vocab})")
            if len(ids) >= self.context_len:
                raise ConfigError(f"prompt {i} has {len(ids)} tokens; the context length is {self.context_len}")
            sp = SamplingParams.from_dict(params[i])
            start = _pick(logprob_start_len, i, -1)  # -1: output logprobs only (SGLang)
            lp = LogprobOptions(bool(_pick(return_logprob, i, False)), int(start), int(_pick(top_logprobs_num, i, 0)))
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**31, (1,), generator=self._rng))
            reqs.append(Request(uuid.uuid4().hex, ids, sp, lp, torch.Generator().manual_seed(seed)))
        return reqs, single

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None, top_logprobs_num: int | list[int] | None = None,
                 stream: bool = False):
        """Generate for one prompt (-> dict) or a list (-> list of dicts): {"text", "meta_info"}.
        With stream=True, an iterator of such dicts whose text grows (with "index" for lists)."""
        reqs, single = self._make_requests(prompt, sampling_params, input_ids, return_logprob,
                                           logprob_start_len, top_logprobs_num)
        for r in reqs:
            self.scheduler.add(r)
        if stream:
            return self._stream(reqs, single)
        self._run_until(reqs)
        out = [{"text": r.text, "output_ids": list(r.output_ids), "meta_info": r.meta_info()} for r in reqs]
        return out[0] if single else out

    def _run_until(self, reqs: list[Request]) -> None:
        try:
            while not all(r.finished for r in reqs):
                self.scheduler.step()
        except BaseException:
            for r in reqs:
                self.scheduler.abort(r.rid)
            raise

    def _stream(self, reqs: list[Request], single: bool) -> Iterator[dict]:
        index = {id(r): i for i, r in enumerate(reqs)}
        try:
            while not all(r.finished for r in reqs):
                for r in self.scheduler.step():
                    if id(r) not in index:
                        continue
                    if not r.finished:
                        self.scheduler.stop.update_text(r)
                    chunk = {"text": r.text, "output_ids": list(r.output_ids), "meta_info": r.meta_info()}
                    if not single:
                        chunk["index"] = index[id(r)]
                    yield chunk
        finally:
            for r in reqs:
                if not r.finished:
                    self.scheduler.abort(r.rid)

    def shutdown(self) -> None:
        """Abort pending requests and drop the model."""
        for r in list(self.scheduler.waiting) + list(self.scheduler.running):
            self.scheduler.abort(r.rid)
        self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _pick(v, i: int, default):
    if v is None:
        return default
    return v[i] if isinstance(v, list) else v


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers and whatever its
    kernels prepared (held_bytes.py)."""
    from quantrt.engine.held_bytes import held_bytes

    return held_bytes(model)
