"""retain_freed_memory: freed large tensors are reused instead of faulted in again."""

import subprocess
import sys
import textwrap

import pytest

# A loop of "forward passes" whose layers make tensors of 20-160 MB, each freed after the next
# exists; prints the minor page faults of the last five passes (after three to warm up: glibc
# needs a few rounds to grow its heap to where freed blocks coalesce and serve the next ones).
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from solov2_d2.engine.memory import retain_freed_memory
    applied = retain_freed_memory(sys.argv[1] == "1")
    def forward():
        x = torch.empty(40 * 1024 * 1024).fill_(1.0)
        for size in (40, 20, 20, 10, 10, 5):
            y = torch.empty(size * 1024 * 1024).fill_(2.0)
            del x
            x = y
    for _ in range(3):
        forward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        forward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(int(applied), after - before)
    """)


def _steady_state_faults(enable: bool):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if enable else "0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults_kept = _steady_state_faults(True)
    not_applied, faults_default = _steady_state_faults(False)
    assert applied and not not_applied
    # Five passes touch 3.5 GB, 900k pages of 4 KiB: glibc's defaults unmap every block and fault
    # it in again (measured ~700k faults; fewer only where transparent huge pages back blocks);
    # retained memory is reused (measured 0, or one stray block of ~30k while the heap settles).
    assert faults_default > 100_000
    assert faults_kept < 0.1 * faults_default


def test_environment_variable_turns_it_off(monkeypatch):
    from solov2_d2.engine import memory

    monkeypatch.setenv("SOLOV2_D2_RETAIN_FREED_MEMORY", "0")
    monkeypatch.setattr(memory, "_state", {"applied": False})
    assert memory.retain_freed_memory() is False
