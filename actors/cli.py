"""`neuronmap submit` and `neuronmap jobs`: the Ray Jobs commands, registered as a CLI plugin.

The core package never imports Ray; it finds these commands through the `neuronmap.cli` entry point
group (see pyproject.toml), so `neuronmap --help` lists them whenever this package is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
ADDRESS_HELP = "Job server URL (Ray dashboard port), e.g. http://HOST:8265; default RAY_API_SERVER_ADDRESS or local."


def register(app: typer.Typer) -> None:
    """Add `submit` and the `jobs` group to the `neuronmap` app."""
    jobs_app = typer.Typer(help="Follow jobs submitted to a Ray cluster.", no_args_is_help=True)
    app.add_typer(jobs_app, name="jobs")

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def submit(
        ctx: typer.Context,
        address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
        working_dir: Optional[Path] = typer.Option(None, help="Folder uploaded to the cluster as the job's working dir."),
        runtime_env: Optional[Path] = typer.Option(None, help="runtime_env YAML (pip, env_vars, ...), e.g. cluster/runtime_env.yaml."),
        wait: bool = typer.Option(False, help="Wait for the job to end and print its logs."),
        as_json: bool = typer.Option(False, "--json", help="Print the job id as JSON."),
    ) -> None:
        """Run a neuronmap command on a Ray cluster: `neuronmap submit -- extract -m gpt2 ...`."""
        from . import jobs

        job_id = jobs.submit(ctx.args, address=address, working_dir=working_dir, runtime_env=runtime_env)
        if as_json:
            sys.stdout.write(json.dumps({"id": job_id}) + "\n")
        else:
            console.print(f"submitted [bold]{job_id}[/]; follow it with `neuronmap jobs status {job_id}` "
                          f"and `neuronmap jobs logs {job_id}`")
        if wait:
            final = jobs.wait(job_id, address=address)
            sys.stdout.write(jobs.logs(job_id, address=address))
            if final["status"] != "SUCCEEDED":
                raise typer.Exit(1)

    @jobs_app.command("list")
    def jobs_list(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
                  as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
        """List the cluster's jobs."""
        from . import jobs

        rows = jobs.list_jobs(address)
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
            return
        table = Table(title=f"{len(rows)} jobs")
        for column in ("id", "status", "entrypoint"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["id"], row["status"], row["entrypoint"])
        console.print(table)

    @jobs_app.command("status")
    def jobs_status(job_id: str = typer.Argument(..., help="Submission id from `neuronmap submit`."),
                    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
                    as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
        """Show one job's status."""
        from . import jobs

        info = jobs.status(job_id, address)
        if as_json:
            sys.stdout.write(json.dumps(info, default=str) + "\n")
        else:
            console.print(f"{info['id']}: [bold]{info['status']}[/] {info['message'] or ''}")

    @jobs_app.command("logs")
    def jobs_logs(job_id: str = typer.Argument(..., help="Submission id."),
                  address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
        """Print what the job has written so far."""
        from . import jobs

        sys.stdout.write(jobs.logs(job_id, address))

    @jobs_app.command("stop")
    def jobs_stop(job_id: str = typer.Argument(..., help="Submission id."),
                  address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
        """Stop a running job."""
        from . import jobs

        stopped = jobs.stop(job_id, address)
        console.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
