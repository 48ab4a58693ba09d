"""Data-parallel training over several processes or Macs, on MLX's own engine: `mlx.launch` starts one rank per
slot, `mx.distributed` (ring, JACCL or MPI) carries the collectives, train/parallel.py holds the rank's side.

    mlxtune lora ... --nproc 2                 two ranks on this machine
    mlxtune lora ... --hosts mac1,mac2         one rank per Mac (this one first: rank 0 writes the run)
    mlxtune lora ... --hosts hosts.json        mlx.launch's hostfile (ssh names, IPs, RDMA devices, backend)
    mlxtune lora ... --hosts ... --check       preflight only: SSH, versions, model/data, backend, world size
    mlxtune dpo|orpo ... --nproc 2             the same for preference runs (PreferenceSettings: the objective)
    mlxtune grpo ... --nproc 2                 and for GRPO (each rank rolls out its share of the step's prompts)

The parent (this module's `train_distributed`) resolves everything once — model, data, run directory, settings —
checks every host, then runs mlx.launch with a rank command that carries those settings (`mlxtune rank-worker`).
Every rank reports its end on stderr as one marker line; a rank that ends without one died. The parent turns that
into one error naming the rank and host, with the checkpoint to resume from.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxtune import __version__
from mlxtune.errors import MlxtuneError, RunFailed, UsageError
from mlxtune.runs import CONFIG_FILE, RESULT_FILE
from mlxtune.storage import temp_dir
from mlxtune.settings import LoraSettings

BACKENDS = ("ring", "jaccl", "mpi")
DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others before failing the run
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
MARKER = "@@mlxtune-rank "  # a rank's last stderr line: JSON {rank, host, status, message, hint}
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


# -- hosts ---------------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One rank: where to start it (`ssh`, "127.0.0.1" for this machine) and the IP the ring backend uses."""

    host: str  # the name the user gave
    ssh: str
    ip: str | None
    local: bool
    rdma: list = field(default_factory=list)


@dataclass
class Layout:
    slots: list[Slot]
    backend: str | None = None  # from the hostfile
    envs: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.slots]

    @property
    def remote(self) -> list[Slot]:
        seen, remote = set(), []
        for slot in self.slots:
            if not slot.local and slot.ssh not in seen:
                seen.add(slot.ssh)
                remote.append(slot)
        return remote


def _is_local_address(ip: str) -> bool:
    """An address is this machine's if a socket can bind to it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
        return True
    except OSError:
        return False


def _resolve(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError):
        return None


def _slot(name: str, ips: list[str], rdma: list) -> Slot:
    if name in LOCAL_NAMES:
        return Slot(name, "127.0.0.1", ips[0] if ips else "127.0.0.1", True, rdma)
    ip = ips[0] if ips else _resolve(name)
    local = name in (socket.gethostname(), socket.gethostname().split(".")[0]) or (ip is not None
                                                                                   and _is_local_address(ip))
    # This machine's rank is started directly (mlx.launch runs "127.0.0.1" without ssh) but listens on its LAN IP.
    return Slot(name, "127.0.0.1" if local else name, ip, local, rdma)


def plan_layout(hosts: str | None, nproc: int | None) -> Layout:
    """`--hosts` (a hostfile path or comma-separated names) and `--nproc` (ranks per host) → one Slot per rank."""
    per_host = nproc or 1
    if per_host < 1:
        raise UsageError(f"--nproc must be at least 1, got {per_host}", "e.g. --nproc 2")
    if not hosts:
        return Layout([_slot("127.0.0.1", [], []) for _ in range(per_host)])
    path = Path(hosts)
    if path.suffix == ".json" or path.is_file():
        entries, backend, envs = _read_hostfile(path)
    else:
        names = [h.strip() for h in hosts.split(",")]
        if not all(names):
            raise UsageError(f"empty host name in --hosts {hosts!r}", "e.g. --hosts mac1,mac2 or --hosts hosts.json")
        entries, backend, envs = [(n, [], []) for n in names], None, []
    slots = [_slot(name, ips, rdma) for name, ips, rdma in entries for _ in range(per_host)]
    missing = sorted({s.host for s in slots if s.ip is None})
    if missing:
        raise UsageError(f"can't resolve the address of {', '.join(missing)}",
                         "give IPs (--hosts 192.168.1.10,192.168.1.11) or a hostfile with \"ips\" for each host")
    if not slots[0].local:
        raise UsageError(f"the first host ({slots[0].host}) is not this machine",
                         "run mlxtune on the first host of the list: rank 0 writes the run directory there")
    return Layout(slots, backend, envs)


def _read_hostfile(path: Path) -> tuple[list[tuple[str, list, list]], str | None, list[str]]:
    """mlx.launch's hostfile: a list of {"ssh", "ips", "rdma"} or {"backend", "envs", "hosts": [...]}."""
    if not path.is_file():
        raise UsageError(f"hostfile not found: {path}", "give a JSON hostfile or comma-separated host names")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        hosts = data["hosts"] if isinstance(data, dict) else data
        entries = [(h["ssh"], list(h.get("ips", [])), list(h.get("rdma", []))) for h in hosts]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a hostfile ({exc})",
                         'write [{"ssh": "mac1", "ips": ["192.168.1.10"]}, ...] (see docs/DISTRIBUTED.md)') from None
    if not entries:
        raise UsageError(f"{path} lists no hosts", "add one entry per Mac")
    backend = data.get("backend") or None if isinstance(data, dict) else None
    envs = list(data.get("envs", [])) if isinstance(data, dict) else []
    return entries, backend, envs


