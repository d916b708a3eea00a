"""onerec_jax/hugepages.py: the `onerec` command asks glibc's malloc for transparent huge pages
by re-executing itself once with GLIBC_TUNABLES set; anything else is left alone."""

import os
import subprocess
import sys

import pytest

from onerec_jax import hugepages

linux_glibc = pytest.mark.skipif(
    not hugepages.wanted({}), reason="glibc's malloc tunables exist on Linux with glibc only"
)


@linux_glibc
def test_the_tunable_is_appended_once_and_can_be_turned_off():
    env = hugepages.environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["X"] == "1"
    assert hugepages.environ(env) == env  # already set: unchanged
    assert hugepages.environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in hugepages.environ({"ONEREC_HUGE_PAGES": "0"})
    # A user's own choice of the tunable is kept, even "off".
    own = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hugepages.environ(own) == own


@linux_glibc
def test_the_onerec_command_restarts_once_with_the_tunable(tmp_path):
    """A script named `onerec` that calls `reexec` runs again with the tunable (once: the
    second run finds it set), keeping its arguments; under another name it is left alone."""
    body = (
        "import os, sys\n"
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], sys.flags.utf8_mode, "
        "flush=True)\n"
        "from onerec_jax import hugepages\n"
        "hugepages.reexec()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_", "ONEREC_HUGE"))}
    for name, runs in (("onerec", 2), ("other", 1)):
        script = tmp_path / name
        script.write_text(body)
        out = subprocess.run(
            [sys.executable, "-X", "utf8", str(script), "a", "--b"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert len(out) == runs, out
        assert out[0] == " ['a', '--b'] 1"
        if runs == 2:  # the interpreter's options (-X utf8) survive the restart
            assert out[1] == "glibc.malloc.hugetlb=1 ['a', '--b'] 1"
    # A loader that drops the tunable (a privileged interpreter) must not restart forever:
    # here the restarted process is told the tunable is off-limits, and it stops at once.
    script = tmp_path / "onerec"
    looping = body.replace(
        "hugepages.reexec()", "os.environ.pop('GLIBC_TUNABLES', None)\nhugepages.reexec()"
    )
    script.write_text(looping)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert len(out) == 2, out
