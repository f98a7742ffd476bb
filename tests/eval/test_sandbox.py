"""Hostile HumanEval completions: each tries to pass without solving the problem, or to reach
something outside its scratch folder. Every one must fail, leave nothing behind on the host and
finish in bounded time; the canonical solution in the same batch must still pass."""

import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from pipeline.eval import plain_values
from pipeline.eval.humaneval import problems, score
from pipeline.eval.sandbox import SandboxUnavailable, check_available, run_tests

TASK = "HumanEval/53"  # add(x, y): a hundred random calls in its tests
WRONG = "    return x - y\n"
# Whatever a runner could use as its "done" marker: the previous sandbox's constant, and its
# own arguments, where that sandbox passed the marker.
MARKER = (
    "import atexit, os, posix, sys\n"
    "def _say_done():\n"
    "    for word in ['__kiln_sandbox_done__', *sys.argv[1:]]:\n"
    "        sys.stderr.write('\\n' + word + '\\n')\n"
    "        print(word)\n"
    "    sys.stderr.flush()\n"
    "    sys.stdout.flush()\n"
)


def _hostile(token: str, host_dir: Path, port: int, scorer_pid: int) -> dict[str, str]:
    """Completions for add(x, y), by the trick each one tries. `token` marks any process or file
    they manage to create, so the test can look for it afterwards on the host."""
    py = repr(os.path.realpath(sys.executable))
    sleeper = f"[{py}, '-c', 'import time; time.sleep(60)', {token!r}]"
    escape = f"{str(host_dir / token)!r}"
    prefix = os.path.realpath(sys.base_prefix)
    return {
        # 1: forging the verdict
        "done marker": WRONG + MARKER + "_say_done()\nraise SystemExit(0)\n",
        "exit hook": "    assert False\n" + MARKER + "atexit.register(lambda: (_say_done(), posix._exit(0)))\n"
        "sys.excepthook = lambda *a: (_say_done(), posix._exit(0))\n",
        "exit during the tests": "    import os\n    os._exit(0)\n",
        "always equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
        "int subclass": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
        "        __hash__ = int.__hash__\n    return Yes(0)\n",
        "forged replies": WRONG + "import os\nfor fd in range(64):\n    try:\n"
        '        os.write(fd, b\'{"ready": true}\\n\' + b\'{"ok": {"b": true}}\\n\' * 200)\n'
        "    except OSError:\n        pass\nos._exit(0)\n",
        "patched builtins": "    return x + y if x < 0 else 0\nimport builtins\nbuiltins.AssertionError = type(None)\n",
        # 2: processes by every route, each trying to outlive the sandbox or to write outside it
        "fork": WRONG + f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv({py}, {sleeper})\n",
        "subprocess detached": WRONG + f"import subprocess\nsubprocess.Popen({sleeper}, start_new_session=True)\n",
        "ctypes system": WRONG + "import ctypes\n"
        f"ctypes.CDLL(None).system(b'touch {str(host_dir / token).encode().decode()}; "
        f'setsid {os.path.realpath(sys.executable)} -c "import time; time.sleep(60)" {token} &\')\n',
        "posix spawn": WRONG + f"import posix\nposix.posix_spawn({py}, {sleeper}, {{}})\n",
        "_posixsubprocess": WRONG + "import _posixsubprocess, os\nr, w = os.pipe()\n"
        f"_posixsubprocess.fork_exec({sleeper}, [{py}.encode()], True, (), None, None, -1, -1, -1, -1, -1, -1, "
        "r, w, True, True, 0, None, None, None, -1, None, False)\n",
        "reloaded os": WRONG + f"import importlib, os\nos = importlib.reload(os)\nos.system('{sys.executable} -c "
        f'"import time; time.sleep(60)" {token} &\')\n',
        "re-imported subprocess": WRONG + "import sys\nfor name in ('subprocess', 'os', 'posix'):\n"
        f"    sys.modules.pop(name, None)\nimport subprocess\nsubprocess.Popen({sleeper}, start_new_session=True)\n",
        "multiprocessing": WRONG + "import multiprocessing, time\n"
        "ctx = multiprocessing.get_context('spawn')\n"
        "p = ctx.Process(target=time.sleep, args=(60,))\np.start()\n",
        "fork bomb": WRONG + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "detached stderr holder": WRONG + f"import subprocess, sys\nsubprocess.Popen({sleeper}, "
        "stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)\n",
        # 2: files, sockets, secrets, the scorer itself
        "files outside": WRONG
        + "import os, shutil\n"
        + "".join(
            f"try:\n    {call}\nexcept Exception:\n    pass\n"
            for call in (
                f"open({escape}, 'w').write('x')",
                f"open({str(Path(prefix) / token)!r}, 'w').write('x')",
                f"open('/usr/{token}', 'w').write('x')",
                f"os.link('/usr/bin/env', {str(Path(prefix) / token)!r})",
                f"os.rename({str(Path(prefix) / 'lib')!r}, {str(Path(prefix) / token)!r})",
                f"os.symlink('/', {escape})",
                f"shutil.rmtree({str(host_dir)!r})",
                f"os.unlink({str(host_dir / 'keep.txt')!r})",
            )
        ),
        "network": WRONG + f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')\n",
        "secrets": "    import os, glob\n    seen = dict(os.environ)\n"
        "    for path in ['/proc/1/environ', '/etc/shadow', '/root/.bash_history'] + glob.glob('/proc/*/environ'):\n"
        "        try:\n            seen[path] = open(path, 'rb').read()[:2000]\n"
        "        except OSError:\n            pass\n"
        "    raise RuntimeError(repr(seen))\n",
        "kill the scorer": WRONG + f"import os, signal\nfor pid in (os.getppid(), {scorer_pid}, 1):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n",
        # 2: limits
        "disk fill": WRONG + "i = 0\nwhile True:\n    try:\n        open(f'fill{i}', 'wb').write(b'x' * 2**23)\n"
        "    except OSError:\n        break\n    i += 1\n",
        "memory bomb": WRONG + "x = bytearray(10**10)\n",
        "busy loop": "    while True:\n        pass\n",
        "sleep past the timeout": "    import time\n    time.sleep(60)\n",
    }


