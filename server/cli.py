"""The `ember` command: serve, list models, build the demo models, pull hub weights."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="ember: versioned models on GPUs behind the APIs people already use.",
                  no_args_is_help=True, add_completion=False)
console = Console()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to bind (default 127.0.0.1, or EMBER_HOST)."),
    port: int = typer.Option(None, help="Port (default 8000, or EMBER_PORT)."),
    models: Optional[Path] = typer.Option(None, "--models", help="models.yaml to serve (or EMBER_MODELS)."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accepted API key; repeatable. Also EMBER_API_KEYS."),
    allow_insecure_bind: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the HTTP server (Replicate, OpenAI and Flowise APIs)."""
    import uvicorn

    from server.app import create_app
    from server.settings import Settings
    from server.statelock import StateFolderBusy, lock_state_folder

    overrides: dict = {}
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if models:
        overrides["models"] = models
    if allow_insecure_bind:
        overrides["allow_insecure_bind"] = True
    settings = Settings(**overrides)
    if api_key:
        settings.api_keys = settings.api_keys + list(api_key)
    keys = settings.all_api_keys() or settings.jwt_secret
    if not _is_loopback(settings.host) and not keys and not settings.allow_insecure_bind:
        console.print(f"[red]Refusing to bind {settings.host} without API keys.[/red] Pass --api-key "
                      "(or EMBER_API_KEYS), or --allow-insecure-bind if you really mean it.")
        raise typer.Exit(2)
    try:
        lock = lock_state_folder(settings.home)  # before anything (restart recovery) reads the folder
    except StateFolderBusy as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(4) from None
    console.print(f"ember home: {settings.home}\nmodels: {settings.models}")
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                    timeout_keep_alive=settings.timeout_keep_alive_s)
    finally:
        lock.release()


@app.command(name="models")
def list_models(models: Optional[Path] = typer.Option(None, "--models", help="models.yaml to read.")) -> None:
    """List models, their versions, whether their weights are here, and where they would load."""
    from engine.engine import demo_registry
    from engine.loading import device_map_for
    from server.settings import Settings

    settings = Settings(**({"models": models} if models else {}))
    registry = demo_registry(settings.home, settings.models)
    table = Table("model", "version", "kind", "status", "devices")
    for version in registry.versions():
        try:
            devices = ", ".join(device_map_for(version.placement)[1])
        except Exception as exc:  # noqa: BLE001 - show why, do not crash
            devices = f"({exc})"
        status = "available" if version.available else f"unavailable: {version.unavailable_reason}"
        table.add_row(version.model, version.id[:12], version.kind, status, devices)
    console.print(table)


@app.command()
def demo() -> None:
    """Build the demo models (ember/tiny-chat, ember/tiny-i2v) under EMBER_HOME."""
    from engine.config import ember_home
    from engine.demo import ensure_demo_models

    for name, folder in ensure_demo_models(ember_home()).items():
        console.print(f"[green]built[/green] ember/{name} at {folder}")


@app.command()
def pull(model: str = typer.Argument(..., help="owner/name[:version] from models.yaml")) -> None:
    """Download a hub model's weights (where a hub is reachable), with progress bars."""
    from engine.engine import demo_registry
    from engine.loading import download
    from server.settings import Settings

    settings = Settings()
    version = demo_registry(settings.home, settings.models).resolve(model)
    path = download(version)
    console.print(f"[green]downloaded[/green] {version.model} to {path}; restart `ember serve` to pin it")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
