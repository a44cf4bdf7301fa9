"""``exitpipe nvflare install SITE_DIR...``: put exitpipe's components into FLARE sites.

A FLARE site folder (a startup kit: ``startup/`` and ``local/``) is a client when
``startup/fed_client.json`` exists and the server when ``startup/fed_server.json`` does. In
its ``local/resources.json`` (copied from ``resources.json.default`` when absent, as FLARE
itself reads the default only when there is no ``resources.json``):

- client: the ``process_launcher`` component's path becomes exitpipe's launcher. It is
  replaced, never added beside: FLARE refuses a site with more than one job launcher.
- server: a component ``exitpipe_lifecycle`` (the lifecycle reporter) is added.

The components' ``args`` are the settings flags the operator gave, and nothing else, so the
rest comes from the site's ``EXITPIPE_*`` environment; a broker URL, which may carry a
password, is written only when ``--amqp-url`` is given. Installing is idempotent: the same
command twice changes nothing the second time, and the file as it was before the first
change is kept once as ``resources.json.orig``. This module writes JSON only and never
imports ``nvflare``.

Exit statuses: 0 installed (or already so); 2 a folder that is not a FLARE site, a
``resources.json`` that cannot be read, or a site whose launcher is not FLARE's process one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitpipe.settings import Settings, redact

EX_OK = 0
EX_USAGE = 2
LAUNCHER = "producers.nvflare.ClientProcessJobLauncher"
REPORTER = "producers.nvflare.LifecycleReporter"
FLARE_LAUNCHER = "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher"
LAUNCHER_ID = "process_launcher"
REPORTER_ID = "exitpipe_lifecycle"
# The common settings flags the components take (the others belong to the daemons).
COMPONENT_SETTINGS = ("amqp_url", "namespace", "spool_dir", "heartbeat", "retry_seconds")

EPILOG = """\
The components read the settings not given here from the FLARE process's EXITPIPE_*
environment (EXITPIPE_AMQP_URL, EXITPIPE_NAMESPACE, ...). --amqp-url writes the URL, and a
password in it, into resources.json: prefer the environment. Without --spool-dir each site
spools to <EXITPIPE_SPOOL_DIR>/nvflare-<site>. The original file is kept once as
local/resources.json.orig.

Exit statuses: 0 installed (or already installed); 2 not a FLARE site, an unreadable
resources.json, or a site that uses a launcher other than FLARE's process launcher."""


class NotASite(Exception):
    """The folder cannot take the components; the message says why."""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``nvflare install``."""
    nvflare = subparsers.add_parser("nvflare", help="NVIDIA FLARE integration")
    actions = nvflare.add_subparsers(dest="nvflare_command", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install",
        parents=[common],
        help="install exitpipe's components into FLARE site folders (local/resources.json)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument("sites", nargs="+", metavar="SITE_DIR", help="a FLARE site folder")
    role = install.add_mutually_exclusive_group()
    role.add_argument("--server", action="store_true", help="the folders are the server's")
    role.add_argument("--client", action="store_true", help="the folders are client sites")
    install.add_argument("--ca-file", help="CA bundle that verifies an amqps:// broker")
    install.add_argument(
        "--max-block-seconds",
        type=float,
        help="longest a FLARE thread waits for a delivery (the components' default: 2)",
    )
    install.set_defaults(func=install_sites)


def install_sites(args: argparse.Namespace, settings: Settings) -> int:
    """Install into every SITE_DIR; exit 2 if any could not take the components."""
    refused = _refused_flags(args)
    if refused:
        return _fail(f"{refused} does not apply to the FLARE components")
    if args.max_block_seconds is not None and args.max_block_seconds <= 0:
        return _fail("--max-block-seconds: must be above 0")
    component_args = _component_args(args, settings)
    if "amqp_url" in component_args:
        print(
            "exitpipe nvflare install: the broker URL is written into resources.json;"
            " prefer EXITPIPE_AMQP_URL in the site's environment",
            file=sys.stderr,
        )
    status = EX_OK
    for site in args.sites:
        try:
            print(install(Path(site), _role(args), component_args))
        except NotASite as exc:
            status = _fail(str(exc))
    _warn_without_nvflare()
    return status


def _refused_flags(args: argparse.Namespace) -> str | None:
    for key, value in vars(args).items():
        name = key.removeprefix("setting_")
        if key.startswith("setting_") and value is not None and name not in COMPONENT_SETTINGS:
            return "--" + name.replace("_", "-")
    return None


def _component_args(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The given flags, as the validated settings hold them; nothing from the environment."""
    given: dict[str, Any] = {}
    for name in COMPONENT_SETTINGS:
        if getattr(args, f"setting_{name}", None) is not None:
            given[name] = getattr(settings, name)
    if "spool_dir" in given:  # FLARE runs in the site's folder: a relative path would move
        given["spool_dir"] = str(Path(given["spool_dir"]).expanduser().resolve())
    if args.ca_file is not None:
        given["ca_file"] = str(Path(args.ca_file).expanduser().resolve())
    if args.max_block_seconds is not None:
        given["max_block_seconds"] = args.max_block_seconds
    return given