def _processes_with(token: str) -> list[int]:
    """Host processes with `token` in their command line, or running as one of this process's
    sandbox users (the fork bomb's copies carry no token)."""
    first_uid = 200_000 + (os.getpid() % 20_000) * 1000
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
            if token.encode() in (entry / "cmdline").read_bytes() or first_uid <= uid < first_uid + 1000:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_hostile_completions_are_contained(tmp_path, monkeypatch):
    check_available()
    secret = secrets.token_hex(16)
    monkeypatch.setenv("KILN_TEST_SECRET", secret)
    token = f"kilnhostile{secrets.token_hex(6)}"
    (tmp_path / "keep.txt").write_text("precious")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    hostile = _hostile(token, tmp_path, port, os.getpid())
    canonical = problems()[TASK]["canonical_solution"]
    samples = [{"task_id": TASK, "completion": c} for c in [canonical, *hostile.values()]]

    start = time.perf_counter()
    report, results = score(samples, [1], timeout=3.0, workers=4)
    wall = time.perf_counter() - start

    assert results[0]["passed"], results[0]["result"]  # the real solution still passes beside them
    outcomes = dict(zip(hostile, results[1:], strict=True))
    false_passes = [name for name, r in outcomes.items() if r["passed"]]
    assert false_passes == []
    assert wall < 120, f"{len(samples)} samples took {wall:.0f}s"  # not a speed bound: nothing waited 60 s
    # A killed sandbox's processes take a moment to be reaped; one that escaped sleeps 60 s (and runs as a
    # sandbox user from its fork on): wait for the first to go, well short of the second's end.
    deadline = time.monotonic() + 20
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(token) == [], "a process outlived its sandbox"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "precious"
    prefix = Path(os.path.realpath(sys.base_prefix))
    assert not (prefix / token).exists()
    assert not Path("/usr", token).exists()
    assert (prefix / "lib").is_dir()
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection ever reached the host
    assert all(secret not in r["result"] and "root:" not in r["result"] for r in results)
    assert outcomes["busy loop"]["result"] == "timeout"
    assert outcomes["sleep past the timeout"]["result"] == "timeout"
    assert outcomes["memory bomb"]["result"] == "memory"
    assert "not a plain value" in outcomes["always equal"]["result"]


