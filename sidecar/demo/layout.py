"""Where the demo's pieces live: the policy file, and every loopback port it uses.

The policy (`examples/checkout/checkout.riprap`) names fixed ports in 18400..18699, an
uncommon range. `--port-offset N` shifts every one of them: the example directory is
copied to a temporary directory and its ports rewritten there, so the file in the repo
never changes. A busy port stops the demo before anything starts, with a message that
names it and says how to get around it.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

POLICY_RELATIVE = Path("examples") / "checkout" / "checkout.riprap"
_PORT_RE = re.compile(r"127\.0\.0\.1:(\d{2,5})")

# The demo's own processes, besides what the policy names.
BASELINE_CHECKOUT_PORT = 18490
CONTROL_PORT_SHIFT = 100  # each upstream's control port: its data port + 100


class LayoutError(Exception):
    """A problem found before anything started; the message says what to do."""


@dataclass(frozen=True)
class Upstream:
    name: str  # payments-1, inventory-b, ...
    service: str
    port: int
    role: str  # "replica", "backup", "shard a", ...

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_port(self) -> int:
        return self.port + CONTROL_PORT_SHIFT


# Base ports, as written in examples/checkout/checkout.riprap.
UPSTREAMS = (
    Upstream("payments-1", "payments", 18501, "replica"),
    Upstream("payments-2", "payments", 18502, "replica"),
    Upstream("payments-backup", "payments", 18511, "backup provider"),
    Upstream("inventory-a", "inventory", 18521, "shard a"),
    Upstream("inventory-b", "inventory", 18531, "shard b"),
    Upstream("recommendations", "recommendations", 18541, "single replica"),
)
SIDECAR_LISTEN = 18400
SIDECAR_ADMIN = 18401
CHECKOUT_PORT = 18480


@dataclass(frozen=True)
class Layout:
    """Everything with a port, after the offset."""

    policy: Path
    offset: int

    def port(self, base: int) -> int:
        return base + self.offset

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return tuple(Upstream(u.name, u.service, u.port + self.offset, u.role) for u in UPSTREAMS)

    def upstream(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    @property
    def listen(self) -> int:
        return self.port(SIDECAR_LISTEN)

    @property
    def admin(self) -> int:
        return self.port(SIDECAR_ADMIN)

    @property
    def checkout(self) -> int:
        return self.port(CHECKOUT_PORT)

    @property
    def baseline(self) -> int:
        return self.port(BASELINE_CHECKOUT_PORT)

    def all_ports(self) -> list[int]:
        ports = {self.listen, self.admin, self.checkout, self.baseline}
        for u in self.upstreams:
            ports.update((u.port, u.control_port))
        return sorted(ports)


def repo_root() -> Path:
    """The checkout of the repository this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


def find_policy(explicit: str | None = None) -> Path:
    path = Path(explicit) if explicit else repo_root() / POLICY_RELATIVE
    if not path.is_file():
        raise LayoutError(
            f"cannot find the demo policy at {path}; `riprap demo` runs from a clone of the "
            "repository installed with `pip install -e .` (or pass --policy PATH)")
    return path


def prepare(policy: Path, offset: int, workdir: Path) -> Layout:
    """The layout to run; with an offset, a rewritten copy of the example directory."""
    if offset == 0:
        return Layout(policy, 0)
    if not 0 < offset <= 40000:
        raise LayoutError(f"--port-offset must be within 1..40000, not {offset}")
    target = workdir / policy.parent.name
    shutil.copytree(policy.parent, target)
    copy = target / policy.name
    text = copy.read_text(encoding="utf-8")
    copy.write_text(_PORT_RE.sub(lambda m: f"127.0.0.1:{int(m.group(1)) + offset}", text),
                    encoding="utf-8")
    return Layout(copy, offset)


def policy_ports(policy: Path) -> set[int]:
    return {int(p) for p in _PORT_RE.findall(policy.read_text(encoding="utf-8"))}


def check_ports_free(layout: Layout) -> None:
    """Raise LayoutError naming the first busy port (and the ones after it)."""
    busy = [p for p in sorted(set(layout.all_ports()) | policy_ports(layout.policy))
            if not port_free(p)]
    if busy:
        shown = ", ".join(f"127.0.0.1:{p}" for p in busy[:6])
        raise LayoutError(
            f"port{'s' if len(busy) > 1 else ''} {shown} already in use; the demo needs "
            f"127.0.0.1:{min(layout.all_ports())}..{max(layout.all_ports())}. Stop what "
            "holds them (an earlier demo?) or shift every port with `riprap demo "
            "--port-offset 1000`.")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True
