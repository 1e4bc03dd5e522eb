r"""Run one untrusted Python program in a throwaway process sandbox and return a verdict.

    python -m sdiff_jax.evaluate.sandbox PROGRAM.py --timeout_s=10 --memory_mb=1024

Functional-correctness benchmarks (HumanEval, `evaluate.humaneval`) execute code a model
wrote. Such code is usually just wrong, sometimes runaway (infinite loops, fork loops,
huge allocations or outputs) and could be hostile, so it never runs inside the
evaluator: each program is its own `python -I -B` process (sys.executable, isolated mode)
in a new session (`start_new_session`, so its pid is also its process-group and session
id), with a stripped environment (PATH, HOME = its working directory, LANG,
PYTHONHASHSEED=0, PYTHONDONTWRITEBYTECODE=1; `-I` makes the interpreter itself ignore the
PYTHON* variables, so its string hashes stay randomized and `-B` is what keeps .pyc files
out; child interpreters that run without `-I` do see them), stdin from /dev/null and
stdout/stderr into unlinked temporary files, of which the verdict keeps the last
`TAIL_CHARS` characters (a flooding program is stopped by RLIMIT_FSIZE at `FSIZE_MB`, so
neither the evaluator's memory nor its disk grows with it).

Layers, strongest first; `protections()` detects once per process which ones this machine
allows (every `Verdict` lists them):

* `uid` (evaluator runs as root; without `namespaces` only if others may reach the
  interpreter): the program runs as a dedicated unprivileged uid,
  `UID_BASE + slot`, with no supplementary groups and no_new_privs (setuid binaries do
  not elevate it). One uid per concurrent run, leased through a lock file, so that
  RLIMIT_NPROC (which the kernel ignores for root) counts exactly this run's processes
  and threads, signals cannot reach the evaluator or another run (a program that kills
  its parent gets EPERM), root-owned files cannot be written or deleted, and the final
  sweep can find every process of the run by uid, including ones that left the session
  with setsid.
* `namespaces` (root with CAP_SYS_ADMIN): unshare(CLONE_NEWNS | CLONE_NEWNET |
  CLONE_NEWIPC) before exec. The network namespace has only a down loopback, so no
  IP traffic leaves the sandbox (Unix sockets in the file system stay reachable as far
  as their permissions allow the uid). In the private mount namespace the working
  directory is a fresh tmpfs of `SCRATCH_MB` (owned by the uid, gone with the namespace)
  and the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock) are covered
  by private tmpfs of `PRIVATE_TMP_MB`, so the program cannot write anything that
  outlives it. Directories on the interpreter's path that the uid may not traverse (a
  pyenv under /root, mode 0700) are covered by a tmpfs that re-exposes only the needed
  entry by a bind mount: the interpreter is reachable, the rest of /root is not.
* `pids_cgroup` (a writable pids cgroup hierarchy, v1 or v2): each run gets its own
  cgroup with pids.max = max_processes, which no setsid can leave; its cgroup.procs is
  the authoritative list for the final sweep.
* `cpu_cgroup` (a writable cpu hierarchy): each run gets its own cpu cgroup with the
  default weight, so the scheduler shares the CPU between runs, not between processes: a
  fork bomb whose processes each call setsid (escaping the scheduler's per-session
  autogroups) gets one run's share, and honest runs beside it keep theirs.
* Always: RLIMIT_CPU (cpu_s), RLIMIT_AS (memory_mb), RLIMIT_FSIZE, RLIMIT_NOFILE,
  RLIMIT_CORE = 0 and, with `uid`, RLIMIT_NPROC = max_processes; a wall-clock timeout.
  When the main process exits or times out, its process group and then every remaining
  member of the run (cgroup, else uid, else session) get SIGKILL. The evaluator is the
  child subreaper of what it starts, so every orphaned process of the run becomes its
  child and it reaps the zombies itself: before the verdict is returned and the uid and
  cgroup are released, no process of the run is left, zombies included (they would count
  against the next run's RLIMIT_NPROC until init reaped them). A uid whose leftovers do
  not clear (the evaluator died mid-run) is skipped by later leases until it does.
* Never an exception for the program's sake: a start the kernel refuses (EAGAIN, ENOMEM)
  is retried with backoff, and what still fails is a verdict with status "error", which
  says the sandbox, not the program, failed; `run_until_verdict` retries those.

Fallbacks, weaker and stated in the verdict: without `namespaces`, network use is blocked
only by a socket guard (`network_isolation == "guard"`: a prelude that makes
`socket.socket` refuse to open new sockets; ctypes or a subprocess without it can bypass
it) and the working directory is a host temporary directory, removed afterwards (with
`uid`, entries the uid left in the world-writable directories are removed too). Without
`uid` and without a cgroup, a watchdog counts the session's processes every
`WATCHDOG_PERIOD_S` and kills the run when it exceeds max_processes; processes that
escaped the session with setsid are then not found, the program may signal the
evaluator, and it may write wherever the evaluator's user may: run untrusted code as root
(it drops to a dedicated uid) or inside a disposable container.

Not limited: reading world-readable files, /proc listings of other processes, the CPU
share of up to max_processes busy processes until the timeout (without `cpu_cgroup`;
with it, of one run), and kernel memory beyond
what the tmpfs sizes and inode counts, RLIMIT_NOFILE and the per-user pipe quota bound
(a memory cgroup would). The parent-death signal kills the main process if the thread
that started it dies; its descendants are swept by the next run that leases the same uid.
Without `uid`, a process that left the session with setsid is not found, and neither is
its zombie (it stays the evaluator's child until the evaluator exits).
"""

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

