"""`raysim run CONFIG [key=value ...] [--out DIR|URL] [--resume|--auto-resume] [--staging DIR]`,
`raysim pretrain CONFIG` and `raysim data export shapes DIR [key=value ...]`.

Bad input (config, overrides, run directory, checkpoints) ends with one clear
paragraph on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysim", description="Federated fine-tuning of vision-language models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment")
    run.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. rounds=5 runtime.num_workers=0")
    run.add_argument(
        "--out",
        help="run directory: a path or a filesystem URL such as s3://bucket/runs/x (default: runs/<config name>)",
    )
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    resume.add_argument(
        "--auto-resume", action="store_true", help="continue the run in --out if it holds one, else start it there"
    )
    run.add_argument(
        "--staging", metavar="DIR", help="with a URL --out: the local working copy (default: $RAYSIM_CACHE/runs/<hash>)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--timeline", metavar="FILE", help="write Ray's task timeline (chrome://tracing JSON) here")
    pre = sub.add_parser("pretrain", help="pre-train (or find cached) the base model of a config")
    pre.add_argument("config")
    pre.add_argument("overrides", nargs="*")
    data = sub.add_parser("data", help="datasets: write the embedded shapes world as an imagefolder")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    export = data_sub.add_parser("export", help="write a dataset as an imagefolder directory (images + metadata.jsonl)")
    export.add_argument("dataset", choices=["shapes"])
    export.add_argument("out", metavar="DIR", help="a new (or empty) directory")
    export.add_argument("overrides", nargs="*", help="config overrides, e.g. clients.total=10 data.shapes.examples_per_client=20")
    from raysim.deploy import jobs, k8s

    jobs.add_commands(sub)  # submit, jobs status|logs|stop|list
    k8s.add_commands(sub)  # k8s render
    return p


def _fail(message: str) -> int:
    print(f"raysim: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options such as --out.
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "handler"):  # submit, jobs, k8s: they report their own errors
        return args.handler(args)
    # Set before transformers is imported, here and (inherited) in the Ray workers: raysim
    # shows its own progress; a bar per process and model loaded or saved is noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Imported here so `raysim --help` and config errors come back fast.
    from raysim.run.checkpoint import CheckpointError
    from raysim.config import ConfigError, load_config

    _stop_on_sigterm()
    try:
        if args.command == "data":
            return _export(args)
        # The algorithm's options are checked by _run (in parallel with Ray's start-up).
        cfg = load_config(args.config, args.overrides)
        if cfg.data.dataset != "digits":  # open and check the data (every image once) before Ray starts
            from raysim.data import prepare

            cfg, _ = prepare(cfg)
        if args.command == "pretrain":
            from raysim.algorithms import options_of

            options_of(cfg, args.config)
            return _pretrain(cfg)
        return _run(cfg, args)
    except (ConfigError, CheckpointError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print("raysim: interrupted; resume with --resume", file=sys.stderr)
        return 130


def _check_reachable(address: str) -> None:
    """A host:port that nothing answers on makes ray.init wait without a word: ask first."""
    import socket

    from raysim.config import ConfigError

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray://...: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"runtime.ray_address {address}: nothing answers there ({err.strerror or err}); start the cluster's head "
            "(ray start --head) or correct the address"
        ) from None


def worker_requests(cfg) -> list[dict[str, tuple[str, float]]]:
    """Per worker group, what one worker asks Ray for: resource -> (config key, amount)."""
    rt = cfg.runtime
    out = []
    if rt.num_workers:
        need = {"CPU": ("runtime.num_cpus_per_worker", rt.num_cpus_per_worker),
                "GPU": ("runtime.num_gpus_per_worker", rt.num_gpus_per_worker)}
        need |= {r: (f"runtime.resources_per_worker.{r}", v) for r, v in rt.resources_per_worker.items()}
        out.append(need)
    for i, g in enumerate(rt.worker_groups):
        key = f"runtime.worker_groups[{i}]"
        need = {"CPU": (f"{key}.num_cpus", g.num_cpus), "GPU": (f"{key}.num_gpus", g.num_gpus)}
        out.append(need | {r: (f"{key}.resources.{r}", v) for r, v in g.resources.items()})
    return out


def _check_feasible(cfg, nodes: list[dict[str, float]]) -> None:
    """On the Ray raysim started here, a worker no node can host would be waited for forever."""
    from raysim.config import ConfigError

    def most(r: str) -> float:
        return max((n.get(r, 0.0) for n in nodes), default=0.0)

    problems = []
    for need in worker_requests(cfg):
        if any(all(node.get(r, 0.0) >= v for r, (_, v) in need.items() if v) for node in nodes):
            continue
        for r, (key, v) in sorted(need.items()):
            if v and most(r) < v:
                problems.append(
                    f"{key}: each worker asks for {r} {v:g}, but this machine has {r} {most(r):g}, so no worker could"
                    f" ever start; ask for at most {most(r):g}, or run on a cluster that has it (runtime.ray_address)"
                )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _stop_on_sigterm() -> None:
    """SIGTERM (what Kubernetes and `ray job stop` send) stops like Ctrl-C: cleanly, resumable."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _pretrain(cfg) -> int:
    from actors.protocol import LoraFineTuning
    from raysim import algorithms
    from raysim.pretrain import pretrained_base_dir

    t0 = time.perf_counter()
    algorithm = algorithms.load(cfg.algorithm.name)(cfg)
    # On the LoRA path the base follows lora.base (e.g. the MiniLM dual encoder).
    path = algorithm.base_dir if isinstance(algorithm, LoraFineTuning) else pretrained_base_dir(cfg)
    print(f"base model: {path} ({time.perf_counter() - t0:.1f}s)")
    return 0