# -- preflight -----------------------------------------------------------------------------------------------
# Run on every remote host with the interpreter that will run the ranks (in-process here): package metadata and
# mlx.core only, so a host without mlxtune still answers and the probe costs no heavy import.
PROBE_FUNCTION = r"""
def probe(paths):
    import os, platform
    from importlib import metadata
    info = {"python": platform.python_version(), "platform": platform.platform(terse=True), "host": platform.node()}
    for name, package in (("mlxtune", "mlxtune"), ("mlx", "mlx"), ("mlx_lm", "mlx-lm")):
        try:
            info[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[name] = None
    try:
        import mlx.core as mx
        info["backends"] = [b for b in ("ring", "jaccl", "mpi") if mx.distributed.is_available(b)]
    except Exception:
        info["backends"] = []
    info["paths"] = {p: os.path.exists(p) for p in paths}
    return info
"""
PROBE = PROBE_FUNCTION + "\nimport json, sys\nprint(json.dumps(probe(sys.argv[1:])))\n"


@dataclass
class HostReport:
    host: str
    reachable: bool
    info: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Preflight:
    world_size: int
    backend: str
    hosts: list[HostReport]
    notes: list[str] = field(default_factory=list)
    formed: int | None = None  # ranks the launcher really formed (only with --check)
    link: str | None = None  # all_sum timing (only with --check)

    @property
    def problems(self) -> list[str]:
        found = [f"{h.host}: {p}" for h in self.hosts for p in h.problems]
        if self.formed is not None and self.formed != self.world_size:
            found.append(f"the launcher formed a world of {self.formed} rank(s), {self.world_size} were asked")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "problems": self.problems}