from absl import app, flags, logging

TAIL_CHARS = 2000  # of stdout and of stderr kept in a verdict
FSIZE_MB = 16  # largest file (stdout and stderr included) a program may write
SCRATCH_MB = 64  # tmpfs working directory (namespaces)
PRIVATE_TMP_MB = 16  # each private tmpfs over a world-writable directory (namespaces)
TMPFS_INODES = 4096  # files per tmpfs: each costs kernel memory that no rlimit counts
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE: bounds socket and pipe buffers, also kernel memory
UID_BASE = 1_999_000_000  # sandbox uids: UID_BASE + slot, far from system and user ranges
UID_SLOTS = 4096  # concurrent runs with `uid` (across all evaluator processes)
# one lock file per slot: the lowest free slot is leased
UID_LEASES = os.path.join(
  "/run" if os.path.isdir("/run") else tempfile.gettempdir(), "sdiff-sandbox-uids"
)
WATCHDOG_PERIOD_S = 0.05  # process counting without `uid` and cgroup
MEMORY_PERIOD_S = 0.02  # peak RSS sampling
KILL_DEADLINE_S = 5.0  # for a run's SIGKILLed processes to be gone (reaped)
LEASE_CLEAR_S = 0.2  # for leftovers of a uid to be gone before its slot is skipped
START_BACKOFF_S = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # retries of a start refused (EAGAIN, ENOMEM)
PROGRAM_NAME = "main.py"  # the program's file in its working directory
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# "error": the sandbox could not run the program (e.g. no process could be started); not
# the program's fault, so callers retry it (run_until_verdict) and never count it a failure.
STATUSES = ("passed", "failed", "timeout", "killed", "error")
VERDICT_ATTEMPTS = 3  # run_until_verdict: runs of one program that may end in "error"

# Linux ABI constants (sched.h, mount.h, prctl.h).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_LIBC.unshare.argtypes = [ctypes.c_int]
_LIBC.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