def _role(args: argparse.Namespace) -> str | None:
    return "server" if args.server else "client" if args.client else None


def _warn_without_nvflare() -> None:
    # FLARE imports the components with the site's python; this is only a hint for the
    # common case of installing from the same environment the site runs in.
    if importlib.util.find_spec("nvflare") is None:
        print(
            "exitpipe nvflare install: nvflare is not installed here; the site's python needs"
            " `pip install 'exitpipe[nvflare]'`",
            file=sys.stderr,
        )


def _fail(problem: str) -> int:
    print(f"exitpipe nvflare install: {problem}", file=sys.stderr)
    return EX_USAGE


# -- the site folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A FLARE site folder and its role."""

    root: Path
    role: str  # client | server

    @property
    def local(self) -> Path:
        return self.root / "local"

    @property
    def resources(self) -> Path:
        return self.local / "resources.json"


def install(root: Path, role: str | None, component_args: dict[str, Any]) -> str:
    """Install into one site; return a line saying what changed. Raises NotASite."""
    site = find_site(root, role)
    before, resources = _load(site)
    after = json.loads(json.dumps(resources))  # a deep copy, compared with the original
    components = after.get("components")
    if not isinstance(components, list):
        raise NotASite(f"{site.resources}: no list of components")
    if site.role == "client":
        _use_launcher(site, components, component_args)
    else:
        _add_reporter(components, component_args)
    shown = {k: redact(v) if k == "amqp_url" else v for k, v in component_args.items()}
    what = f"{site.root} ({site.role}): {LAUNCHER if site.role == 'client' else REPORTER} {shown}"
    if site.resources.exists() and after == resources:
        return f"{what}: already installed, nothing changed"
    _keep_original(site, before)
    _write(site.resources, after, private="amqp_url" in component_args)
    return f"{what}: installed in {site.resources}"


def find_site(root: Path, role: str | None) -> Site:
    """The site at ``root``, its role from ``startup/`` unless given; NotASite otherwise."""
    if not (root / "local").is_dir():
        raise NotASite(f"{root} is not a FLARE site folder: it has no local/ folder")
    found = _detected_role(root)
    if role is None and found is None:
        raise NotASite(
            f"{root} is not a FLARE site folder: no startup/fed_client.json or"
            " startup/fed_server.json (give --client or --server if it is one)"
        )
    if role is not None and found is not None and role != found:
        raise NotASite(f"{root} is a FLARE {found}, not a {role}")
    return Site(root, role or found or "client")


def _detected_role(root: Path) -> str | None:
    if (root / "startup" / "fed_server.json").is_file():
        return "server"
    if (root / "startup" / "fed_client.json").is_file():
        return "client"
    return None


def _load(site: Site) -> tuple[str, dict[str, Any]]:
    """The text of resources.json (else of its default) and what it holds."""
    source = site.resources
    if not source.exists():
        source = site.local / "resources.json.default"
    try:
        text = source.read_text(encoding="utf-8")
        resources = json.loads(text)
    except FileNotFoundError:
        raise NotASite(
            f"{site.local} has neither resources.json nor resources.json.default"
        ) from None
    except (OSError, ValueError) as exc:
        raise NotASite(f"{source}: cannot be read as JSON: {exc}") from None
    if not isinstance(resources, dict):
        raise NotASite(f"{source}: not a JSON object")
    return text, resources


def _use_launcher(site: Site, components: list[Any], component_args: dict[str, Any]) -> None:
    """Point the site's one process launcher at exitpipe's."""
    launchers = [c for c in components if isinstance(c, dict) and c.get("id") == LAUNCHER_ID]
    if len(launchers) != 1:
        raise NotASite(f"{site.resources}: expected one {LAUNCHER_ID!r} component")
    launcher = launchers[0]
    if launcher.get("path") not in (FLARE_LAUNCHER, LAUNCHER):
        raise NotASite(
            f"{site.resources}: {LAUNCHER_ID} is {launcher.get('path')!r}; exitpipe replaces"
            f" only FLARE's process launcher ({FLARE_LAUNCHER})"
        )
    launcher["path"] = LAUNCHER
    launcher["args"] = dict(component_args)


def _add_reporter(components: list[Any], component_args: dict[str, Any]) -> None:
    """Add the lifecycle reporter, or update the one a former install added."""
    for component in components:
        if isinstance(component, dict) and component.get("path") == REPORTER:
            component["args"] = dict(component_args)
            return
    components.append({"id": REPORTER_ID, "path": REPORTER, "args": dict(component_args)})


def _keep_original(site: Site, text: str) -> None:
    """Keep the file as it was before exitpipe first changed it; never overwrite that."""
    original = site.local / "resources.json.orig"
    if not original.exists():
        _write_text(original, text)


def _write(path: Path, resources: dict[str, Any], private: bool) -> None:
    """Write resources.json; readable by its owner only when it holds a broker URL."""
    _write_text(path, json.dumps(resources, indent=2) + "\n", 0o600 if private else None)


def _write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write through a temporary file and a rename: FLARE never reads half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    if mode is not None:
        temp.chmod(mode)
    os.replace(temp, path)
