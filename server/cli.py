"""The `ember` command: serve, list models, build the demo models, pull hub weights."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="ember: versioned models on GPUs behind the APIs people already use.",
                  epilog="Examples:\n\n  ember demo && ember serve\n\n  ember models --json\n\n"
                         "  ember models load ember/tiny-chat --progress",
                  no_args_is_help=True, add_completion=False)
console = Console()
LOCAL_RAY = "local"  # `--ray` without an address


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command(epilog="Examples:\n\n  ember serve\n\n  ember serve --models ./models.yaml --port 9000\n\n"
                     "  ember serve --host 0.0.0.0 --api-key $KEY\n\n"
                     "  ember serve --ray                  # a local Ray cluster\n\n"
                     "  ember serve --ray ray://head:10001 # a running Ray cluster")
def serve(
    host: str = typer.Option(None, help="Address to bind (default 127.0.0.1, or EMBER_HOST)."),
    port: int = typer.Option(None, help="Port (default 8000, or EMBER_PORT)."),
    models: Optional[Path] = typer.Option(None, "--models", help="models.yaml to serve (or EMBER_MODELS)."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accepted API key; repeatable. Also EMBER_API_KEYS."),
    allow_insecure_bind: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="Serve on Ray Serve: each model version a deployment. With an "
                                           "ADDRESS, join that Ray cluster; without, start a local one."),
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
    if ray is not None:
        from server.ray_serve import start

        try:
            start(settings, None if ray == LOCAL_RAY else ray)
        finally:
            lock.release()
        return
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                    timeout_keep_alive=settings.timeout_keep_alive_s)
    finally:
        lock.release()


MODELS_EXAMPLES = """Examples:

  ember models                    # a table on a terminal

  ember models | grep mistral     # in a pipe: full values, tab-separated

  ember models --json | jq -r '.[].ref'

  ember models load ember/tiny-chat --keep-alive 10m --progress

  ember models sleep ember/tiny-chat

  ember models status ember/tiny-chat:3f2a --url http://gpu:8000
"""

models_app = typer.Typer(help="List the registry's versions, or load, unload, sleep and wake them on a "
                              "running server.", epilog=MODELS_EXAMPLES, add_completion=False)
app.add_typer(models_app, name="models")

URL_OPTION = typer.Option("http://127.0.0.1:8000", "--url", envvar="EMBER_URL",
                          help="Base URL of the running server (or EMBER_URL).")
KEY_OPTION = typer.Option(None, "--api-key", envvar="EMBER_API_KEY", help="API key (or EMBER_API_KEY).")
JSON_OPTION = typer.Option(False, "--json", help="Print the server's JSON answer.")


def _registry_rows(models: Optional[Path]) -> list[dict]:
    from engine.engine import demo_registry
    from engine.loading import device_map_for
    from server.settings import Settings

    settings = Settings(**({"models": models} if models else {}))
    rows = []
    for version in demo_registry(settings.home, settings.models).versions():
        try:
            devices = device_map_for(version.placement)[1]
        except Exception as exc:  # noqa: BLE001 - show why, do not crash
            devices = [f"({exc})"]
        rows.append({"ref": version.ref, "model": version.model, "version": version.id, "kind": version.kind,
                     "available": version.available, "reason": version.unavailable_reason,
                     "devices": devices, "load": version.load, "pin": version.pin,
                     "keep_alive": version.keep_alive})
    return rows


@models_app.callback(invoke_without_command=True, epilog=MODELS_EXAMPLES)
def list_models(
    ctx: typer.Context,
    models: Optional[Path] = typer.Option(None, "--models", help="models.yaml to read (or EMBER_MODELS)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array, every field in full."),
) -> None:
    """List models and versions: whether their weights are here, and where they would load.

    On a terminal this is a table; in a pipe each version is one tab-separated line with full values
    (model, version id, kind, status, devices), so `grep`, `cut` and `awk` see everything."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _registry_rows(models)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    status = {r["ref"]: "available" if r["available"] else f"unavailable: {r['reason']}" for r in rows}
    if sys.stdout.isatty():
        table = Table("model", "version", "kind", "status", "devices")
        for r in rows:
            table.add_row(r["model"], r["version"][:12], r["kind"], status[r["ref"]], ", ".join(r["devices"]))
        console.print(table)
        return
    typer.echo("\t".join(("model", "version", "kind", "status", "devices")))
    for r in rows:
        typer.echo("\t".join((r["model"], r["version"], r["kind"], status[r["ref"]], ",".join(r["devices"]))))


def _client(url: str, api_key: Optional[str]):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=5))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _version_path(client, name: str) -> str:
    """`owner/name[:version]` -> the version's management path (the latest version by default)."""
    model, _, version = name.partition(":")
    if model.count("/") != 1:
        _fail(f"{name!r} is not owner/name[:version]")
    if not version:
        version = _call(client, "GET", f"/v1/models/{model}")["latest_version"]["id"]
    return f"/v1/models/{model}/versions/{version}"


