"""``storm-worker``: a training job that keeps its activations in the host's stormd.

setup (daemon, model, data) -> train (progress on a terminal, log lines otherwise)
-> summary (JSON to stdout or --summary FILE) -> cleanup. With no endpoint given and
no daemon answering at the default one, it runs a private daemon for its own run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from client.hooks import offload_saved_tensors
from client.system import StormSystem
from client.transport import connect
from storm_service.endpoints import default_endpoint
from storm_service.errors import StormError
from storm_service.protocol import Op
from storm_service.units import format_bytes
from worker.distributed import Rank, init_from_env, shutdown, wrap
from worker.embedded import EmbeddedDaemon, daemon_answers
from worker.memplot import plot_traces, trace
from worker.models import TeacherData, TransformerRegressor, build_model
from worker.progress import Progress

__all__ = ["main"]

log = logging.getLogger("storm.worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="storm-worker", description="Train a model with activations offloaded to stormd.")
    p.add_argument("--endpoint", default=os.environ.get("STORM_ENDPOINT"), help="daemon endpoint [env STORM_ENDPOINT]")
    p.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--output-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=16, help="sequence length (transformer)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-offload", action="store_true", help="train the same model without STORM")
    p.add_argument("--min-bytes", type=int, default=64 << 10, help="smallest saved tensor to offload")
    p.add_argument(
        "--verify",
        action="store_true",
        default=None,
        help="checksum every saved tensor and check it when backward reads it [env STORM_VERIFY]",
    )
    p.add_argument("--pool-size", default="1GiB", help="pool of the embedded daemon, if one is started")
    p.add_argument(
        "--summary",
        metavar="FILE",
        help="write the JSON summary here instead of stdout ({rank} is replaced by the rank)",
    )
    p.add_argument("--save-params", metavar="FILE", help="save the trained parameters (torch.save; rank 0)")
    p.add_argument(
        "--linger-until-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after training, wait up to SECONDS until the daemon holds no sessions (for compose runs)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also train a few steps without and with STORM and plot private memory and pool bytes",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "hidden", "layers", "input_size", "output_size", "seq_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"storm-worker: --{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise SystemExit("storm-worker: --lr must be positive")


@contextlib.contextmanager
def _daemon_endpoint(args: argparse.Namespace) -> Iterator[tuple[str | None, bool]]:
    """Yield ``(endpoint, embedded)``: the given one, the default one, or a private daemon's."""
    if args.no_offload:
        yield None, False
    elif args.endpoint:
        yield args.endpoint, False
    elif daemon_answers(default_endpoint()):
        yield default_endpoint(), False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(
            f"storm-worker: no stormd answers at {default_endpoint()}; under torchrun every rank uses the "
            "host's daemon: start stormd first or pass --endpoint"
        )
    else:
        log.warning("no stormd at %s: starting a private one for this run", default_endpoint())
        with EmbeddedDaemon(args.pool_size) as daemon:
            yield daemon.endpoint, True


