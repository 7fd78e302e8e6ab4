"""lockstep's command line.

    python controller/main.py --mesh local-cpu [--config FILE] [--steps N] [--dry-run] [section.key=value ...]
    python controller/main.py --resume RUN_DIR [--steps N] [section.key=value ...]
    lockstep run --mesh local-cpu [--config FILE] [--steps N] [--dry-run] [section.key=value ...]
    lockstep audit --run RUN_DIR [--mesh MESH]    (also: python controller/main.py audit ...)
    lockstep worker [--port 22222] [--host NAME] [--bind IP]    (a host for launchers hosts and slurm)

With no --config it runs the embedded default: the built-in arithmetic task on a tiny
randomly initialised model, on this machine's CPU. `--dry-run` prints where every proc of the
mesh would run and starts nothing. `--resume` continues a run from its latest checkpoint, bit
for bit, up to loop.steps (or --steps) in all. `audit` re-runs the sample a run's strict
barrier halted on (saved in RUN_DIR/audit/) and names the first module whose outputs differ.
`worker` serves Monarch procs on this host until the process is stopped; a controller attaches.
"""

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script path: drop controller/ from sys.path, so its config.py, data.py, ...
    # cannot shadow top-level modules of the same name; everything imports as lockstep.*.
    sys.path.pop(0)

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", default=None, help="mesh config name (mesh_configs/) or YAML path "
                        "(default: local-cpu; with --resume, the run's)")
    parser.add_argument("--config", default=None, help="run config YAML (default: the built-in demo)")
    parser.add_argument("--steps", type=int, default=None, help="number of steps (overrides loop.steps)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (its log dir) from its latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print where each proc would run (role, host, rank, GPU) and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. trainer.lr=3e-4")