# The guard without a network namespace: new sockets are refused; sockets wrapping an
# existing descriptor (socketpair, fromfd) still work. The program then runs as __main__.
_SOCKET_GUARD = f"""
import _socket, runpy, socket

class _NoNetwork(socket.socket):
  def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
    if fileno is None:
      raise PermissionError("network access is disabled in this sandbox")
    super().__init__(family, type, proto, fileno)

def _no_connection(*args, **kwargs):
  raise PermissionError("network access is disabled in this sandbox")

socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _NoNetwork
socket.create_connection = _no_connection
del _socket, socket, _NoNetwork, _no_connection
runpy.run_path({PROGRAM_NAME!r}, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Protections:
  """What the sandbox can use on this machine (see the module docstring)."""

  uid: bool  # programs run as a dedicated unprivileged uid
  namespaces: bool  # private mount, network and IPC namespaces
  pids_cgroup: str | None  # directory in which a per-run pids cgroup is created
  cpu_cgroup: str | None = None  # the same for a cpu cgroup (may be the same directory)

  @property
  def network_isolation(self) -> str:
    return "namespace" if self.namespaces else "guard"

  def names(self) -> tuple[str, ...]:
    names = []
    if self.uid:
      names.append("uid")
    if self.namespaces:
      names.append("namespaces")
    else:
      names.append("socket_guard")
    if self.pids_cgroup is not None:
      names.append("pids_cgroup")
    elif not self.uid:
      names.append("process_watchdog")
    if self.cpu_cgroup is not None:
      names.append("cpu_cgroup")
    return (*names, "rlimits")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """How one program ended."""

  status: str  # one of STATUSES; "killed": by a signal other than the wall-clock timeout's
  exit_code: int | None  # of the main process; -N when signal N ended it; None: "error"
  detail: str  # why, in words
  seconds: float  # wall clock from start to exit (or to the timeout)
  cpu_seconds: float  # user + system of the main process and its reaped descendants
  # peak RSS of the main process (MiB), sampled every MEMORY_PERIOD_S: a shorter spike, or
  # one in a child process, is missed (RLIMIT_AS bounds every process whatever this says)
  peak_memory_mb: float
  stdout_tail: str  # last TAIL_CHARS characters
  stderr_tail: str
  pid: int | None  # of the main process, also its process-group and session id
  uid: int | None  # the program ran as
  network_isolation: str  # "namespace" or "guard"
  protections: tuple[str, ...]  # Protections.names()

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class _Limits:
  timeout_s: float
  memory_mb: int
  max_processes: int
  cpu_s: float


def run_program(
  source: str,
  *,
  timeout_s: float = 10.0,
  memory_mb: int = 1024,
  max_processes: int = 32,
  cpu_s: float | None = None,
) -> Verdict:
  """Runs `source` as __main__ in a fresh sandbox; no process of it survives the return.

  Thread-safe: concurrent calls get separate uids, cgroups and working directories.
  `cpu_s` (default timeout_s + 1) limits each process's CPU time; `max_processes` counts
  processes and, where the kernel does (`uid`, cgroup), threads. Never raises for the
  program's sake: a start the kernel refuses (EAGAIN, ENOMEM) is retried with backoff, and
  what still fails becomes a verdict with status "error" and the reason in `detail`.
  """
  limits = _Limits(timeout_s, memory_mb, max_processes, timeout_s + 1 if cpu_s is None else cpu_s)
  prot = protections()
  start = time.monotonic()
  try:
    return _run_retrying(source, limits, prot)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("sandbox: could not run a program: %r", e)
    return Verdict(
      status="error",
      exit_code=None,
      detail=f"the sandbox could not run the program: {type(e).__name__}: {e}",
      seconds=time.monotonic() - start,
      cpu_seconds=0.0,
      peak_memory_mb=0.0,
      stdout_tail="",
      stderr_tail="",
      pid=None,
      uid=None,
      network_isolation=prot.network_isolation,
      protections=prot.names(),
    )


def run_until_verdict(source: str, *, attempts: int = VERDICT_ATTEMPTS, **limits) -> Verdict:
  """`run_program` until a verdict other than "error", at most `attempts` runs (with a pause
  between them); the last verdict. What every caller that scores programs should use."""
  for attempt in range(attempts):
    verdict = run_program(source, **limits)
    if verdict.status != "error":
      break
    if attempt + 1 < attempts:
      time.sleep(START_BACKOFF_S[min(attempt + 2, len(START_BACKOFF_S) - 1)])
  return verdict


def _run_retrying(source: str, limits: _Limits, prot: Protections) -> Verdict:
  """`_run`, again after a pause while starting the program fails with EAGAIN or ENOMEM
  (a process table, pid or memory limit momentarily reached)."""
  for pause in START_BACKOFF_S:
    try:
      return _run(source, limits, prot)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.ENOMEM):
        raise
      logging.info("sandbox: start refused (%s), retrying in %g s", e, pause)
      time.sleep(pause)
  return _run(source, limits, prot)


_DETECTED: list[Protections] = []
_DETECT_LOCK = threading.Lock()


def protections() -> Protections:
  """The protections of this machine, detected (and tried on an empty program) once."""
  with _DETECT_LOCK:
    if not _DETECTED:
      _DETECTED.append(_detect())
    return _DETECTED[0]


def _detect() -> Protections:
  root = os.geteuid() == 0
  cgroup = _cgroup_parent("pids", ("pids.max",)) if root else None
  cpu = _cgroup_parent("cpu", ("cpu.shares", "cpu.weight")) if root else None
  probe = _Limits(timeout_s=30.0, memory_mb=1024, max_processes=8, cpu_s=30.0)
  if root:
    full = Protections(uid=True, namespaces=True, pids_cgroup=cgroup, cpu_cgroup=cpu)
    try:
      verdict = _run_retrying("", probe, full)
    except subprocess.SubprocessError as e:  # unshare or mount refused (no CAP_SYS_ADMIN)
      logging.warning("sandbox: no namespaces (%s); network is only guarded", e)
    else:
      if verdict.status == "passed":
        return full
      logging.warning("sandbox: Python fails in namespaces: %s", verdict.stderr_tail)
  reachable = not _exposure_plan(_interpreter_paths())
  basic = Protections(uid=root and reachable, namespaces=False, pids_cgroup=cgroup, cpu_cgroup=cpu)
  verdict = _run_retrying("", probe, basic)
  if verdict.status != "passed":
    raise RuntimeError(f"the sandbox cannot run Python ({basic}): {verdict.stderr_tail}")
  return basic


def _run(source: str, limits: _Limits, prot: Protections) -> Verdict:
  _become_subreaper()
  workdir = tempfile.mkdtemp(prefix="sdiff-sandbox-")
  try:
    with contextlib.ExitStack() as stack:
      uid = stack.enter_context(_uid_lease()) if prot.uid else os.getuid()
      cgroup = None  # the pids cgroup, whose members are the run's
      cgroups = []  # every cgroup the program starts in
      if prot.pids_cgroup is not None:
        pids_max = {"pids.max": str(limits.max_processes)}
        cgroup = stack.enter_context(_cgroup(prot.pids_cgroup, pids_max))
        cgroups.append(cgroup)
      if prot.cpu_cgroup is not None and prot.cpu_cgroup != prot.pids_cgroup:
        cgroups.append(stack.enter_context(_cgroup(prot.cpu_cgroup, {})))
      out = stack.enter_context(tempfile.TemporaryFile())
      err = stack.enter_context(tempfile.TemporaryFile())
      program = source.encode("utf-8", errors="replace")  # lone surrogates become "?"
      if not prot.namespaces:  # the program lives in the host directory
        with open(os.path.join(workdir, PROGRAM_NAME), "wb") as f:
          f.write(program)
        if prot.uid:
          os.chown(workdir, uid, uid)
          os.chown(os.path.join(workdir, PROGRAM_NAME), uid, uid)
      verdict = _supervise(program, limits, prot, workdir, uid, cgroup, cgroups, out, err)
      if prot.uid and not prot.namespaces:
        _remove_owned(uid)
      return verdict
  finally:
    _remove_tree(workdir)


def _supervise(program, limits, prot, workdir, uid, cgroup, cgroups, out, err) -> Verdict:
  """Starts the program, waits for its exit or the timeout, kills all that is left."""
  if prot.namespaces:
    argv = [sys.executable, "-I", "-B", PROGRAM_NAME]
  else:
    argv = [sys.executable, "-I", "-B", "-c", _SOCKET_GUARD]
  env = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": workdir,
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
  }
  setup = _ChildSetup(workdir, program, uid, cgroups, limits, prot)

  def everything() -> list[_Process]:  # the run's processes, zombies included
    if prot.uid:
      return [p for p in _processes() if p.uid == uid]
    return [p for p in _processes() if p.sid == proc.pid]

  start = time.monotonic()
  proc = subprocess.Popen(
    argv,
    stdin=subprocess.DEVNULL,
    stdout=out,
    stderr=err,
    env=env,
    start_new_session=True,
    preexec_fn=setup,
  )
  try:
    peak_kib = [0]
    timed_out, too_many = _wait(
      proc.pid, limits, watchdog=not prot.uid and cgroup is None, peak_kib=peak_kib
    )
    seconds = time.monotonic() - start
  finally:  # also when the wait is interrupted
    # The main process is reaped last, so its pid (= pgid = sid) cannot be reused before.
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    if cgroup is not None:  # pids.max bounds it, and every live member is listed
      for pid in _alive(_cgroup_members(cgroup)):
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGKILL)
    if not _clear(everything, KILL_DEADLINE_S, exclude=proc.pid):
      logging.warning("sandbox: processes of uid %d outlived the run: %s", uid, everything())
    _, wait_status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(wait_status)

  if timed_out:
    status, detail = "timeout", f"still running after {limits.timeout_s:g} s wall clock"
  elif too_many:
    status, detail = "killed", f"more than {limits.max_processes} processes"
  elif code < 0:
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    hint = {
      "SIGKILL": " (CPU time limit or out of memory)",
      "SIGXCPU": " (CPU time limit)",
      "SIGXFSZ": f" (wrote a file or output over {FSIZE_MB} MB)",
    }
    status, detail = "killed", f"signal {name}{hint.get(name, '')}"
  else:
    status, detail = ("passed" if code == 0 else "failed"), f"exit code {code}"
  return Verdict(
    status=status,
    exit_code=code,
    detail=detail,
    seconds=seconds,
    cpu_seconds=usage.ru_utime + usage.ru_stime,
    peak_memory_mb=peak_kib[0] / 1024,
    stdout_tail=_tail(out),
    stderr_tail=_tail(err),
    pid=proc.pid,
    uid=uid,
    network_isolation=prot.network_isolation,
    protections=prot.names(),
  )


def _wait(pid: int, limits: _Limits, watchdog: bool, peak_kib: list[int]) -> tuple[bool, bool]:
  """Waits for the main process to exit: (timed out, watchdog found too many processes).

  Meanwhile samples the main process's peak RSS (VmHWM) into `peak_kib[0]` every
  MEMORY_PERIOD_S. Not getrusage: a child's ru_maxrss starts at the RSS of the process it
  was forked from (the evaluator, maybe GBs with a model loaded) and survives exec.
  """
  pidfd = os.pidfd_open(pid)  # readable once the process has exited
  exited = select.poll()  # not select(): the evaluator may hold over 1024 descriptors
  exited.register(pidfd, select.POLLIN)
  deadline = time.monotonic() + limits.timeout_s
  step_s = min(WATCHDOG_PERIOD_S, MEMORY_PERIOD_S) if watchdog else MEMORY_PERIOD_S
  try:
    while True:
      peak_kib[0] = max(peak_kib[0], _high_water_kib(pid))
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return True, False
      if exited.poll(math.ceil(1000 * min(remaining, step_s))):
        return False, False
      if watchdog and sum(p.sid == pid and p.alive for p in _processes()) > limits.max_processes:
        return False, True
  finally:
    os.close(pidfd)


def _high_water_kib(pid: int) -> int:
  """VmHWM of a live process in KiB (0 once it has exited or before its exec)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except (OSError, ValueError):
    pass
  return 0