def _probe(slot: Slot, paths: list[str], python: str) -> HostReport:
    if slot.local and python == sys.executable:  # this very interpreter: no subprocess needed
        namespace: dict = {}
        exec(PROBE_FUNCTION, namespace)
        return HostReport(slot.host, True, namespace["probe"](paths))
    command = [python, "-c", PROBE, *paths]
    if not slot.local:
        command = ["ssh", *SSH_OPTIONS, slot.ssh, shlex.join(command)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return HostReport(slot.host, False, problems=["no answer within 60 s"])
    if done.returncode != 0 or not done.stdout.strip():
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        hint = f"`ssh {slot.ssh}` must log in without a password" if done.returncode == 255 else \
            f"{python} must exist there (the same path as here)"
        return HostReport(slot.host, done.returncode != 255, problems=[f"{why} ({hint})"])
    return HostReport(slot.host, True, json.loads(done.stdout.strip().splitlines()[-1]))


def preflight(layout: Layout, backend: str, paths: list[str], python: str | None = None) -> Preflight:
    """Check every host before any rank loads a model: reachable over SSH, the same Python/mlxtune/MLX/mlx-lm as
    here, the model and data (`paths`) at the same paths, the backend usable (else ring, with a note)."""
    python = python or sys.executable
    reports, seen = [], set()
    for slot in layout.slots:
        if slot.ssh in seen:
            continue
        seen.add(slot.ssh)
        reports.append(_probe(slot, paths, python))
    here = reports[0].info
    for report in reports:
        if not report.info:
            continue
        for key in ("python", "mlxtune", "mlx", "mlx_lm"):
            if report.info.get(key) is None:
                report.problems.append(f"{key} is not installed for {python}")
            elif report.info.get(key) != here.get(key):
                report.problems.append(f"{key} {report.info.get(key)} here {here.get(key)}: install the same version")
        for path, present in report.info.get("paths", {}).items():
            if not present:
                report.problems.append(f"{path} is missing (copy it: rsync -a {path}/ {report.host}:{path}/)")
    chosen, notes = _choose_backend(backend, layout, reports)
    return Preflight(layout.world_size, chosen, reports, notes)


def _choose_backend(backend: str, layout: Layout, reports: list[HostReport]) -> tuple[str, list[str]]:
    if backend == "ring":
        return "ring", []
    unusable = [r.host for r in reports if r.info and backend not in r.info.get("backends", [])]
    if backend == "jaccl" and not unusable and not all(len(s.rdma) == layout.world_size for s in layout.slots):
        unusable = ["the hostfile (no RDMA devices listed; make it with mlx.distributed_config)"]
    if backend == "mpi" and not shutil.which("mpirun"):
        unusable = unusable or ["this machine (no mpirun on PATH)"]
    if layout.world_size > 1 and len({s.ssh for s in layout.slots}) == 1 and backend == "jaccl":
        unusable = unusable or ["a single machine (JACCL links Macs over Thunderbolt)"]
    if unusable:
        why = "Thunderbolt 5 RDMA (macOS 26.2+, enabled in recovery)" if backend == "jaccl" else "an MPI installation"
        return "ring", [f"the {backend} backend is not usable on {', '.join(unusable)}: it needs {why}; using ring"]
    return backend, []


# -- launching -----------------------------------------------------------------------------------------------
def _mlx_launch_command() -> list[str]:
    """mlx.launch through its installed entry point (the same interpreter, whether or not bin/ is on PATH)."""
    try:
        entry = next(iter(importlib.metadata.entry_points(group="console_scripts", name="mlx.launch")))
    except StopIteration:
        raise UsageError("mlx.launch is not installed", "install MLX 0.29 or newer (pip install -U mlx)") from None
    code = f"import sys; sys.argv[0] = 'mlx.launch'; from {entry.module} import {entry.attr} as launch; launch()"
    return [sys.executable, "-c", code]


def _free_port_range(count: int) -> int:
    """A base port with `count` free ports after it (the ring backend listens on base + i per rank)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        try:
            sockets = []
            for offset in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RunFailed("no free range of ports for the ring backend", "close other distributed runs and retry")


def _hostfile(layout: Layout, backend: str) -> dict:
    hosts = []
    for slot in layout.slots:
        entry = {"ssh": slot.ssh, "ips": [slot.ip]}
        if slot.rdma:
            entry["rdma"] = slot.rdma
        hosts.append(entry)
    return {"backend": backend, "envs": layout.envs, "hosts": hosts}


@dataclass
class _Outcome:
    statuses: dict[int, dict] = field(default_factory=dict)
    launcher_lines: list[str] = field(default_factory=list)


def _run_launcher(command: list[str], outcome: _Outcome, timeout: float, echo_out, echo_err, env=None) -> int:
    """Run mlx.launch, streaming the ranks' output, collecting their end markers. A first Ctrl-C asks every rank to
    stop at the next step (a line on their stdin, which mlx.launch forwards to all); a second one ends them. If a
    rank fails and the others haven't ended `timeout` s later, the whole launch is killed: never a hang."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, env=env)
    first_failure: list[float] = []

    def pump(stream, echo, is_err):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            if line.startswith(MARKER):
                try:
                    status = json.loads(line[len(MARKER):])
                except ValueError:
                    continue
                outcome.statuses[status["rank"]] = status
                if status["status"] != "done" and not first_failure:
                    first_failure.append(time.monotonic())
                continue
            if is_err and ("[WARN]" in line or "[ERROR]" in line):
                outcome.launcher_lines.append(line.strip())
                if not first_failure and ("killed" in line or "exited with code" in line):
                    first_failure.append(time.monotonic())
            echo(line)

    readers = [threading.Thread(target=pump, args=(process.stdout, echo_out, False), daemon=True),
               threading.Thread(target=pump, args=(process.stderr, echo_err, True), daemon=True)]
    for reader in readers:
        reader.start()
    interrupts = []

    def on_interrupt(signum, frame):
        interrupts.append(signum)
        if len(interrupts) == 1:
            echo_err("stopping every rank after this step (Ctrl-C again to abort at once)\n")
            try:
                process.stdin.write(b"stop\n")
                process.stdin.flush()
            except OSError:
                pass
        else:
            _kill_group(process)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while process.poll() is None:
            time.sleep(0.2)
            if first_failure and time.monotonic() - first_failure[0] > timeout:
                outcome.launcher_lines.append(f"ranks still running {timeout:.0f} s after a failure: ended")
                _kill_group(process)
    finally:
        signal.signal(signal.SIGINT, previous)
        for reader in readers:
            reader.join(timeout=5)
    return process.returncode


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rank_command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "mlxtune", "rank-worker", json.dumps(spec, separators=(",", ":"))]


