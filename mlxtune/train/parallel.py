"""One rank's view of a data-parallel run on MLX's collectives (`mx.distributed`); identity when alone.

Every optimizer step's batches are planned for the whole world (budget × ranks), and each rank takes every
N-th row of each batch: together the ranks see exactly what one process with the N× budget would. Loss sums,
supervised-token counts and gradient sums are all_sum'd, so the update divides the world's gradient sum by the
world's supervised tokens — the same per-token mean as one rank with the whole batch.

A rank never waits forever: every collective runs under a watchdog that ends the process with a clear message
when the others don't answer within the timeout (a dead peer usually shows sooner: the ring backend reports the
lost connection at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxtune.errors import RunFailed, UsageError
from mlxtune.runs import RUN_FILE

HOST_BYTES = 64  # a host name travels as this many bytes in the start-up check
EXIT_RUN_FAILED = 1


class Watchdog:
    """Ends the process when an armed deadline passes: a collective blocked on a vanished peer can't be interrupted
    from Python (signal handlers only run between bytecodes), so waiting longer than `timeout` is turned into a
    clear error and an exit, never a hang."""

    def __init__(self):
        self._deadline: float | None = None
        self._message = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="mlxtune-watchdog", daemon=True)
        self._thread.start()

    def arm(self, seconds: float, message: str) -> None:
        with self._lock:
            self._deadline, self._message = time.monotonic() + seconds, message

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                message = self._message
            if expired:
                sys.stderr.write(f"error: {message}\n")
                sys.stderr.flush()
                os._exit(EXIT_RUN_FAILED)


class DataParallel:
    """Rank, world size and the collectives the training loop needs. `DataParallel()` is the single-process case:
    every method returns its input."""

    def __init__(self, group=None, hosts: list[str] | None = None, timeout: float = 300.0, resume_hint: str = "",
                 backend: str = "ring", watchdog: Watchdog | None = None):
        self.group = group
        self.backend = backend
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.hosts = hosts or ["localhost"] * self.size
        self.timeout = timeout
        self.resume_hint = resume_hint  # how to continue the run, for error messages
        self._slowest_step = 0.0
        self._last_return = time.monotonic()
        self._watchdog = watchdog or (Watchdog() if self.size > 1 else None)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory (checkpoints, metrics, plots, best adapter)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def host(self, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        return self.hosts[rank] if rank < len(self.hosts) else f"rank {rank}"

    def describe(self) -> str:
        """For the run header: how many ranks on which hosts."""
        counts: dict[str, int] = {}
        for host in self.hosts[: self.size]:
            counts[host] = counts.get(host, 0) + 1
        where = ", ".join(f"{host} ×{n}" if n > 1 else host for host, n in counts.items())
        return f"{self.size} over {self.backend} ({where}); each computes 1/{self.size} of every batch"

    def step_seed(self, seed: int) -> int:
        """The RNG seed of one step on this rank (dropout): rank 0 keeps the single-process seed, the others
        derive their own from (seed, rank) so ranks don't share dropout masks."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint64)[0])

    # -- batches ---------------------------------------------------------------------------------------------
    def world_batch(self, batch_size: int, batch_tokens: int | None) -> tuple[int, int | None]:
        """Per-rank batch size / token budget → the whole step's (what the batch plan is made for)."""
        return batch_size * self.size, batch_tokens * self.size if batch_tokens else None

    def mine(self, index: int) -> bool:
        """Whether the index-th of a fixed sequence (validation batches) is this rank's to compute."""
        return index % self.size == self.rank

    # -- collectives -----------------------------------------------------------------------------------------
    @contextmanager
    def waiting(self, what: str):
        """Run a collective under the watchdog; a lost peer becomes a RunFailed naming this rank and host."""
        if not self.distributed:
            yield
            return
        # The others may still be computing their share: allow the slowest step seen so far several times over.
        limit = max(self.timeout, 10 * self._slowest_step)
        self._watchdog.arm(limit, f"rank {self.rank} ({self.host()}) waited {limit:.0f} s for the other ranks "
                                  f"during {what}: a rank stopped or a host became unreachable. {self.resume_hint}")
        try:
            yield
        except RuntimeError as exc:  # the backend's report of a closed or failed connection
            raise RunFailed(f"rank {self.rank} ({self.host()}) lost the other ranks during {what}: {exc}",
                            self.resume_hint or None) from None
        finally:
            self._watchdog.disarm()

    def reduce_step(self, loss_sum: mx.array, count: mx.array, tokens: int, grads):
        """The world's loss sum, supervised-token count, token count and gradient sum of one optimizer step."""
        if not self.distributed:
            return loss_sum, count, tokens, grads
        self._slowest_step = max(self._slowest_step, time.monotonic() - self._last_return)
        with self.waiting("a gradient exchange"):
            totals = mx.distributed.all_sum(mx.stack([loss_sum.astype(mx.float32), count.astype(mx.float32),
                                                      mx.array(float(tokens))]), stream=mx.cpu)
            # MLX's helper packs the many small arrays into few all_sums; it averages, we need the sum
            # (× size is exact for a power-of-two world).
            grads = tree_map(lambda g: g * self.size, nn.average_gradients(grads))
            mx.eval(totals, grads)
        self._last_return = time.monotonic()
        return totals[0], totals[1], int(totals[2].item()), grads

    def sum(self, *values: mx.array) -> tuple[mx.array, ...]:
        """all_sum of a few scalars (e.g. validation loss sum and count)."""
        if not self.distributed:
            return values
        with self.waiting("validation"):
            totals = mx.distributed.all_sum(mx.stack([v.astype(mx.float32) for v in values]), stream=mx.cpu)
            mx.eval(totals)
        return tuple(totals[i] for i in range(len(values)))

    def any(self, flag) -> bool:
        """Whether any rank's flag is set (a stop request seen by one rank stops all at the same step)."""
        if not self.distributed:
            return bool(flag)
        with self.waiting("the stop check"):
            total = mx.distributed.all_sum(mx.array([1.0 if flag else 0.0]), stream=mx.cpu)
            mx.eval(total)
        return total.item() > 0

    def broadcast_weights(self, model) -> None:
        """Rank 0's trainable weights everywhere: every rank starts (or resumes) from exactly the same point."""
        if not self.distributed:
            return
        weights = tree_flatten(model.trainable_parameters())
        with self.waiting("the start-up weight sync"):
            synced = [(k, mx.distributed.all_sum(v if self.is_main else mx.zeros_like(v), stream=mx.cpu))
                      for k, v in weights]
            mx.eval([v for _, v in synced])
        model.update(tree_unflatten(synced))

    def check_same(self, fingerprint: dict[str, str]) -> None:
        """Start-up check: every rank's fingerprint (data, model, software, settings) must equal rank 0's; a
        difference stops every rank with the same message naming the host that differs."""
        if not self.distributed:
            return
        names = list(fingerprint)
        mine = b"".join(bytes.fromhex(fingerprint[n]) for n in names)
        host = self.host().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
        with self.waiting("the start-up check"):
            gathered = mx.distributed.all_gather(mx.array(np.frombuffer(mine + host, np.uint8)), stream=mx.cpu)
            mx.eval(gathered)
        rows = np.array(gathered).reshape(self.size, -1)
        digests = {rank: rows[rank, : 32 * len(names)].tobytes() for rank in range(self.size)}
        hosts = {rank: rows[rank, 32 * len(names) :].tobytes().rstrip(b"\0").decode(errors="replace")
                 for rank in range(self.size)}
        problems = []
        for rank in range(1, self.size):
            differing = [n for i, n in enumerate(names)
                         if digests[rank][32 * i : 32 * (i + 1)] != digests[0][32 * i : 32 * (i + 1)]]
            if differing:
                problems.append(f"rank {rank} on {hosts[rank]} has different {' and '.join(differing)} than "
                                f"rank 0 on {hosts[0]}")
        if problems:
            raise RunFailed("start-up check failed: " + "; ".join(problems),
                            "every host needs the same data files, model, settings and mlxtune/MLX/mlx-lm versions "
                            "at the same paths (copy them with rsync -a); `mlxtune lora --hosts ... --check` shows "
                            "what differs")