class _ChildSetup:
  """The preexec function: runs in the forked child (as the evaluator's user) before exec.

  Order matters: cgroup entry, namespaces and mounts need root; the rlimits and the uid
  drop come last, and the parent-death signal after the uid change (which clears it).
  """

  def __init__(self, workdir, program, uid, cgroups, limits, prot):
    self.workdir = workdir
    self.program = program  # bytes, written into the tmpfs working directory
    self.uid = uid
    self.cgroup_procs = [os.path.join(cgroup, "cgroup.procs") for cgroup in cgroups]
    self.prot = prot
    self.exposure = _exposure_plan(_interpreter_paths()) if prot.namespaces else []
    self.scratch = _world_writable_dirs() if prot.namespaces else []
    # interpreter directories (a venv under /tmp) that the scratch tmpfs would hide
    self.keep = [d for d in _interpreter_dirs() if any(_under(d, top) for top in self.scratch)]
    cpu = max(1, math.ceil(limits.cpu_s))  # RLIMIT_CPU counts whole seconds
    self.rlimits = [
      (resource.RLIMIT_CPU, cpu),  # soft == hard: SIGKILL when used up
      (resource.RLIMIT_AS, limits.memory_mb << 20),
      (resource.RLIMIT_FSIZE, FSIZE_MB << 20),
      (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
      (resource.RLIMIT_CORE, 0),
    ]
    if prot.uid:  # counted per real uid: only this run's processes and threads
      self.rlimits.append((resource.RLIMIT_NPROC, limits.max_processes))

  def __call__(self):
    for procs in self.cgroup_procs:
      fd = os.open(procs, os.O_WRONLY)
      os.write(fd, str(os.getpid()).encode())
      os.close(fd)
    if self.prot.namespaces:
      self._enter_namespaces()
    os.chdir(self.workdir)
    for which, value in self.rlimits:
      resource.setrlimit(which, (value, value))
    if self.prot.uid:
      os.setgroups([])
      os.setgid(self.uid)
      os.setuid(self.uid)
    _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    # Fires when the thread that started us exits: run_program's, which waits for us.
    _check(_LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")

  def _enter_namespaces(self):
    _check(_LIBC.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    for parent, children in self.exposure:
      fds = [os.open(os.path.join(parent, c), os.O_PATH) for c in children]
      _mount("tmpfs", parent, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
      for child, fd in zip(children, fds):
        target = os.path.join(parent, child)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
          os.mkdir(target)
        else:
          os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
        os.close(fd)
    kept = [(path, os.open(path, os.O_PATH)) for path in self.keep]  # before they are hidden
    for path in self.scratch:
      options = f"mode=1777,size={PRIVATE_TMP_MB}m,nr_inodes={TMPFS_INODES}"
      _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    for path, fd in kept:  # re-exposed read-only at their own paths
      os.makedirs(path, mode=0o755, exist_ok=True)
      _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
      _mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_REC)
      os.close(fd)
    os.makedirs(self.workdir, exist_ok=True)  # inside a private tmpfs when under one
    options = f"mode=0700,size={SCRATCH_MB}m,nr_inodes={TMPFS_INODES}"
    options += f",uid={self.uid},gid={self.uid}"  # the program's own directory
    _mount("tmpfs", self.workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    fd = os.open(os.path.join(self.workdir, PROGRAM_NAME), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, self.program)
    os.close(fd)


def _check(result: int, what: str):
  if result != 0:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source, target, fstype, mount_flags, options=None):
  def b(s):
    return None if s is None else s.encode()

  _check(_LIBC.mount(b(source), b(target), b(fstype), mount_flags, b(options)), f"mount {target}")


def _interpreter_paths() -> list[str]:
  """What the sandboxed interpreter must reach: its executable, prefixes and venv."""
  paths = [sys.executable, os.path.realpath(sys.executable)]
  for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
    paths.append(os.path.realpath(prefix))
  return paths


def _interpreter_dirs() -> list[str]:
  """The interpreter's prefixes (a venv and its base), outermost first, without nesting."""
  dirs = []
  for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
    for path in {os.path.abspath(prefix), os.path.realpath(prefix)}:
      if os.path.isdir(path) and not any(_under(path, d) for d in dirs):
        dirs = [d for d in dirs if not _under(d, path)] + [path]
  return sorted(dirs)


def _under(path: str, top: str) -> bool:
  return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _exposure_plan(paths: list[str]) -> list[tuple[str, list[str]]]:
  """(directory, [entries]) for each directory on `paths` that others may not traverse,
  outermost first: the entries that must be re-exposed over a tmpfs covering it."""
  plan: dict[str, set[str]] = {}
  for path in paths:
    parts = os.path.abspath(path).split(os.sep)[1:]
    for depth in range(len(parts) - 1):
      directory = os.sep + os.sep.join(parts[:depth])
      if not os.stat(directory).st_mode & stat.S_IXOTH:
        plan.setdefault(directory, set()).add(parts[depth])
  return [(d, sorted(plan[d])) for d in sorted(plan, key=lambda d: d.count(os.sep))]


def _world_writable_dirs() -> list[str]:
  """The usual world-writable directories that exist here, outermost only."""
  found = []
  for path in sorted({os.path.realpath(p) for p in (*WORLD_WRITABLE, tempfile.gettempdir())}):
    if os.path.isdir(path) and os.stat(path).st_mode & stat.S_IWOTH:
      if not any(path.startswith(outer + os.sep) for outer in found):
        found.append(path)
  return found


@contextlib.contextmanager
def _uid_lease():
  """A sandbox uid no other run (of any evaluator process) uses until the lease ends."""
  directory = UID_LEASES
  os.makedirs(directory, mode=0o700, exist_ok=True)
  info = os.lstat(directory)
  if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
    raise RuntimeError(f"{directory} must be a directory that only root may write")
  for slot in range(UID_SLOTS):
    fd = os.open(os.path.join(directory, str(slot)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: excludes threads too
    except BlockingIOError:
      os.close(fd)
      continue
    uid = UID_BASE + slot
    try:
      # Left by an evaluator that died mid-run, or zombies another process must reap (they
      # count against RLIMIT_NPROC): such a uid is skipped until it is clear.
      if _clear(lambda: [p for p in _processes() if p.uid == uid], LEASE_CLEAR_S):
        yield uid
        return
      logging.log_every_n_seconds(
        logging.WARNING, "sandbox: uid %d still has processes, using another", 10, uid
      )
    finally:
      os.close(fd)
  raise RuntimeError(f"all {UID_SLOTS} sandbox uids are in use")


_CGROUP_COUNTER = itertools.count()


def _cgroup_parent(controller: str, files: tuple[str, ...]) -> str | None:
  """Our cgroup's directory in a hierarchy with `controller` where we may create children
  that have one of `files` (the controller's, v1 or v2), or None."""
  groups = {}  # controller ("" for cgroup v2) -> our cgroup's path
  with open("/proc/self/cgroup") as f:
    for line in f:
      _, names, path = line.rstrip("\n").split(":", 2)
      for name in names.split(","):
        groups[name] = path
  with open("/proc/self/mountinfo") as f:
    mounts = [line.split() for line in f]
  for fields in mounts:
    sep = fields.index("-")
    root, mountpoint, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
    key = "" if fstype == "cgroup2" else controller
    if fstype not in ("cgroup", "cgroup2") or key not in groups:
      continue
    if fstype == "cgroup" and controller not in options.split(","):
      continue
    parent = os.path.normpath(os.path.join(mountpoint, os.path.relpath(groups[key], root)))
    probe = os.path.join(parent, f"sdiff-sandbox-probe-{os.getpid()}")
    try:
      os.mkdir(probe)
    except OSError:
      continue
    # v2: the controller must be delegated
    usable = any(os.path.exists(os.path.join(probe, name)) for name in files)
    os.rmdir(probe)
    if usable:
      return parent
  return None


@contextlib.contextmanager
def _cgroup(parent: str, settings: dict[str, str]):
  """A new cgroup under `parent` with `settings` (file -> value), removed afterwards."""
  path = os.path.join(parent, f"sdiff-sandbox-{os.getpid()}-{next(_CGROUP_COUNTER)}")
  os.mkdir(path)
  try:
    for name, value in settings.items():
      with open(os.path.join(path, name), "w") as f:
        f.write(value)
    yield path
  finally:
    _STALE_CGROUPS.append(path)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while True:  # busy until its killed members are reaped
      _remove_stale_cgroups()
      if path not in _STALE_CGROUPS or time.monotonic() > deadline:
        break
      time.sleep(0.005)
    if path in _STALE_CGROUPS:
      logging.warning("sandbox: cgroup %s is still busy; removing it later", path)


_STALE_CGROUPS: list[str] = []  # cgroups of finished runs, until they are removed


def _remove_stale_cgroups():
  """Removes those of _STALE_CGROUPS that are empty now (every run retries the rest)."""
  for path in list(_STALE_CGROUPS):
    try:
      os.rmdir(path)
    except OSError as e:
      if e.errno == errno.EBUSY:
        continue
      if e.errno != errno.ENOENT:
        logging.warning("sandbox: cannot remove cgroup %s: %s", path, e)
    with contextlib.suppress(ValueError):  # another thread's call removed it first
      _STALE_CGROUPS.remove(path)


def _cgroup_members(cgroup: str) -> list[int]:
  with open(os.path.join(cgroup, "cgroup.procs")) as f:
    return [int(line) for line in f if line.strip()]


def _alive(pids: list[int]) -> list[int]:
  """The pids that are neither gone nor zombies (those are dead, only not reaped)."""
  alive = []
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat", "rb") as f:
        state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
      continue
    if state not in (b"Z", b"X"):
      alive.append(pid)
  return alive


class _Process(NamedTuple):
  pid: int
  state: bytes  # b"R", b"S", ..., b"Z" (zombie: exited, not reaped), b"X" (being reaped)
  ppid: int
  uid: int  # real
  sid: int  # session id

  @property
  def alive(self) -> bool:
    return self.state not in (b"Z", b"X")


_STATUS_FIELDS = re.compile(rb"^(State|PPid|Uid|NSsid):\s*(\S+)", re.MULTILINE)


def _processes() -> list[_Process]:
  """Every process on the machine, zombies included."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status", "rb") as f:
        fields = dict(_STATUS_FIELDS.findall(f.read()))
    except OSError:  # gone
      continue
    found.append(
      _Process(
        int(name),
        fields[b"State"],
        int(fields[b"PPid"]),
        int(fields[b"Uid"]),
        int(fields[b"NSsid"]),
      )
    )
  return found


def _become_subreaper():
  """Makes this process the child subreaper of its descendants (once per process: a
  forked child does not inherit it): a sandboxed process whose parent dies becomes our
  child, not init's, so `_clear` can reap its zombie, which otherwise keeps counting
  against the uid's RLIMIT_NPROC until init gets to it (seconds on some machines)."""
  global _SUBREAPER_PID
  if _SUBREAPER_PID != os.getpid():
    _check(_LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    _SUBREAPER_PID = os.getpid()


_SUBREAPER_PID = None


def _clear(processes, bound_s: float, exclude: int | None = None) -> bool:
  """SIGKILLs the live ones of `processes()` (minus `exclude`) and reaps their zombies
  that are our children, until none is left: True, or False when `bound_s` has passed
  (a zombie of another parent, or a process that SIGKILL does not end)."""
  me = os.getpid()
  deadline = time.monotonic() + bound_s
  while found := [p for p in processes() if p.pid != exclude]:
    if time.monotonic() > deadline:
      return False
    for p in found:
      if p.alive:
        with contextlib.suppress(ProcessLookupError):
          os.kill(p.pid, signal.SIGKILL)
      elif p.state == b"Z" and p.ppid == me:
        with contextlib.suppress(ChildProcessError):
          os.waitpid(p.pid, os.WNOHANG)
    time.sleep(0.001)
  return True


def _remove_owned(uid: int):
  """Removes what `uid` left at the top of the world-writable directories."""
  for directory in _world_writable_dirs():
    for entry in os.scandir(directory):
      with contextlib.suppress(FileNotFoundError):
        if entry.stat(follow_symlinks=False).st_uid != uid:
          continue
        if entry.is_dir(follow_symlinks=False):
          shutil.rmtree(entry.path)
        else:
          os.unlink(entry.path)


def _remove_tree(path: str):
  """shutil.rmtree, also when a same-uid program took away permissions inside."""
  if os.geteuid() != 0:
    os.chmod(path, 0o700)
    for directory, subdirs, _ in os.walk(path):
      for name in subdirs:
        sub = os.path.join(directory, name)
        if not os.path.islink(sub):
          os.chmod(sub, 0o700)
  shutil.rmtree(path)


def _tail(f) -> str:
  """The last TAIL_CHARS characters of a capture file (read with pread: no seeking)."""
  size = os.fstat(f.fileno()).st_size
  start = max(0, size - 4 * TAIL_CHARS)  # UTF-8 is at most 4 bytes per character
  data = os.pread(f.fileno(), size - start, start)
  return data.decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _define_flags() -> dict:
  """The CLI's flags, defined only when it runs: importing the library defines none."""
  return {
    "timeout_s": flags.DEFINE_float("timeout_s", 10.0, "Wall-clock limit in seconds."),
    "memory_mb": flags.DEFINE_integer("memory_mb", 1024, "Address-space limit (RLIMIT_AS), MiB."),
    "max_processes": flags.DEFINE_integer("max_processes", 32, "Processes (and threads) at once."),
    "cpu_s": flags.DEFINE_float("cpu_s", None, "CPU seconds per process (default timeout_s + 1)."),
  }


def main(argv, holders: dict):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m sdiff_jax.evaluate.sandbox PROGRAM.py [--flags]")
  with open(argv[1], encoding="utf-8") as f:
    source = f.read()
  verdict = run_program(source, **{name: holder.value for name, holder in holders.items()})
  print(verdict.to_json())


def run():
  """Console-script entry point."""
  holders = _define_flags()
  app.run(lambda argv: main(argv, holders))


if __name__ == "__main__":
  run()
