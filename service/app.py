"""``tandem serve``: settings -> telemetry, engine, server; run until signalled."""

from __future__ import annotations

import asyncio
import logging

from decoding.engine import EngineConfig, load_engine
from service.server import grpc_address, serve_until_signalled, start_server
from service.settings import Settings
from service.telemetry import configure_logging, setup_telemetry

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        num_speculative_tokens=settings.fixed_speculative_tokens,
        max_speculative_tokens=settings.max_speculative_tokens,
        default_max_new_tokens=settings.default_max_new_tokens,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        max_stop_strings=settings.max_stop_strings,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_queue=settings.max_queue,
        kv_token_budget=settings.kv_token_budget,
        fast_path=settings.fast_path,
        max_context=settings.max_context,
        prefill_chunk=settings.prefill_chunk,
        decode_steps=settings.decode_steps or None,
    )


async def _serve(settings: Settings) -> int:
    log.info("loading models", extra={"target": settings.target, "draft": settings.draft})
    engine = await asyncio.to_thread(
        load_engine,
        settings.target,
        settings.draft,
        engine_config(settings),
        device=settings.device,
        dtype=settings.dtype,
        draft_dtype=settings.draft_dtype or None,
        cache_dir=settings.resolved_cache_dir,
    )
    telemetry = setup_telemetry(settings, engine.info, engine.stats)
    running = await start_server(
        settings, engine, observer=telemetry, interceptors=telemetry.interceptors
    )
    print(f"tandem: serving on {grpc_address(settings.host, running.port)}", flush=True)
    try:
        return await serve_until_signalled(running, settings)
    finally:
        telemetry.shutdown()


def serve(settings: Settings) -> int:
    configure_logging(settings)
    return asyncio.run(_serve(settings))