def _export(args) -> int:
    from raysim.config import ConfigError, apply_overrides, config_from_dict
    from raysim.data.shapes import ShapesWorld, export_imagefolder

    base = {"data": {"dataset": "shapes"}, "clients": {"per_round": 1}}  # no rounds are run: any total will do
    cfg = config_from_dict(apply_overrides(base, args.overrides), "the overrides")
    if cfg.data.dataset != "shapes":
        raise ConfigError(f"raysim data export shapes writes data.dataset shapes, not '{cfg.data.dataset}'; drop that override")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty directory; choose a new one (nothing there was changed)")
    t0 = time.perf_counter()
    counts = export_imagefolder(ShapesWorld(cfg.seed, cfg.data), cfg.clients.total, out)
    print(
        f"wrote {counts['train']} scenes of {cfg.clients.total} clients to {out / 'train'} and {counts['test']} test scenes "
        f"to {out / 'test'} ({time.perf_counter() - t0:.1f}s). Train on them with: data.dataset=local data.path={out} "
        "data.partition=by_column data.columns.client=client clients.total=auto"
    )
    return 0


def _load_engine(cfg, source: str):
    """Check `algorithm.options` and import the engine: this imports torch, transformers and
    the algorithm (seconds), so in Ray mode it runs while Ray starts."""
    from raysim import algorithms, capabilities
    from raysim.run import groups

    algorithms.options_of(cfg, source)
    algorithm = algorithms.load(cfg.algorithm.name)(cfg)
    capabilities.check(cfg, algorithm, source)  # an option it cannot honour: exit 2, nothing run
    if cfg.runtime.worker_groups:  # a family the algorithm does not have: fail before the run starts
        groups.resolve(cfg, algorithm, source)
    from raysim.run.engine import Engine

    return Engine