def _forward(model: nn.Module, x: torch.Tensor, system: StormSystem | None, min_bytes: int) -> torch.Tensor:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if system is not None and isinstance(inner, TransformerRegressor):
        with offload_saved_tensors(system, min_bytes=min_bytes, module=inner.encoder.layers):
            return model(x)
    return model(x)  # StormModel offloads by itself


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def train(args: argparse.Namespace, system: StormSystem | None, rank: Rank | None) -> dict[str, Any]:
    device = _device(args)
    if rank is not None and device.type == "cuda":
        device = torch.device("cuda", rank.local_rank)
    model = build_model(args.model, args.input_size, args.hidden, args.output_size, args.layers, args.seed, system)
    model.to(device)
    if rank is not None:
        model = wrap(model, device)
    data_seed = args.seed + (rank.rank if rank is not None else 0)
    data = TeacherData(args.model, args.input_size, args.output_size, args.batch, args.seq_len, data_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    progress = Progress(args.steps, sys.stderr)
    losses: list[float] = []
    peak_pool = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = data.next(device)
        loss = loss_fn(_forward(model, x, system, args.min_bytes), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        pool = None
        if system is not None and progress.due(step):
            pool = system.stats().peak_bytes
            peak_pool = max(peak_pool, pool)
        progress.update(step, losses[-1], step / (time.perf_counter() - start), pool)
    elapsed = time.perf_counter() - start
    progress.close()
    if args.save_params and (rank is None or rank.rank == 0):
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        torch.save([p.detach().cpu() for p in inner.parameters()], args.save_params)
    summary: dict[str, Any] = {
        "model": args.model,
        "offload": system is not None,
        "seed": args.seed,
        "rank": rank.rank if rank is not None else 0,
        "world_size": rank.world_size if rank is not None else 1,
        "steps": args.steps,
        "device": str(device),
        "losses": losses,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "steps_per_s": args.steps / elapsed,
        "bytes_offloaded": 0,
        "peak_pool_bytes": 0,
    }
    if system is not None:
        stats = system.stats().as_dict()
        fetches = stats["prefetch_hits"] + stats["prefetch_waits"] + stats["fetch_misses"]
        summary.update(
            bytes_offloaded=stats["offloaded_bytes"],
            peak_pool_bytes=max(peak_pool, stats["peak_bytes"]),
            session_used_bytes_after=stats["used_bytes"],
            kept_tensors=stats["kept_tensors"],
            prefetch_hit_rate=stats["prefetch_hits"] / fetches if fetches else None,
            blocking_round_trips=stats["blocking_round_trips"],
        )
    return summary


def _discard(summary: dict[str, Any]) -> None:
    """The plot needs only the memory trace of a run, not its summary."""


def _plot(args: argparse.Namespace, endpoint: str) -> None:
    """Trace a few steps without and then with STORM, and draw both (see worker/memplot.py)."""
    short = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 5), "save_params": None})
    with StormSystem(endpoint, name="storm-worker --plot") as system:
        traces = [
            trace("without offload", lambda: _discard(train(short, None, None)), endpoint),
            trace("with STORM", lambda: _discard(train(short, system, None)), endpoint),
        ]
    title = f"{args.model}: {args.layers} layers, hidden {args.hidden}, batch {args.batch}, {short.steps} steps each"
    plot_traces(traces, args.plot, title)
    log.warning("memory plot written to %s", args.plot)


def _linger(endpoint: str, timeout_s: float, summary: dict[str, Any]) -> None:
    """Wait until the daemon holds no sessions (the other jobs are done), recording what it holds."""
    deadline = time.monotonic() + timeout_s
    with connect(endpoint) as channel:
        while True:
            stats = channel.call(Op.STATS)
            summary["daemon_used_bytes_after"] = stats["used_bytes"]
            summary["daemon_sessions_after"] = len(stats["sessions"])
            if not stats["sessions"] or time.monotonic() > deadline:
                return
            time.sleep(0.2)


def _emit(summary: dict[str, Any], path: str | None) -> None:
    text = json.dumps(summary, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text, flush=True)


def _exit_cleanly_on_sigterm(summary: dict[str, Any], path: str | None) -> None:
    """Training is done: a stop request (compose stopping its peers) is a normal end."""

    def stop(signum: int, frame: object) -> None:
        _emit(summary, path)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s storm-worker %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = init_from_env(_device(args))
    if args.summary and "{rank}" in args.summary:
        args.summary = args.summary.format(rank=rank.rank if rank is not None else 0)
    try:
        with _daemon_endpoint(args) as (endpoint, embedded):
            system = (
                StormSystem(endpoint, name=f"storm-worker seed {args.seed}", verify=args.verify) if endpoint else None
            )
            try:
                summary = train(args, system, rank)
            finally:
                if system is not None:
                    system.close()
                shutdown()
            summary["endpoint"], summary["embedded_daemon"] = endpoint, embedded
            summary["verify"] = system is not None and system.verify
            if args.plot and endpoint:
                _plot(args, endpoint)
            if args.linger_until_idle > 0 and endpoint:
                summary["daemon_used_bytes_after"] = summary["daemon_sessions_after"] = None
                _exit_cleanly_on_sigterm(summary, args.summary)
                _linger(endpoint, args.linger_until_idle, summary)
    except StormError as e:
        print(f"storm-worker: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _emit(summary, args.summary)
    if summary["offload"]:
        log.info("offloaded %s; pool peak %s", format_bytes(summary["bytes_offloaded"]), summary["peak_pool_bytes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