def test_scratch_folder_is_writable_and_the_verdict_holds(tmp_path):
    p = problems()[TASK]
    writes = "    open('note.txt', 'w').write('fine')\n    return x + y\n"
    assert run_tests(p["prompt"], writes, p["test"], p["entry_point"]).passed  # its own folder is allowed
    slow_start = time.perf_counter()
    out = run_tests(p["prompt"], "    while True:\n        pass\n", p["test"], p["entry_point"], timeout=1.0)
    # the loop never ends: returning at all shows the timeout; the bound only rules out waiting for something else
    assert out.reason == "timeout"
    assert time.perf_counter() - slow_start < 30


def test_plain_values_round_trip_and_refuse_the_rest():
    value = [1, -(2**70), 1.5, float("inf"), "é", b"\x00", None, True, (1, "a"), {"k": {1, 2}}, frozenset({3})]
    back = plain_values.decode(plain_values.loads(plain_values.dumps(plain_values.encode(value))))
    assert back == value
    assert type(back[8]) is tuple
    assert type(back[0]) is int
    assert type(back[7]) is bool

    class Yes(int):
        pass

    for bad in (Yes(1), object(), [1, {"a": Yes(2)}]):
        with pytest.raises(TypeError, match="not a plain value"):
            plain_values.encode(bad)
    for forged in ({"i": 5}, {"x": "1"}, {"l": [], "s": ""}, [1], {"d": [[{"l": []}, None]]}):
        with pytest.raises((ValueError, TypeError)):
            plain_values.decode(forged)


def test_scoring_refuses_without_bubblewrap(monkeypatch, tmp_path, capsys):
    import json

    from pipeline.cli import main
    from pipeline.eval import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.check_available.cache_clear()
    samples = tmp_path / "s.jsonl"
    p = problems()[TASK]
    samples.write_text(json.dumps({"task_id": TASK, "completion": p["canonical_solution"]}) + "\n")
    try:
        with pytest.raises(SandboxUnavailable, match="`bwrap` is not installed"):
            score([{"task_id": TASK, "completion": "    return x + y\n"}], [1])
        assert main(["humaneval", "score", str(samples)]) == 2
        assert "kiln: error: HumanEval scoring runs completions in bubblewrap" in capsys.readouterr().err
        assert main(["humaneval", "score", str(samples), "--unsafe"]) == 0  # the user accepts the risk
        assert json.loads(capsys.readouterr().out)["pass@1"] == 1.0
    finally:
        sandbox.check_available.cache_clear()


def test_the_sandbox_sees_itself_isolated():
    """The sandbox's own view, checked by a test that passes only if every property holds: another
    user than root, no network, no host process in sight, /scratch, a clean environment."""
    check_available()
    probe = (
        "    import os, socket\n    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "        net = 'up'\n    except OSError:\n        net = 'down'\n"
        "    procs = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "    import sysconfig\n    site = sysconfig.get_paths()['purelib']\n"
        "    packages = os.listdir(site) if os.path.isdir(site) else []\n"
        "    work = os.path.exists('/work')\n"
        "    return [os.getuid(), net, len(procs), os.getcwd(), sorted(os.environ), work, packages]\n"
    )
    test = (
        "def check(candidate):\n    uid, net, procs, cwd, env, work, packages = candidate()\n"
        "    assert packages == [], packages\n"
        "    assert uid != 0 and net == 'down' and procs <= 3 and cwd == '/scratch' and not work, (uid, net, procs)\n"
        "    assert env == ['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONDONTWRITEBYTECODE', 'TMPDIR'], env\n"
    )
    out = run_tests('def probe():\n    """What the sandbox sees."""\n', probe, test, "probe")
    assert out.passed, out.reason


def test_a_runner_that_stops_reading_cannot_hold_the_scorer():
    """A request larger than a pipe's buffer, sent to a sandbox that never reads it: the scorer
    gives up at the timeout instead of blocking on the write."""
    prompt = 'def total(xs):\n    """Sum."""\n'
    test = "def check(candidate):\n    assert candidate(list(range(200000))) == sum(range(200000))\n"
    start = time.perf_counter()
    stop_reading = (
        "    return 0\nimport sys, time\nsys.modules['__main__']._requests = iter(lambda: time.sleep(60), 1)\n"
    )
    out = run_tests(prompt, stop_reading, test, "total", timeout=2.0)
    assert out.reason == "timeout"
    assert time.perf_counter() - start < 30
    assert run_tests(prompt, "    return sum(xs)\n", test, "total", timeout=10.0).passed  # the same size answered