def _start_ray(cfg, load_engine):
    """ray.init in this thread while `load_engine` runs in another; returns the engine class.
    A bad config stops Ray again and raises the ConfigError."""
    import threading

    import ray

    loaded: dict = {}

    def load() -> None:
        try:
            loaded["engine"] = load_engine()
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the main thread
            loaded["error"] = err

    thread = threading.Thread(target=load, name="raysim-import", daemon=True)
    thread.start()
    rt = cfg.runtime
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray starts its workers at nice 15. Here they do the training, and while they import
    # torch this process serves clients inline at nice 0: niced, they would take the
    # leftovers of the cores and start late (measured: never within a 60-round run at load 2).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not ray.is_initialized():
        if rt.ray_address:
            _check_reachable(rt.ray_address)
            ray.init(address=rt.ray_address, logging_level="ERROR")
        else:
            # address="local": always a new embedded Ray, never a `ray start` cluster found on the machine
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
            try:
                _check_feasible(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
            except Exception:
                thread.join()
                ray.shutdown()
                raise
        _stop_on_sigterm()  # ray.init installs its own, which dumps a stack and aborts
    thread.join()
    if "error" in loaded:
        ray.shutdown()
        raise loaded["error"]
    return loaded["engine"]


def _run(cfg, args) -> int:
    from rich.console import Console

    from raysim.run.checkpoint import CheckpointError
    from raysim.config import ConfigError

    from raysim.run.report import summary_table

    from raysim.run.storage import Mirror, is_url

    console = Console(stderr=False, quiet=args.quiet)
    rt = cfg.runtime
    if cfg.privacy.dp and cfg.privacy.noise_multiplier == 0:
        print("raysim: warning: privacy.noise_multiplier 0 clips updates but adds no noise: there is no privacy, "
              "and epsilon is reported as Infinity", file=sys.stderr)
    if args.timeline and not Path(args.timeline).resolve().parent.is_dir():  # else found only after the run
        raise ConfigError(f"--timeline {args.timeline}: its directory does not exist; create it or choose another path")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty; give a directory (or leave --out out: runs/<name>)")
    if args.out and is_url(args.out):
        Mirror(args.out, args.staging).check(rt.num_workers)  # an unusable URL fails before Ray starts
        out = run_dir = args.out
        staging = str(Path(args.staging).absolute()) if args.staging else None
    else:
        if args.staging:
            raise ConfigError(f"--staging is for a URL --out (s3://..., gs://...); --out {args.out} is a local path")
        out = Path(args.out or Path("runs") / cfg.name)
        run_dir, staging = str(out.resolve()), None
    resume = "auto" if args.auto_resume else args.resume
    load_engine = functools.partial(_load_engine, cfg, args.config)

    from raysim.run.memory import PeakMemorySampler

    # Sampled from the start: the peak of the whole process tree (Ray, workers) lands in summary.json.
    with PeakMemorySampler() as memory:
        cli_rss = lambda: 0.0  # noqa: E731 - the engine's process reports its own peak
        in_process = None  # the engine, when it runs in this process
        started_ray = False
        if rt.num_workers == 0 or rt.driver == "process":  # the round loop runs in this process
            if rt.num_workers == 0:
                engine = load_engine()(cfg, str(out), resume, staging)
            else:
                import ray

                started_ray = not ray.is_initialized()  # else the caller's Ray (tests, notebooks): left running
                engine = _start_ray(cfg, load_engine)(cfg, run_dir, resume, staging)
            call = lambda method, *a: getattr(engine, method)(*a)  # noqa: E731
            shutdown = lambda: None  # noqa: E731
            in_process = engine
        else:
            import ray

            engine_cls = _start_ray(cfg, load_engine)
            # Imported after Ray started: both import torch.
            from actors.driver import Driver
            from actors.worker import peak_rss_mb

            driver = Driver.remote(engine_cls, cfg, run_dir, resume, staging)
            cli_rss = peak_rss_mb

            def call(method, *a):
                try:
                    return ray.get(driver.call.remote(method, *a))
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, (ConfigError, CheckpointError)):
                        raise cause from None
                    raise

            shutdown = lambda: ray.kill(driver)  # noqa: E731

        status = call("start")
        _show(console, status["last"], cfg.rounds)
        while not call("done"):
            _show(console, call("run_round"), cfg.rounds)
        # In this process the curves are drawn while Ray shuts down (Engine.finish, wait=False).
        summary = call("finish", cli_rss(), memory.sample(), in_process is None)
        shutdown()
        if args.timeline:
            if rt.num_workers:
                import ray

                ray.timeline(filename=args.timeline)
                console.print(f"timeline: {args.timeline}")
            else:
                console.print("--timeline needs Ray (runtime.num_workers > 0); local mode has no Ray tasks")
        if in_process is not None:
            if started_ray:
                import ray

                ray.shutdown()
            in_process.close()
    console.print(summary_table(summary))
    console.print(f"run directory: {out}")
    return 0


def _show(console, rec: dict, rounds: int) -> None:
    parts = [f"round {rec['round']:>3}/{rounds}"]
    for k in ("accuracy", "i2t_r1", "t2i_r1", "train_loss"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.3f}")
    if rec["round"]:
        parts.append(f"{rec['wall_s']:.2f}s")
        parts.append(f"up {rec['bytes_up'] / 1e3:.0f} kB")
    console.print("  ".join(parts), soft_wrap=True)


def console_main() -> None:
    """The `raysim` command."""
    exit_without_teardown(main())


def exit_without_teardown(code: int) -> None:
    """End the process: exit handlers run (Ray's shutdown, logging) and the streams are
    flushed, but the interpreter's teardown is skipped: it takes about 1 s once torch,
    transformers and peft are imported, and by now every file the run wrote is closed."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
