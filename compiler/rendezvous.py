"""Where the nodes of a run meet (torchrun's c10d rendezvous), and what goes wrong there.

A run's torchrun agents meet at a TCP store before any rank starts. What this module knows:

- **One node needs no port of its own choosing.** `--standalone` makes torchrun host the
  store on a port the kernel picks (`localhost:0`), so two runs on one machine, or a run
  next to any other program holding 29500, cannot meet the wrong store. A fixed port on a
  single node is how the README's main job used to fail: a busy 29500 gave ~100 lines of
  traceback, and a holder that accepts but never answers hung torchrun with no output at
  all (torch's `read_timeout` does not cover that handshake).
- **Several nodes meet at launch.master_addr:launch.master_port**, hosted by the node whose
  address that is (node 0 by recipec's convention; torch decides by matching the address
  against this machine's names, as `hosted_here` does). On that node the port must be free
  before torchrun starts: otherwise torch silently turns the head into a *client* of
  whatever holds the port. `head_port_problem` says so instead.
- **A rendezvous is bounded.** torch raises after `join_timeout` when the store answers but
  nodes are missing; when the store never answers it can wait forever, so the supervisor
  also stops torchrun once no rank has started after `watchdog_s`. Both end in
  `failure_message`: exit 2 naming launch.master_addr / launch.master_port and what to check.

Everything is read from the torchrun command line (`of_argv`), so launch.sh, job.sbatch and
`recipec launch` are covered alike. Standard library only: the supervisor runs on every node.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

# torch's own default join timeout; recipec writes it out (--rdzv-conf) so the bound is visible.
JOIN_TIMEOUT_S = 600
# Beyond join_timeout, the time torchrun may take to import torch and reach the rendezvous
# before the supervisor's watchdog gives up (at most this much, at least join_timeout again).
STARTUP_GRACE_S = 60
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")

_TORCH_FAILURE = re.compile(
    rb"torch\.distributed\.elastic\.rendezvous\.api\.Rendezvous\w*Error"
    rb"|torch\.distributed\.(?:DistNetworkError|DistStoreError)"
)
_CAUSE = re.compile(rb"^(torch\.distributed[\w.]*Error(?::[^\n]*)?)$", re.MULTILINE)
_NO_VALUE = {"standalone", "no-python", "run-path", "module"}


@dataclass(frozen=True)
class Rendezvous:
    """The rendezvous settings of one torchrun command line."""

    standalone: bool
    host: str
    port: int | None
    nnodes: str  # "2", or "1:4" for an elastic range
    node_rank: str | None
    join_timeout_s: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    @property
    def multi_node(self) -> bool:
        return not self.standalone and self.nnodes not in ("1", "1:1")

    @property
    def watchdog_s(self) -> int:
        """How long the supervisor waits for the first rank before it calls the rendezvous failed."""
        return self.join_timeout_s + min(STARTUP_GRACE_S, self.join_timeout_s)


def torchrun_options(argv: Sequence[str]) -> dict[str, str] | None:
    """torchrun's own options (`--name=value` or `--name value`; `_` read as `-`) from a command
    line that runs `torchrun` or `python -m torch.distributed.run`; None for any other program."""
    start = None
    for i, arg in enumerate(argv):
        if arg.rsplit("/", 1)[-1] == "torchrun" or (arg == "torch.distributed.run" and i and argv[i - 1] == "-m"):
            start = i + 1
            break
    if start is None:
        return None
    options: dict[str, str] = {}
    i = start
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" or not arg.startswith("--"):
            break  # the rank's program starts here
        name, eq, value = arg[2:].partition("=")
        name = name.replace("_", "-")
        if not eq and name not in _NO_VALUE and i + 1 < len(argv):
            i += 1
            value = argv[i]
        options[name] = value
        i += 1
        if name == "no-python":
            break
    return options


def of_argv(argv: Sequence[str]) -> Rendezvous | None:
    """The rendezvous of a torchrun command line, or None when `argv` does not run torchrun."""
    options = torchrun_options(argv)
    if options is None:
        return None
    standalone = "standalone" in options
    host, _, port_text = options.get("rdzv-endpoint", "").rpartition(":")
    if not host:  # no port given: torch's default 29400, and "host" is the whole endpoint
        host, port_text = options.get("rdzv-endpoint", ""), ""
    port = int(port_text) if port_text.isdigit() else None
    conf = dict(item.partition("=")[::2] for item in options.get("rdzv-conf", "").split(",") if item)
    join = conf.get("join_timeout", "")
    return Rendezvous(
        standalone=standalone,
        host="localhost" if standalone else host.strip("[]"),
        port=None if standalone else (port if port is not None else 29400),
        nnodes=options.get("nnodes", "1"),
        node_rank=options.get("node-rank"),
        join_timeout_s=int(join) if join.isdigit() else JOIN_TIMEOUT_S,
    )


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1, localhost: an address no other machine can reach this one at."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hosted_here(host: str) -> bool:
    """Whether torch would host the store on this machine: `host` is this machine's name or one
    of its addresses (an address is ours exactly when a socket can bind to it)."""
    if is_loopback(host) or host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


def port_in_use(port: int) -> bool:
    """Whether a program here listens on `port` (on any address), so torch could not host its store.

    Binds as torch's store does (SO_REUSEADDR, so a port a finished run left in TIME_WAIT
    still counts as free), on the IPv4 and, where the machine has it, the IPv6 wildcard."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, wildcard in families:
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((wildcard, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                if exc.errno in (errno.EACCES, errno.EPERM):
                    return True  # a privileged port this user may not host the store on
    return False


def head_port_problem(rdzv: Rendezvous) -> tuple[str, str] | None:
    """(message, fix) when this is node 0 of a multi-node run, the store is to be hosted here, and
    launch.master_port is already taken; else None."""
    if not rdzv.multi_node or rdzv.node_rank != "0" or rdzv.port is None:
        return None
    if not hosted_here(rdzv.host) or not port_in_use(rdzv.port):
        return None
    message = (f"port {rdzv.port} (launch.master_port) is already in use on this machine, the head node (node 0 hosts "
               f"the rendezvous at {rdzv.endpoint}); another program or an earlier run holds it, and torchrun would "
               "join that instead of hosting this run's")
    fix = (f"pick a free port for every node: launch.master_port=PORT (or --master {rdzv.host}:PORT), or stop the "
           f"program that holds it (`ss -ltnp 'sport = :{rdzv.port}'` names it)")
    return message, fix


def failed_in_torch(held: bytes) -> bool:
    """Whether torchrun's own output ends in a rendezvous error (before any rank ran)."""
    return _TORCH_FAILURE.search(held) is not None


def failure_message(rdzv: Rendezvous, *, waited_s: int | None = None, torch_output: bytes = b"") -> tuple[str, str]:
    """(message, fix) for a rendezvous that failed or did not complete within `waited_s`."""
    if rdzv.standalone:
        what = f"torchrun did not start the ranks on this machine within {waited_s} s" if waited_s else \
            "torchrun's single-node rendezvous failed"
        return what, "look for a stuck process of an earlier run (ps), or run the command again"
    when = f"did not complete within {waited_s} s" if waited_s else "failed"
    message = (f"the rendezvous at {rdzv.endpoint} {when} (launch.master_addr = {rdzv.host!r}, "
               f"launch.master_port = {rdzv.port}, {rdzv.nnodes} node(s)); no rank was started")
    cause = _CAUSE.search(torch_output)
    if cause:
        message += f"; torch: {cause.group(1).decode(errors='replace')[:300]}"
    fix = (f"start every node's command within {rdzv.join_timeout_s} s of each other (recipec launch RECIPE "
           "--node-rank K --master ADDR_OF_NODE_0[:PORT] on node K); make launch.master_addr an address of "
           "node 0 that every node can reach, with launch.master_port open between them and held by no "
           "other program")
    if is_loopback(rdzv.host):
        fix += f"; {rdzv.host} is a loopback address, which only works when every node is this machine"
    return message, fix
