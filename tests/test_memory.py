"""retain_freed_memory: freed large tensors are reused instead of faulted in again."""

import subprocess
import sys
import textwrap

import pytest

# Allocates and fills a 200 MB tensor four times and prints the minor page faults of the last
# time: the steady state of a loop of forward passes (glibc needs a round or two to grow its heap
# to the block size; from then on, retained memory is reused).
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from solov2_d2.engine.memory import retain_freed_memory
    applied = retain_freed_memory(sys.argv[1] == "1")
    def touch():
        torch.empty(50 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    for _ in range(3):
        touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(int(applied), after - before)
    """
)


def _second_touch_faults(enable: bool):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if enable else "0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults_kept = _second_touch_faults(True)
    not_applied, faults_default = _second_touch_faults(False)
    assert applied and not not_applied
    # 200 MB are 51200 pages of 4 KiB: glibc's default unmaps the block and faults it in again
    # (fewer faults only if transparent huge pages back it); retained memory faults almost none.
    assert faults_default > 5000
    assert faults_kept < 500


def test_environment_variable_turns_it_off(monkeypatch):
    from solov2_d2.engine import memory

    monkeypatch.setenv("SOLOV2_D2_RETAIN_FREED_MEMORY", "0")
    monkeypatch.setattr(memory, "_state", {"applied": False})
    assert memory.retain_freed_memory() is False