def _sync_run_dir(run_dir: Path, layout: Layout) -> None:
    """Before a resume over several Macs, every host gets rank 0's run directory (config and checkpoints), so all
    ranks resume from the same checkpoint."""
    for slot in layout.remote:
        target = f"{slot.ssh}:{run_dir}"
        mkdir = subprocess.run(["ssh", *SSH_OPTIONS, slot.ssh, f"mkdir -p {shlex.quote(str(run_dir))}"],
                               capture_output=True, text=True, timeout=60)
        copy = ["rsync", "-a", "--delete", f"{run_dir}/", f"{target}/"] if shutil.which("rsync") else \
            ["scp", "-rq", *SSH_OPTIONS, f"{run_dir}/.", f"{target}/"]
        done = subprocess.run(copy, capture_output=True, text=True) if mkdir.returncode == 0 else mkdir
        if done.returncode != 0:
            raise RunFailed(f"could not copy {run_dir} to {slot.host}: {done.stderr.strip()}",
                            "check SSH access and disk space there")


def _command(settings: LoraSettings) -> str:
    """The command a run belongs to: lora, grpo (GrpoSettings), or a preference objective (PreferenceSettings
    carries it)."""
    from mlxtune.settings import GrpoSettings

    if isinstance(settings, GrpoSettings):
        return "grpo"
    return getattr(settings, "objective", None) or "lora"