def run(args: argparse.Namespace) -> int:
    from lockstep.actors.reward import RewardError
    from lockstep.controller.barrier import BarrierError
    from lockstep.controller.config import ConfigError, parse_overrides
    from lockstep.controller.loop import WeightMismatchError
    from lockstep.controller.meshes import describe
    from lockstep.controller.session import ActorTimeout, MeshError, Session

    try:
        overrides = parse_overrides(args.overrides)
        if args.steps is not None:
            overrides.setdefault("loop", {})["steps"] = str(args.steps)
        if args.resume:
            session = Session.resume(args.resume, mesh=args.mesh, config=args.config, **overrides)
        else:
            session = Session(args.config, mesh=args.mesh or "local-cpu", **overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(session.mesh_config))
        print("dry run: nothing was started")
        return 0
    try:
        with _quiet_monarch_exit(), session:
            print(f"lockstep: mesh {session.mesh_config.name}, logs in {session.log_dir} "
                  f"(tensorboard --logdir {session.log_dir})")
            ran = session.run()
            if ran and "reward/mean" in ran[-1]:
                print(f"lockstep: {session.num_steps_done} steps, mean reward "
                      f"{ran[0]['reward/mean']:.3f} -> {ran[-1]['reward/mean']:.3f}")
    except (ValueError, FileNotFoundError, RewardError, BarrierError, MeshError, ActorTimeout,
            WeightMismatchError) as e:  # a HostError (a host not found or gone) is a MeshError
        if os.environ.get("LOCKSTEP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)  # LOCKSTEP_DEBUG=1 shows the traceback
        return 1
    return 0


@contextlib.contextmanager
def _quiet_monarch_exit():
    """Around a session: at exit, shut Monarch's client down with time to spare, before its own
    exit hook (atexit runs last-registered first), which allows 1 s and prints a traceback when
    that is not enough (a loaded machine, a lost host). Registered after the client exists."""
    try:
        yield
    finally:
        atexit.unregister(_shutdown_monarch)
        atexit.register(_shutdown_monarch)


def _shutdown_monarch() -> None:
    from monarch.actor import shutdown_context

    try:
        shutdown_context(host_timeout=5.0).get(timeout=30.0)
    except Exception:
        pass  # best effort, at exit: the run's own result is already out


def _add_audit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the run's log dir (it holds config.json and audit/)")
    parser.add_argument("--mesh", default=None, help="mesh config (default: the run's)")


def audit(args: argparse.Namespace) -> int:
    """Restart the run's meshes on the weights the failing sample was made with, audit it, print the report."""
    import json

    from lockstep.controller import audit as audit_mod
    from lockstep.controller.session import Session

    run_dir = os.path.abspath(args.run)
    saved_dir = os.path.join(run_dir, audit_mod.AUDIT_DIR)
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        failed = audit_mod.FailedSample.load(os.path.join(saved_dir, audit_mod.FAILURE_FILE))
        config = saved["config"]
        # This session's own logs go under audit/, leaving the run's untouched.
        config["loop"].update(log_dir=os.path.join(saved_dir, "rerun"), checkpoint_dir=os.path.join(saved_dir, "rerun"))
        config.setdefault("generator", {})["enforce_eager"] = True  # the audit's hooks need eager forwards
        session = Session(config, mesh=args.mesh or saved.get("mesh_source", saved["mesh"]), echo=False)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: lockstep audit --run {args.run}: {e}", file=sys.stderr)
        return 2
    try:
        with _quiet_monarch_exit(), session:
            session.load(os.path.join(saved_dir, audit_mod.CHECKPOINT_DIR))
            print(session.audit(failed).summary())
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # MeshError, ActorTimeout are RuntimeErrors
        if os.environ.get("LOCKSTEP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=22222, help="TCP port to listen on (the mesh config's launcher.port)")
    parser.add_argument("--host", default=None, help="name the controller reaches this host by (default: its hostname)")
    parser.add_argument("--bind", default=None, help="IP to listen on, if not the one --host resolves to (e.g. 0.0.0.0)")


def worker(args: argparse.Namespace) -> int:
    """Serve Monarch procs on this host until stopped (Monarch's run_worker_loop_forever)."""
    import ipaddress
    import socket

    from monarch.actor import run_worker_loop_forever

    host = args.host or socket.gethostname()
    address = f"tcp://{host}:{args.port}"
    if args.bind is not None:
        try:
            bind = ipaddress.ip_address(args.bind)
        except ValueError:
            print(f"error: lockstep worker --bind {args.bind}: not an IP address (e.g. 0.0.0.0)", file=sys.stderr)
            return 2
        # Monarch's alias form: dialled at the first address, listening on the second.
        address += f"@tcp://{f'[{bind}]' if bind.version == 6 else bind}:{args.port}"
    print(f"lockstep worker: serving Monarch procs at {address} (stop with Ctrl-C)", file=sys.stderr, flush=True)
    try:
        run_worker_loop_forever(address=address, ca="trust_all_connections")
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # e.g. the port is taken
        print(f"error: lockstep worker at {address}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """python controller/main.py [run args] | python controller/main.py audit|worker ..."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["audit"], ["worker"]):
        return cli(argv)
    parser = argparse.ArgumentParser(prog="controller/main.py", description=__doc__.splitlines()[0])
    _add_run_args(parser)
    return run(parser.parse_args(argv))


def cli(argv: list[str] | None = None) -> int:
    """The `lockstep` console command: `lockstep run ...`, `lockstep audit --run DIR`, `lockstep worker`."""
    parser = argparse.ArgumentParser(prog="lockstep", description="On-policy RL with bitwise-equal logprobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_args(commands.add_parser("run", help="train (same as python controller/main.py)"))
    _add_audit_args(commands.add_parser("audit", help="name the first module where generator and trainer differ"))
    _add_worker_args(commands.add_parser("worker", help="serve Monarch procs on this host (launchers hosts, slurm)"))
    args = parser.parse_args(argv)
    return {"audit": audit, "worker": worker, "run": run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
