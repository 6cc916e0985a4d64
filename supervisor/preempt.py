"""Cloud preemption notices (`nanochat-run train --preemption`): poll the machine's metadata service for the warning
a spot/preemptible machine gets before it is taken back, and hand the first notice to the agent, which treats it as a
SIGTERM (lifecycle.py: save at the current step, flush the upload, exit 75 so the job is requeued).

The clouds, as they document their metadata services:
- aws: IMDSv2. PUT /latest/api/token (header X-aws-ec2-metadata-token-ttl-seconds) gives a session token; GET
  /latest/meta-data/spot/instance-action with X-aws-ec2-metadata-token is 404 until a notice, then JSON
  {"action": "terminate"|"stop"|"hibernate", "time": "<UTC ISO 8601>"} (about two minutes ahead). A 401 means
  the token expired: get a new one.
- gcp: GET /computeMetadata/v1/instance/preempted with Metadata-Flavor: Google answers FALSE, then TRUE (about 30 s
  ahead; the answer carries no deadline).
- azure: GET /metadata/scheduledevents?api-version=2020-07-01 with Metadata: true answers {"DocumentIncarnation": n,
  "Events": [...]}; an event of type Preempt (a Spot eviction, at least 30 s ahead) or Terminate that lists this
  machine (/metadata/instance/compute/name) in "Resources" is a notice; "NotBefore" says when (RFC 1123; may be
  empty).

The poller is a daemon thread with short HTTP timeouts: it never blocks the supervisor, and a network error is said
once, then retried quietly. `--preemption auto` reads the machine's DMI strings (no network): which cloud, or none.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CLOUDS = ("aws", "gcp", "azure")
CHOICES = ("auto", *CLOUDS, "off")
POLL_EVERY = 2.0  # seconds between polls: AWS asks for at most 5 s; a local HTTP request costs next to nothing
HTTP_TIMEOUT = 1.0  # per request: the metadata services are link-local and answer in milliseconds
TOKEN_TTL = 21600  # seconds an IMDSv2 token is asked to live (the most AWS allows); renewed a minute early
DMI_DIR = Path("/sys/class/dmi/id")
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"  # Azure's chassis asset tag (plain Hyper-V has none)
HOSTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal", "azure": "http://169.254.169.254"}
# when a notice carries no deadline: the least warning each cloud documents
DEFAULT_WARNING = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}


@dataclass(frozen=True)
class Notice:
    """A preemption notice: which cloud, what it will do, when it was seen and when the machine goes (epoch s)."""

    cloud: str
    action: str
    seen: float
    deadline: float

    @property
    def warning(self) -> float:
        """Seconds between seeing the notice and the machine going."""
        return self.deadline - self.seen


def check(choice: str, endpoint: str | None) -> str | None:
    """The problem with --preemption / --preemption-endpoint, as one line with the fix; None when fine."""
    if choice not in CHOICES:
        return f"--preemption must be one of {'|'.join(CHOICES)}, got {choice!r}"
    if endpoint is not None:
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme != "http" or not u.netloc or u.path.strip("/") or u.query:
            return f"--preemption-endpoint must be http://HOST[:PORT] (e.g. http://127.0.0.1:8080), got {endpoint!r}"
    return None


def detect(dmi_dir: Path = DMI_DIR) -> tuple[str | None, str]:
    """(the cloud this machine runs on, or None; what showed it), from DMI strings the firmware sets: no network."""

    def read(name: str) -> str:
        try:
            return (dmi_dir / name).read_text(errors="replace").strip()
        except OSError:
            return ""

    vendor, bios, product = read("sys_vendor"), read("bios_vendor"), read("product_name")
    if "Amazon EC2" in (vendor, bios):
        return "aws", f"DMI vendor {'Amazon EC2'!r}"
    if "amazon" in read("product_version").lower() or "amazon" in read("bios_version").lower():
        return "aws", "DMI version 'amazon' (a Xen instance)"  # the older, Xen-based instance types
    if vendor == "Google" or product == "Google Compute Engine":
        return "gcp", f"DMI product {product or vendor!r}"
    if vendor == "Microsoft Corporation" and read("chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure", "DMI chassis asset tag of Azure"
    return None, f"DMI vendor {vendor!r}" if vendor else f"no DMI strings in {dmi_dir}"


def _epoch(text: str, fallback: float) -> float:
    """An ISO 8601 (AWS) or RFC 1123 (Azure) UTC time as epoch seconds; `fallback` when empty or unreadable."""
    text = (text or "").strip()
    if not text:
        return fallback
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return fallback


class Client:
    """One cloud's metadata service: `poll()` is a Notice, or None while there is none. HTTP and parse errors raise
    OSError / ValueError for the Poller to report."""

    def __init__(self, cloud: str, endpoint: str | None = None):
        self.cloud = cloud
        self.host = (endpoint or HOSTS[cloud]).rstrip("/")
        # never through a proxy from the environment: the metadata service is on this machine's own link
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.token: str | None = None
        self.token_until = 0.0
        self.vm_name: str | None = None  # azure: this machine's name, as scheduled events list it

    def _get(self, path: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
        req = urllib.request.Request(self.host + path, headers=headers, method=method)
        try:
            with self.opener.open(req, timeout=HTTP_TIMEOUT) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode(errors="replace")

    def poll(self) -> Notice | None:
        return getattr(self, f"_{self.cloud}")(time.time())

    def _aws(self, now: float) -> Notice | None:
        for _ in range(2):  # a 401: the token expired (or the service restarted); one new token, one retry
            if self.token is None or now >= self.token_until:
                ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}
                code, body = self._get("/latest/api/token", ttl, method="PUT")
                if code != 200 or not body:
                    raise OSError(f"the IMDSv2 token request answered HTTP {code}")
                self.token, self.token_until = body.strip(), now + TOKEN_TTL - 60
            code, body = self._get("/latest/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": self.token})
            if code == 401:
                self.token = None
                continue
            if code == 404:
                return None  # no notice
            if code != 200:
                raise OSError(f"spot/instance-action answered HTTP {code}")
            doc = json.loads(body)
            return Notice("aws", str(doc.get("action", "terminate")), now,
                          _epoch(str(doc.get("time", "")), now + DEFAULT_WARNING["aws"]))  # fmt: skip
        raise OSError("spot/instance-action answered HTTP 401 with a fresh IMDSv2 token")

    def _gcp(self, now: float) -> Notice | None:
        code, body = self._get("/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        if code != 200:
            raise OSError(f"instance/preempted answered HTTP {code}")
        if body.strip().upper() != "TRUE":
            return None
        return Notice("gcp", "preempt", now, now + DEFAULT_WARNING["gcp"])

    def _azure(self, now: float) -> Notice | None:
        code, body = self._get("/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
        if code != 200:
            raise OSError(f"scheduledevents answered HTTP {code}")
        events = [e for e in json.loads(body).get("Events", []) if e.get("EventType") in ("Preempt", "Terminate")]
        if events and self.vm_name is None:  # the events of a scale set or availability set reach all its machines
            code, name = self._get("/metadata/instance/compute/name?api-version=2021-02-01&format=text",
                                   {"Metadata": "true"})  # fmt: skip
            if code != 200:
                raise OSError(f"instance/compute/name answered HTTP {code}")
            self.vm_name = name.strip()
        events = [e for e in events if not e.get("Resources") or self.vm_name in e["Resources"]]
        if not events:
            return None
        first = min(_epoch(str(e.get("NotBefore", "")), now + DEFAULT_WARNING["azure"]) for e in events)
        kind = "preempt" if any(e.get("EventType") == "Preempt" for e in events) else "terminate"
        return Notice("azure", kind, now, first)


class Poller:
    """Polls one cloud every `every` seconds in a daemon thread; calls `on_notice` once, on the first notice."""

    def __init__(self, client: Client, on_notice: Callable[[Notice], None], say: Callable[[str], None],
                 every: float = POLL_EVERY):  # fmt: skip
        self.client, self.on_notice, self.say, self.every = client, on_notice, say, every
        self.notice: Notice | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"preemption-{client.cloud}", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HTTP_TIMEOUT * 3)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                notice = self.client.poll()
            except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON that is not an object
                if not failing:  # once per outage: a flapping link must not flood the log
                    self.say(f"preemption: cannot read the {self.client.cloud} metadata service at {self.client.host}"
                             f" ({e}); retrying every {self.every:g}s")  # fmt: skip
                failing = True
            else:
                if failing:
                    self.say(f"preemption: the {self.client.cloud} metadata service answers again")
                failing = False
                if notice is not None and not self._stop.is_set():
                    self.notice = notice
                    self.on_notice(notice)
                    return
            self._stop.wait(self.every)


def start(choice: str, endpoint: str | None, on_notice: Callable[[Notice], None], say: Callable[[str], None],
          dmi_dir: Path = DMI_DIR) -> Poller | None:  # fmt: skip
    """The running Poller for --preemption `choice` (auto: the detected cloud), or None (off, or no cloud found);
    says which in one line."""
    if choice == "off":
        return None
    cloud, why = (choice, "--preemption") if choice != "auto" else detect(dmi_dir)
    if cloud is None:
        say(f"preemption: no cloud detected ({why}); not watching for notices (--preemption aws|gcp|azure forces one)")
        return None
    client = Client(cloud, endpoint)
    say(f"preemption: {cloud} ({why}); watching {client.host} for a notice every {POLL_EVERY:g}s: on one, a save at"
        " the current step and exit 75 (requeue)")  # fmt: skip
    return Poller(client, on_notice, say).start()