def train_distributed(settings: LoraSettings, *, resume: bool, hosts: str | None, nproc: int | None,
                      backend: str = "ring", timeout: float = DEFAULT_TIMEOUT, console=None, json_mode: bool = False):
    """Run `settings` (LoraSettings, PreferenceSettings for dpo/orpo, GrpoSettings for grpo) as a data-parallel
    job; returns rank 0's result (as a dict)."""
    # Only light imports here: the ranks load MLX models; the parent just launches and watches them.
    from mlxtune.data.dataset import resolve_data_path
    from mlxtune.train.parallel import check_resume_ranks
    from mlxtune.train.runsetup import check_from_run
    from mlxtune.train.recovery import has_training
    from mlxtune.model_config import model_name
    from mlxtune.models import resolve_model
    from mlxtune.runs import default_run_dir
    from mlxtune.ui import make_console

    console = console or make_console(json_mode)
    command = _command(settings)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    layout = plan_layout(hosts, nproc)
    settings = type(settings)(**settings.to_dict()).validate()
    check_from_run(getattr(settings, "from_run", None), resume, distributed=True)
    if not settings.data:
        raise UsageError("no data given", "pass --data with a directory of train/valid .jsonl files or one file")
    model_path = resolve_model(settings.model, console=console) if settings.model else None
    if model_path is None:
        raise UsageError("--model is needed with --nproc/--hosts", "give the model every host has, e.g. a library name")
    data_path = resolve_data_path(settings.data).resolve()
    objective = None if command == "lora" else command
    run_dir = Path(settings.out or default_run_dir(model_name(model_path), objective)).resolve()
    if not resume and has_training(run_dir):  # rank 0 claims (and locks) the directory itself
        raise UsageError(f"run directory {run_dir} already exists",
                         f"continue it with: mlxtune {command} --resume {run_dir} {_world_flags(hosts, nproc)}   "
                         "(or pick another --out)")
    settings.model, settings.data, settings.out = str(Path(model_path).resolve()), str(data_path), str(run_dir)

    paths = [settings.model, settings.data]
    if command == "grpo":  # a bad reward fails here, before any rank starts; its files must be on every host
        from mlxtune.train.grpo.rewards import parse_rewards, reward_files

        paths += reward_files(parse_rewards(settings.reward or []))
    report = preflight(layout, layout.backend or backend, paths)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    if not report.ok:
        raise UsageError("preflight failed: " + "; ".join(report.problems),
                         f"fix the hosts listed; `mlxtune {command} --hosts ... --check` checks again without training")
    if resume:
        check_resume_ranks(run_dir, layout.world_size)
        _sync_run_dir(run_dir, layout)
    run_dir.mkdir(parents=True, exist_ok=True)

    resume_hint = f"continue with: mlxtune {command} --resume {run_dir} {_world_flags(hosts, nproc)}"
    spec = {"command": command, "settings": settings.to_dict(), "resume": resume, "world_size": layout.world_size,
            "backend": report.backend, "hosts": layout.hosts, "timeout": timeout, "resume_hint": resume_hint,
            "json": json_mode}
    outcome = _launch(layout, report.backend, _rank_command(spec), timeout, json_mode)
    return _finish(outcome, layout, run_dir, resume_hint)


def _world_flags(hosts: str | None, nproc: int | None) -> str:
    flags = []
    if hosts:
        flags.append(f"--hosts {shlex.quote(hosts)}")
    if nproc:
        flags.append(f"--nproc {nproc}")
    return " ".join(flags)


def _launch(layout: Layout, backend: str, rank_command: list[str], timeout: float, json_mode: bool) -> _Outcome:
    # named with our PID (storage.temp_dir): a killed launcher's folder is removed by the next launch
    scratch = temp_dir("mlxtune-launch-")
    try:
        hostfile = Path(scratch) / "hosts.json"
        hostfile.write_text(json.dumps(_hostfile(layout, backend)), encoding="utf-8")
        command = [*_mlx_launch_command(), "--hostfile", str(hostfile), "--backend", backend,
                   "--starting-port", str(_free_port_range(layout.world_size))]
        outcome = _Outcome()

        def to_stdout(text):
            stream = sys.stderr if json_mode else sys.stdout  # --json: stdout carries the result alone
            stream.write(text)
            stream.flush()

        def to_stderr(text):
            sys.stderr.write(text)
            sys.stderr.flush()

        env = dict(os.environ)
        here = sum(slot.local for slot in layout.slots)
        if here > 1 and "OPENBLAS_NUM_THREADS" not in env:
            # Ranks sharing this machine share its cores: one BLAS pool per core each would oversubscribe them.
            env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // here))
        _run_launcher([*command, "--", *rank_command], outcome, timeout, to_stdout, to_stderr, env)
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finish(outcome: _Outcome, layout: Layout, run_dir: Path, resume_hint: str) -> dict:
    statuses = outcome.statuses
    if len(statuses) == layout.world_size and all(s["status"] == "done" for s in statuses.values()):
        result_file = run_dir / RESULT_FILE
        return json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    silent = [r for r in range(layout.world_size) if r not in statuses]
    failed = [s for s in statuses.values() if s["status"] != "done"]
    if silent:
        rank = silent[0]
        message = f"rank {rank} ({layout.slots[rank].host}) died without finishing (killed or crashed)"
        others = [f"rank {s['rank']}: {s['message']}" for s in sorted(failed, key=lambda s: s["rank"])]
        if others:
            message += "; then " + "; ".join(others)
    else:
        first = sorted(failed, key=lambda s: s["rank"])[0]
        same = all(s["message"] == first["message"] for s in failed)
        message = first["message"] if same else "; ".join(f"rank {s['rank']}: {s['message']}" for s in failed)
        if first.get("exit_code") == 2 and first.get("hint"):
            raise UsageError(message, first["hint"])
    checkpoint = _latest_checkpoint_name(run_dir)
    hint = (f"the last checkpoint is {checkpoint}; {resume_hint}" if checkpoint
            else "no checkpoint was written yet: start the run again")
    raise RunFailed(message, hint)


