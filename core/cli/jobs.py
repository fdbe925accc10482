"""CLI commands for training jobs and the worker: `worker`, `jobs list|show|cancel|fail-stale|workers`."""

from __future__ import annotations

from typing import Annotated

import typer

from core.cli.app import ActorOpt, JsonOpt, ProdcatTyper, actor_or_default, app, open_db, print_json
from core.jobs import queue as jobs
from core.schema import JobStatus

jobs_app = ProdcatTyper(
    help="Training jobs: list, show progress and errors, cancel, fail jobs whose worker died.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(jobs_app, name="jobs")

JobIdArg = Annotated[int, typer.Argument(help="Training job id (see `jobs list`).", min=1)]


@app.command("worker")
def worker_command(
    once: Annotated[bool, typer.Option("--once", help="Run at most one queued job, then exit.")] = False,
    exit_when_idle: Annotated[
        float | None, typer.Option("--exit-when-idle", min=0, help="Exit after this many seconds without a job.")
    ] = None,
    poll: Annotated[
        float | None, typer.Option("--poll", min=0.01, help="Seconds between looks for a job (default: settings).")
    ] = None,
) -> None:
    """Run a training worker here (the same as `python -m core.jobs.worker`); Ctrl-C fails the running job and stops."""
    from core.jobs import worker

    argv = ["--once"] if once else []
    if exit_when_idle is not None:
        argv += ["--exit-when-idle", str(exit_when_idle)]
    if poll is not None:
        argv += ["--poll", str(poll)]
    code = worker.main(argv)
    if code:
        raise typer.Exit(code)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s ago"


def _summary(view: jobs.JobView) -> str:
    report = view.report
    bits = [f"#{view.id}", view.status, view.mode, f"by {view.requested_by}", f"{view.created_at:%Y-%m-%d %H:%M}"]
    if view.status == JobStatus.RUNNING:
        phase = report.phase or "starting"
        if report.epochs:
            phase += f" epoch {report.epoch}/{report.epochs}"
        bits.append(f"{phase}, heartbeat {_age(view.heartbeat_age_s)}")
        if view.cancel_requested:
            bits.append("cancel requested")
    if view.model_version_id is not None:
        bits.append(f"model v{view.model_version_id}")
    if view.status in (JobStatus.FAILED, JobStatus.CANCELLED) and view.error:
        bits.append(view.error.splitlines()[0])
    return "  ".join(bits)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many of the newest jobs.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List training jobs, newest first."""
    views = jobs.list_jobs(open_db(), limit=limit)
    if as_json:
        print_json(views)
        return
    if not views:
        typer.echo("no training jobs yet: queue one with `train`")
        return
    for view in views:
        typer.echo(_summary(view))


@jobs_app.command("show")
def jobs_show(job_id: JobIdArg, as_json: JsonOpt = False) -> None:
    """One job: status, parameters, latest progress, per-epoch history and the full error text."""
    view = jobs.get_job(open_db(), job_id)
    if as_json:
        print_json(view)
        return
    typer.echo(_summary(view))
    typer.echo(f"  parameters: {view.params or '(defaults)'}")
    if view.worker_id:
        typer.echo(f"  worker: {view.worker_id}")
    latest = {k: v for k, v in view.progress.items() if k != "history" and v is not None}
    if latest:
        typer.echo(f"  progress: {latest}")
    for point in view.history:
        numbers = ", ".join(f"{k} {point[k]:.4f}" for k in ("loss", "train_acc", "val_acc") if point.get(k) is not None)
        typer.echo(f"  epoch {point['epoch']}: {numbers}")
    if view.error:
        typer.echo("  error:\n    " + view.error.replace("\n", "\n    "))


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobIdArg, actor: ActorOpt = None) -> None:
    """Cancel a job: a queued one at once, a running one at its worker's next step."""
    view = jobs.cancel_job(open_db(), job_id, actor=actor_or_default(actor))
    if view.status == JobStatus.CANCELLED:
        typer.echo(f"job {view.id} cancelled")
    else:
        typer.echo(f"job {view.id} is running: asked its worker to stop at the next step")


@jobs_app.command("fail-stale")
def jobs_fail_stale() -> None:
    """Mark running jobs whose worker stopped sending heartbeats as failed (workers and the app also do this)."""
    failed = jobs.fail_stale_jobs(open_db())
    typer.echo(f"marked failed: {', '.join(f'#{i}' for i in failed)}" if failed else "no stale jobs")


@jobs_app.command("workers")
def jobs_workers(as_json: JsonOpt = False) -> None:
    """List live workers (fresh heartbeat), on this machine or any other sharing the database."""
    rows = jobs.live_workers(open_db())
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no live worker: one starts by itself when a job is queued, or run `worker`")
        return
    for row in rows:
        typer.echo(f"{row['id']}  pid {row['pid']} on {row['host']}  started {row['started_at']:%Y-%m-%d %H:%M:%S}")
