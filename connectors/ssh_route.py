"""Where an SSH connection goes: a host's settings merged with OpenSSH's client config.

The host's own fields win over the config file, as OpenSSH's command line wins over
~/.ssh/config: `address` is the name looked up in the file (what one would type after `ssh`),
and HostName, Port, User, IdentityFile and ProxyJump fill what the host leaves unset. A
ProxyJump of several hops is connected in order, each hop looked up in the same file; like
OpenSSH, the first hop's own ProxyJump is followed too, so bastions may chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.ssh_exception import ConfigParseError

DEFAULT_PORT = 22
# OpenSSH gives up on longer ProxyJump chains too; a loop in the file must not recurse forever.
MAX_HOPS = 8


class RouteError(ValueError):
    """The SSH client config cannot be read, or names a route that cannot be followed."""


@dataclass(frozen=True)
class Endpoint:
    """One SSH server on the way: a jump host or the target itself."""

    alias: str
    hostname: str
    port: int
    user: str | None
    identity_files: tuple[Path, ...] = ()
    identities_only: bool = False

    @property
    def where(self) -> str:
        return f"{self.hostname}:{self.port}"


@dataclass(frozen=True)
class Route:
    target: Endpoint
    jumps: tuple[Endpoint, ...] = field(default_factory=tuple)


def load_ssh_config(path: Path | None) -> paramiko.SSHConfig:
    """Parse `path`, or ~/.ssh/config when none is configured (a missing default file is empty)."""
    if path is None:
        default = Path.home() / ".ssh" / "config"
        if not default.is_file():
            return paramiko.SSHConfig()
        path = default
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except FileNotFoundError:
        raise RouteError(f"field ssh_config: file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise RouteError(f"field ssh_config: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except (ConfigParseError, ValueError) as exc:
        raise RouteError(f"field ssh_config: cannot parse {str(path)!r}: {exc}") from None


def _endpoint(config: paramiko.SSHConfig, alias: str, *, port: int | None, user: str | None) -> Endpoint:
    try:
        found = config.lookup(alias)
    except Exception as exc:  # noqa: BLE001 - Match exec, bad tokens: any lookup fault is a config fault
        raise RouteError(f"ssh config entry for {alias!r} cannot be evaluated: {exc}") from None
    proxy_command = found.get("proxycommand")
    if proxy_command and proxy_command.strip().lower() != "none":
        # Connecting straight past it would reach the wrong place or none: say so instead.
        raise RouteError(f"ssh config gives {alias!r} a ProxyCommand, which patchdrill does not run; "
                         "use ProxyJump for bastions")
    configured_port = found.get("port")
    try:
        resolved_port = port or (int(configured_port) if configured_port else DEFAULT_PORT)
    except ValueError:
        raise RouteError(f"ssh config gives {alias!r} a port that is not a number: {configured_port!r}") from None
    return Endpoint(
        alias=alias,
        hostname=found.get("hostname", alias),
        port=resolved_port,
        user=user or found.get("user"),
        identity_files=tuple(Path(p).expanduser() for p in found.get("identityfile", [])),
        identities_only=found.as_bool("identitiesonly") if "identitiesonly" in found else False,
    )


def _parse_jump(spec: str) -> tuple[str, int | None, str | None]:
    """`[user@]host[:port]` or `ssh://[user@]host[:port]`, IPv6 in brackets."""
    text = spec.strip().removeprefix("ssh://")
    user, _, hostport = text.rpartition("@")
    port: str | None = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host = hostport
    if not host:
        raise RouteError(f"ProxyJump entry {spec!r} names no host")
    try:
        number = int(port) if port else None
    except ValueError:
        raise RouteError(f"ProxyJump entry {spec!r} has a port that is not a number") from None
    return host, number, user or None


def _jumps(config: paramiko.SSHConfig, proxy_jump: str | None, default_user: str | None,
           depth: int) -> list[Endpoint]:
    if not proxy_jump or proxy_jump.strip().lower() == "none":
        return []
    if depth > MAX_HOPS:
        raise RouteError(f"ProxyJump chain longer than {MAX_HOPS} hops (a loop in the ssh config?)")
    hops = []
    for spec in proxy_jump.split(","):
        host, port, user = _parse_jump(spec)
        hops.append(_endpoint(config, host, port=port, user=user))
    # The first hop is reached by its own route; the rest are reached through the hop before.
    first_route = config.lookup(hops[0].alias).get("proxyjump")
    hops = _jumps(config, first_route, default_user, depth + len(hops)) + hops
    # A hop with no user anywhere logs in as the host's user (the fleet's automation account).
    return [hop if hop.user else Endpoint(hop.alias, hop.hostname, hop.port, default_user,
                                          hop.identity_files, hop.identities_only) for hop in hops]


def resolve_route(config: paramiko.SSHConfig, address: str, *, port: int | None, user: str | None) -> Route:
    target = _endpoint(config, address, port=port, user=user)
    proxy_jump = config.lookup(address).get("proxyjump")
    return Route(target=target, jumps=tuple(_jumps(config, proxy_jump, target.user, 1)))


__all__ = ["Endpoint", "Route", "RouteError", "load_ssh_config", "resolve_route"]