def _latest_checkpoint_name(run_dir: Path) -> str | None:
    from mlxtune.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    return checkpoint.name if checkpoint else None


# -- preflight with a real launch (--check) ---------------------------------------------------------------------
def check_hosts(settings: LoraSettings, *, hosts: str | None, nproc: int | None, backend: str = "ring",
                timeout: float = DEFAULT_TIMEOUT, console=None) -> Preflight:
    """`--check`: the preflight, then a real launch of every rank that forms the world, sums a 16 MB array across
    it and reports the world size the launcher formed and the time the sum took. Trains nothing."""
    from mlxtune.models import resolve_model

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    layout = plan_layout(hosts, nproc)
    paths = [str(Path(p).resolve()) if Path(p).exists() else p for p in
             (resolve_model(settings.model, console=console) if settings.model else None, settings.data) if p]
    report = preflight(layout, layout.backend or backend, paths)
    if any(not h.reachable for h in report.hosts):
        return report
    spec = {"world_size": layout.world_size, "backend": report.backend, "hosts": layout.hosts,
            "timeout": min(timeout, 60.0)}
    command = [sys.executable, "-m", "mlxtune", "rank-worker", "--hello", json.dumps(spec, separators=(",", ":"))]
    outcome = _launch(layout, report.backend, command, spec["timeout"], json_mode=True)
    hello = [s for s in outcome.statuses.values() if s["status"] == "done"]
    if hello:
        report.formed = hello[0].get("formed")
        report.link = hello[0].get("link")
    else:
        report.formed = 0
        failure = next(iter(outcome.statuses.values()), None)
        report.hosts[0].problems.append("the ranks could not form a world"
                                        + (f": {failure['message']}" if failure else ""))
    return report


def preflight_rows(report: Preflight) -> list[tuple[str, str]]:
    """The preflight as table rows: one per host, then the backend, world and verdict."""
    rows = []
    for host in report.hosts:
        info = host.info
        facts = (f"python {info.get('python')}, mlxtune {info.get('mlxtune')}, mlx {info.get('mlx')}, "
                 f"mlx-lm {info.get('mlx_lm')}" if info else "unreachable" if not host.reachable else "no answer")
        rows.append((host.host, facts + ("".join(f"\n[red]✗[/] {p}" for p in host.problems) or "  [green]✓[/]")))
    rows.append(("backend", report.backend + "".join(f"\n[yellow]note:[/] {n}" for n in report.notes)))
    formed = "not launched" if report.formed is None else f"{report.formed} formed"
    rows.append(("ranks", f"{report.world_size} asked, {formed}" + (f" · {report.link}" if report.link else "")))
    rows.append(("verdict", "[green]ready[/]" if report.ok else "[red]not ready:[/] " + "; ".join(report.problems)))
    return rows


# -- the rank's side -----------------------------------------------------------------------------------------
def _marker(rank: int, host: str, status: str, message: str = "", hint: str | None = None, **extra) -> None:
    sys.stderr.write(MARKER + json.dumps({"rank": rank, "host": host, "status": status, "message": message,
                                          "hint": hint, **extra}) + "\n")
    sys.stderr.flush()


def _software() -> dict:
    return {"python": platform.python_version(), "mlxtune": __version__,
            "mlx": importlib.metadata.version("mlx"), "mlx_lm": importlib.metadata.version("mlx-lm")}