def _call(client, method: str, path: str, **kwargs) -> dict:
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {client.base_url}: {exc}")
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error", {}).get("message") or response.text
        except ValueError:
            detail = response.text
        _fail(f"{response.status_code}: {detail}")
    return response.json()


def _show(state: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    memory = ", ".join(f"{device} {size / 2**20:.1f} MiB" for device, size in state["memory"].items()) or "-"
    typer.echo(f"{state['model']}:{state['version']}\t{state['status']}\t{memory}")


def _lifecycle(action: str, name: str, url: str, api_key: Optional[str], as_json: bool,
               body: Optional[dict] = None) -> None:
    with _client(url, api_key) as client:
        path = _version_path(client, name)
        _show(_call(client, "POST", f"{path}/{action}", json=body), as_json)


@models_app.command(epilog="Examples:\n\n  ember models load ember/tiny-chat\n\n"
                           "  ember models load ember/tiny-chat:3f2a --keep-alive 0 --progress")
def load(name: str = typer.Argument(..., help="owner/name[:version]"), url: str = URL_OPTION,
         api_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
         keep_alive: Optional[str] = typer.Option(None, help="Idle time before unloading: 300, 5m, 0, -1 (never)."),
         progress: bool = typer.Option(False, "--progress", help="Print load phases to stderr as they happen.")) -> None:
    """Load (or wake) a version on the running server and warm it up."""
    body = {"keep_alive": keep_alive} if keep_alive is not None else None
    if not progress:
        _lifecycle("load", name, url, api_key, as_json, body)
        return
    with _client(url, api_key) as client:
        path = _version_path(client, name)
        with client.stream("POST", f"{path}/load", params={"stream": "true"}, json=body) as response:
            if response.status_code >= 400:
                response.read()
                _fail(f"{response.status_code}: {response.text}")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
                    if event == "progress":
                        typer.echo(f"{data['seconds']:7.2f}s  {data['phase']}", err=True)
                    elif event == "error":
                        _fail(f"{data['status']}: {data['detail']}")
                    elif event == "done":
                        _show(data, as_json)


@models_app.command(epilog="Example:\n\n  ember models unload ember/tiny-chat")
def unload(name: str = typer.Argument(..., help="owner/name[:version]"), url: str = URL_OPTION,
           api_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Unload an idle version from the running server (409 while it serves requests)."""
    _lifecycle("unload", name, url, api_key, as_json)


@models_app.command(epilog="Example:\n\n  ember models sleep ember/tiny-chat")
def sleep(name: str = typer.Argument(..., help="owner/name[:version]"), url: str = URL_OPTION,
          api_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Put an idle version to sleep: KV cache freed, GPU weights parked in pinned host memory."""
    _lifecycle("sleep", name, url, api_key, as_json)


@models_app.command(epilog="Example:\n\n  ember models wake ember/tiny-chat --keep-alive 30m")
def wake(name: str = typer.Argument(..., help="owner/name[:version]"), url: str = URL_OPTION,
         api_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
         keep_alive: Optional[str] = typer.Option(None, help="Idle time before unloading: 300, 5m, 0, -1.")) -> None:
    """Wake a sleeping version (a version that is not loaded is loaded)."""
    _lifecycle("wake", name, url, api_key, as_json, {"keep_alive": keep_alive} if keep_alive is not None else None)


@models_app.command(epilog="Example:\n\n  ember models status ember/tiny-chat --json")
def status(name: str = typer.Argument(..., help="owner/name[:version]"), url: str = URL_OPTION,
           api_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """A version's lifecycle state on the running server: status, bytes per device, last use."""
    with _client(url, api_key) as client:
        _show(_call(client, "GET", f"{_version_path(client, name)}/status"), as_json)


@app.command(epilog="Example:\n\n  EMBER_HOME=./.ember ember demo")
def demo() -> None:
    """Build the demo models (ember/tiny-chat, ember/tiny-i2v) under EMBER_HOME."""
    from engine.config import ember_home
    from engine.demo import ensure_demo_models

    for name, folder in ensure_demo_models(ember_home()).items():
        console.print(f"[green]built[/green] ember/{name} at {folder}")


@app.command(epilog="Example:\n\n  ember pull mistralai/mistral-7b-instruct-v0.1")
def pull(model: str = typer.Argument(..., help="owner/name[:version] from models.yaml")) -> None:
    """Download a hub model's weights (where a hub is reachable), with progress bars."""
    from engine.engine import demo_registry
    from engine.loading import download
    from server.settings import Settings

    settings = Settings()
    version = demo_registry(settings.home, settings.models).resolve(model)
    path = download(version)
    console.print(f"[green]downloaded[/green] {version.model} to {path}; restart `ember serve` to pin it")


def with_ray_address(argv: list[str]) -> list[str]:
    """`--ray` takes an optional address: given none (end of line, or another option next), it
    means a local cluster."""
    argv = list(argv)
    for index, arg in enumerate(argv):
        if arg == "--ray" and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            argv.insert(index + 1, LOCAL_RAY)
            break
    return argv


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(with_ray_address(sys.argv[1:]))


if __name__ == "__main__":
    main()
