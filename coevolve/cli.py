"""`coevolve ...`: single steps, the whole loop, the data stores, the Prefect deployment."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from coevolve.core import rundir, runlock
from coevolve.core.config import Config, prepare_run
from coevolve.core.errors import InputError
from coevolve.core.quiet import VERBOSE_ENV, prefect_telemetry_off
from coevolve.core.runner import run_loop, run_step
from coevolve.core.step import StepCrashed, setup_logging
from coevolve.core.steps import STEPS


def finished(cfg: Config, run_dir: Path) -> None:
    """Where `coevolve run` left the policy, the RM and the report, and whether the policy improved."""
    final_policy = rundir.latest_output(run_dir, "policy")
    final_rm = rundir.latest_output(run_dir, "rm")
    print(
        f"\nDone. Run directory: {run_dir}\n  policy: {final_policy}\n  rm:     {final_rm}\n  report: coevolve report {run_dir}"
    )
    if cfg.steps.evaluate:
        from coevolve.report import before_after

        summary = before_after(run_dir)
        if summary:
            print("\n" + summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="coevolve", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="keep the third-party warnings filtered out (core/quiet.py)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_step = sub.add_parser("step", help="run one step in this process")
    p_step.add_argument("name", help=f"one of {', '.join(STEPS)} (coevolve/core/steps.py)")
    p_step.add_argument("--run-dir", required=True, type=Path)
    p_step.add_argument("--iteration", required=True, type=int)
    p_step.add_argument("--config", help="YAML config (needed only when the run directory has none yet)")
    p_step.add_argument("--force", action="store_true", help="redo the step even if it finished (implies --redo)")
    p_step.add_argument(
        "--redo", action="store_true", help="accept overrides of fields finished steps were made from; those go stale"
    )
    p_step.add_argument("overrides", nargs="*", help="key.sub=value")

    p_run = sub.add_parser("run", help="the whole loop, each step its own process")
    p_run.add_argument("--config")
    p_run.add_argument("--run-dir", required=True, type=Path)
    p_run.add_argument("--force", action="store_true", help="redo every step")
    p_run.add_argument(
        "--redo",
        action="store_true",
        help="accept overrides of fields finished steps were made from, and redo those steps",
    )
    p_run.add_argument("overrides", nargs="*", help="key.sub=value")

    p_exp = sub.add_parser(
        "experiment", help="the loop under several arms and seeds, and a table of the evaluate step's measurements"
    )
    p_exp.add_argument("--config", required=True)
    p_exp.add_argument("--run-dir", required=True, type=Path, help="one run per arm and seed goes in RUN/ARM/seed_S")
    p_exp.add_argument(
        "--arms",
        default="frozen-rm,mutual-taught",
        help="comma-separated; frozen-rm, mutual-taught, mutual-taught+seft, oracle, "
        "their -online versions (GRPO E-step), mt-no-selection, mt-no-filter, mt-original-pairs",
    )
    p_exp.add_argument("--seeds", type=int, default=1)
    p_exp.add_argument("--parallel", type=int, default=1, help="runs at once (e.g. several small runs sharing one GPU)")
    p_exp.add_argument(
        "--deadline-s",
        type=float,
        help="stop runs still going after this many seconds; the table keeps what they finished",
    )
    p_exp.add_argument("overrides", nargs="*", help="key.sub=value, applied to every arm")

    p_data = sub.add_parser("data", help="the run's retrospective data stores")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_show = data_sub.add_parser("show", help="counts per iteration, difficulty histogram")
    p_show.add_argument("run_dir", type=Path)
    p_export = data_sub.add_parser("export", help="export a store for trl / OpenRLHF")
    p_export.add_argument("run_dir", type=Path)
    p_export.add_argument("--kind", required=True)
    p_export.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p_export.add_argument("--out", type=Path)

    p_flow = sub.add_parser(
        "flow", help="the whole loop as the Prefect flow (a local server is started if none is set)"
    )
    p_flow.add_argument("--config")
    p_flow.add_argument("--run-dir", required=True)
    p_flow.add_argument("overrides", nargs="*", help="key.sub=value")

    p_serve = sub.add_parser("serve", help="register the Prefect deployments and serve their runs until stopped")
    p_serve.add_argument("--config")
    p_serve.add_argument("--run-dir", required=True, help="may hold {flow_run_name}: a directory per run")
    p_serve.add_argument(
        "--name", default="coevolve", help="the deployments are NAME-loop (a whole run) and NAME-step (one step)"
    )
    p_serve.add_argument("--cron", help="a schedule for the run deployment, besides the config's serve.schedules")
    p_serve.add_argument("--interval", type=float, help="seconds between scheduled runs")
    p_serve.add_argument("--gpu-limit", help="global concurrency limit counting this host's GPUs")
    p_serve.add_argument("overrides", nargs="*", help="key.sub=value")

    p_servers = sub.add_parser(
        "servers", help="the step servers in this user's runtime folder (coevolve/core/stepserver.py)"
    )
    p_servers.add_argument(
        "--stop", action="store_true", help="stop this checkout's (they also stop after launch.server_idle_s idle)"
    )
    p_servers.add_argument("--all", action="store_true", help="with --stop: every checkout's, and their running steps")

    p_report = sub.add_parser("report", help="an HTML page with plots of a run, read from its run directory")
    p_report.add_argument("run_dir", type=Path)
    p_report.add_argument("--out", type=Path, help="where the page goes (default RUN/report)")

    # Overrides may come after the options too (`step e-step --iteration 1 e_step.beta=0.1`), where
    # argparse, having filled the positional list right after the step name, no longer takes them.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # for the steps this command launches too
    setup_logging()
    try:
        if args.command in ("step", "run"):
            # The lock first: the config check and save below, and the steps, see the run as no one else changes it.
            with runlock.held(args.run_dir, shlex.join(["coevolve", *(sys.argv[1:] if argv is None else argv)])):
                cfg = prepare_run(args.config, args.overrides, args.run_dir, redo=args.redo or args.force)
                if args.command == "step":
                    run_step(args.name, args.run_dir, args.iteration, cfg, args.force)
                else:
                    run_loop(cfg, args.run_dir, args.force)
                    finished(cfg, args.run_dir)
        elif args.command == "experiment":
            from coevolve.experiment import run_experiment

            summary = run_experiment(
                args.config,
                args.overrides,
                args.run_dir,
                args.arms.split(","),
                args.seeds,
                args.parallel,
                args.deadline_s,
            )
            if summary["failed"]:
                raise SystemExit(f"coevolve: {len(summary['failed'])} run(s) failed: {summary['failed']}")
        elif args.command == "flow":
            prefect_telemetry_off()
            from coevolve.flows.coevolution import coevolve

            print(coevolve(run_dir=args.run_dir, config=args.config, overrides=args.overrides))
        elif args.command == "serve":
            prefect_telemetry_off()
            from coevolve.flows.serve import serve

            serve(args.config, args.overrides, args.run_dir, args.name, args.cron, args.interval, args.gpu_limit)
        elif args.command == "servers":
            from coevolve.core.stepserver import code_location, list_servers, runtime_dir, stop_servers

            folder = runtime_dir(dict(os.environ))
            for pid, log_path, code in list_servers(folder):
                print(f"step server {pid}  log: {log_path}  code: {code or 'unknown'}")
            if args.stop:
                stop_servers(folder, None if args.all else code_location())
        elif args.command == "report":
            from coevolve.report import write_report

            print(write_report(args.run_dir, args.out))
        elif args.command == "data":
            from coevolve.data.export import export
            from coevolve.data.export import summary as store_summary

            if args.data_command == "show":
                print(store_summary(args.run_dir))
            else:
                out = args.out or args.run_dir / "exports" / f"{args.kind}.{args.format}"
                print(export(args.run_dir, args.kind, args.format, out))
    except InputError as err:
        # One clear line for the user's mistakes (core/errors.py); any other error is a bug, and keeps its
        # traceback: in the step's log for a step (StepCrashed, below), on the console elsewhere.
        print(f"coevolve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except StepCrashed as err:
        # The traceback is in the step's log, which the line names.
        print(f"coevolve: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