def _join(spec: dict):
    """Form the world under a watchdog; the group, or an error when it can't form or has the wrong size."""
    import mlx.core as mx

    from mlxtune.train.parallel import Watchdog

    rank = int(os.environ.get("MLX_RANK", "0"))
    watchdog = Watchdog()
    watchdog.arm(spec["timeout"], f"rank {rank} could not reach the other ranks within {spec['timeout']:.0f} s "
                                  "(a host is unreachable or a firewall blocks the ring ports)")
    try:
        group = mx.distributed.init(strict=True, backend=spec["backend"])
    except RuntimeError as exc:
        raise RunFailed(f"rank {rank} could not join the {spec['backend']} world: {exc}",
                        "check that every host can reach the others' IPs (see docs/DISTRIBUTED.md)") from None
    finally:
        watchdog.disarm()
    if group.size() != spec["world_size"]:
        raise RunFailed(f"the launcher formed a world of {group.size()} rank(s), {spec['world_size']} were asked",
                        "check the hostfile and that mlx.launch started every host")
    return group, watchdog


def run_rank(spec_text: str, hello: bool = False, debug: bool = False) -> int:
    """One rank (started by mlx.launch): join the world, check that every rank has the same data, model, settings
    and software, train, and end with a marker line. Returns the process exit code."""
    spec = json.loads(spec_text)
    rank = int(os.environ.get("MLX_RANK", "0"))
    hosts = spec.get("hosts") or []
    host = hosts[rank] if rank < len(hosts) else socket.gethostname()
    try:
        group, watchdog = _join(spec)
        if hello:
            return _hello(group, host)
        return _train_rank(spec, group, watchdog, host)
    except MlxtuneError as exc:
        _marker(rank, host, "failed", exc.message, exc.hint, exit_code=exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # a bug of ours: say so on this rank, with the traceback behind --debug
        if debug:
            import traceback

            traceback.print_exc()
        _marker(rank, host, "failed", f"internal error on rank {rank}: {type(exc).__name__}: {exc}",
                "rerun with `mlxtune --debug ...` and report the traceback", exit_code=1)
        return 1


def _hello(group, host: str) -> int:
    import mlx.core as mx

    data = mx.ones((4 * 1024 * 1024,))  # 16 MB of float32
    mx.eval(mx.distributed.all_sum(data, stream=mx.cpu))  # warm up the connections
    tic = time.perf_counter()
    total = mx.distributed.all_sum(data, stream=mx.cpu)
    mx.eval(total)
    seconds = time.perf_counter() - tic
    ok = total[0].item() == group.size()
    _marker(group.rank(), host, "done" if ok else "failed", "" if ok else "all_sum returned a wrong value",
            formed=group.size(), link=f"all_sum of 16 MB in {seconds * 1000:.1f} ms")
    return 0 if ok else 1


def _watch_stdin_for_stop() -> None:
    """mlx.launch forwards the parent's stdin to every rank: a `stop` line is the parent's Ctrl-C, handled like a
    local one (finish the step, save, stop — at the same step on every rank)."""

    def watch():
        for line in sys.stdin:
            if line.strip() == "stop":
                os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="mlxtune-stop", daemon=True).start()


def _train_rank(spec: dict, group, watchdog, host: str) -> int:
    from mlxtune.train.parallel import DataParallel, fingerprint
    from mlxtune.ui import make_console

    parallel = DataParallel(group, spec["hosts"], spec["timeout"], spec["resume_hint"], spec["backend"], watchdog)
    settings = LoraSettings(**{k: v for k, v in spec["settings"].items() if k in LoraSettings.__dataclass_fields__})
    parallel.check_same(fingerprint(settings.model, settings.data, spec["settings"], _software()))
    _watch_stdin_for_stop()
    console = make_console(spec.get("json", False), quiet=not parallel.is_main)
    # after the check: a refused rank stops before the heavy imports
    if spec["command"] == "grpo":
        from mlxtune.settings import GrpoSettings
        from mlxtune.train.grpo.run import train_grpo

        result = train_grpo(GrpoSettings(**spec["settings"]), resume=spec["resume"], console=console,
                            parallel=parallel)
    elif spec["command"] in ("dpo", "orpo"):
        from mlxtune.train.preference.run import PreferenceSettings, train_preference

        result = train_preference(PreferenceSettings(**spec["settings"]), resume=spec["resume"],
                                  console=console, parallel=parallel)
    else:
        from mlxtune.train.loop import finetune

        result = finetune(settings, resume=spec["resume"], console=console, parallel=parallel)
    _marker(parallel.rank, host, "done", result.stopped)
    return 0