def check_resume_ranks(run_dir: Path, ranks: int) -> None:
    """A run continues on as many ranks as it trained on: the per-rank budget × ranks makes its batches, so another
    world size would draw other batches than the original run."""
    try:
        trained_on = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8")).get("ranks", 1)
    except (OSError, ValueError):
        return
    if trained_on != ranks:
        how = f"--nproc {trained_on} (or --hosts with {trained_on} ranks)" if trained_on > 1 else "without --nproc/--hosts"
        raise UsageError(f"{run_dir} trained on {trained_on} rank(s), this resume has {ranks}",
                         f"resume it {how}: the batches of every step depend on the number of ranks")


def fingerprint(model_path: str | Path, data_path: str | Path, settings: dict, software: dict) -> dict[str, str]:
    """What every rank must agree on, hashed: the data files, the model's config and tokenizer (weights by name and
    size: hashing gigabytes at every start would cost more than it finds), the settings (paths aside: those are
    compared by content) and the software versions."""
    return {
        "data": _hash_files(Path(data_path), everything=True),
        "model": _hash_files(Path(model_path), everything=False),
        "software": _hash_bytes(json.dumps(software, sort_keys=True).encode()),
        "settings": _hash_bytes(json.dumps({k: v for k, v in settings.items() if k not in ("model", "data", "out")},
                                           sort_keys=True, default=str).encode()),
    }


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MODEL_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "chat_template.jinja")


def _hash_files(root: Path, everything: bool) -> str:
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in files:
        name = path.name if root.is_file() else str(path.relative_to(root))
        digest.update(name.encode() + b"\0")
        if everything or path.name in MODEL_TEXT_FILES:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(str(path.stat().st_size).encode())
        digest.update(b"\0")
    return digest.hexdigest()
